"""The segmenters `factory eval` trains, built from a config: torchvision's FCN / DeepLabV3, or a small
UNet that trains in seconds on a CPU.

Every segmenter takes a uint8 batch (B, 3, H, W) and returns logits (B, C, H, W) at the input's size; it
normalises its input itself (ImageNet mean and std, which torchvision backbones expect). Weights start
random (seeded by the caller) or, for the backbone, from a checkpoint the user gives: a state dict
(`torch.save`) at a path or fsspec URL, e.g. torchvision's ImageNet ResNet-50 file. Nothing is
downloaded.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from factory.downstream.eval_spec import SegmenterConfig
from factory.storage import open_url

TORCHVISION_KINDS = (
    "fcn_resnet50",
    "fcn_resnet101",
    "deeplabv3_resnet50",
    "deeplabv3_resnet101",
    "deeplabv3_mobilenet_v3_large",
)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class Segmenter(nn.Module):
    """Normalisation + a network whose `backbone` attribute is the part a checkpoint initialises."""

    def __init__(self, net: nn.Module, torchvision_output: bool):
        super().__init__()
        self.net, self.torchvision_output = net, torchvision_output
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.net((images.float() - self.mean) / self.std)
        return out["out"] if self.torchvision_output else out

    @property
    def backbone(self) -> nn.Module:
        return self.net.backbone


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class SmallUNet(nn.Module):
    """A UNet of `depth` levels: conv blocks, max-pool down, transposed-conv up, skip connections."""

    def __init__(self, num_classes: int, width: int, depth: int):
        super().__init__()
        ch = [width * 2**i for i in range(depth + 1)]
        self.backbone = nn.ModuleList([_block(3 if i == 0 else ch[i - 1], ch[i]) for i in range(depth)])
        self.middle = _block(ch[depth - 1], ch[depth])
        self.up = nn.ModuleList([nn.ConvTranspose2d(ch[i + 1], ch[i], 2, stride=2) for i in reversed(range(depth))])
        self.decode = nn.ModuleList([_block(2 * ch[i], ch[i]) for i in reversed(range(depth))])
        self.head = nn.Conv2d(ch[0], num_classes, 1)
        self.multiple = 2**depth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        x = F.pad(x, (0, -w % self.multiple, 0, -h % self.multiple), mode="replicate")
        skips = []
        for block in self.backbone:
            x = block(x)
            skips.append(x)
            x = F.max_pool2d(x, 2)
        x = self.middle(x)
        for up, block in zip(self.up, self.decode):
            x = block(torch.cat([up(x), skips.pop()], dim=1))
        return self.head(x)[..., :h, :w]


def build_segmenter(config: SegmenterConfig, num_classes: int) -> Segmenter:
    """The configured segmenter with random weights (seed torch first), its backbone from the checkpoint."""
    if config.kind == "unet":
        net = SmallUNet(num_classes, config.width, config.depth)
        model = Segmenter(net, torchvision_output=False)
    else:
        import torchvision.models.segmentation as tvs

        net = getattr(tvs, config.kind)(weights=None, weights_backbone=None, num_classes=num_classes, aux_loss=False)
        model = Segmenter(net, torchvision_output=True)
    if config.backbone_checkpoint:
        load_backbone(model.backbone, config.backbone_checkpoint, config.storage_options)
    return model


def load_backbone(backbone: nn.Module, url: str, storage_options: dict[str, Any]) -> None:
    """Copy a checkpoint into `backbone`. Its keys may carry the classifier's prefix (`features.` for
    MobileNet) or be wrapped (`state_dict`, `model`); keys the backbone lacks (a classifier head) are
    ignored, a backbone weight the checkpoint lacks is an error."""
    with open_url(url, "rb", storage_options) as f:
        state = torch.load(f, map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "model"):
        if isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    wanted = backbone.state_dict()
    found = {}
    for key in wanted:
        for candidate in (key, f"features.{key}", f"backbone.{key}"):
            if candidate in state:
                found[key] = state[candidate]
                break
    missing = [k for k in wanted if k not in found]
    if missing:
        raise ValueError(f"backbone_checkpoint {url}: {len(missing)} backbone weights missing, e.g. {missing[:3]}")
    bad = [k for k in wanted if found[k].shape != wanted[k].shape]
    if bad:
        raise ValueError(
            f"backbone_checkpoint {url}: shapes differ for {bad[:3]} "
            f"(e.g. {tuple(found[bad[0]].shape)} vs {tuple(wanted[bad[0]].shape)})"
        )
    backbone.load_state_dict(found)
