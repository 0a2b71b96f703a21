"""High-quality Image Selection: keep a synthetic image only if it still looks like its real image and
still matches the mask it was generated from.

- Cosine: the embeddings of the real image (`sample.source_image`) and the synthetic one
  (`sample.image`) must have cosine similarity > `eps`. The paper does not name the embedding, so it is
  a setting, recorded in every sample: `clip` (CLIP image embedding, default), `dinov2` (DINOv2 CLS
  token) or `pixels` (the images downsampled, scaled to [0, 1] and mean-centred, so that cosine is a
  pixel correlation rather than a brightness match).
- mIoU: the Mask Generator labels the synthetic image, prompted with the class names of its
  conditioning mask, and the mIoU of that label against the conditioning mask must be >= `miou_threshold`.

Both scores go into `meta["scores"]`; a sample that fails a check is rejected (`low_cosine` first,
else `low_miou`) and counted by reason in the shard stats.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from PIL import Image
from pydantic import Field

from factory.models.cache import fill_once, model_cache_dir
from factory.models.detection import DetectionParams, MaskGenerator, MaskGenModelConfig
from factory.models.loading import from_pretrained, resolve_model_path, torch_dtype
from factory.models.random_vision import random_embedder
from factory.models.random_weights import CLIP_L, DINOV2, random_id
from factory.models.tiny_vision import TINY_EMBEDDERS, build_tiny_clip_vision, build_tiny_dinov2
from factory.sample import Sample
from factory.sources.classes import class_names_in
from factory.stages import Stage, register_stage


def mean_iou(pred: np.ndarray, target: np.ndarray, ignore: int, skip_ids: frozenset[int] = frozenset()) -> float:
    """mIoU over the classes present in either mask, on the pixels `target` labels.

    Pixels `pred` leaves unlabeled (`ignore`) count as no class; classes in `skip_ids` (e.g. VOC's
    background, which the detector is never asked for) are not scored but still count as "not this
    class". Two masks with no scored class at all agree completely: 1.0.
    """
    valid = target != ignore
    p, t = pred[valid], target[valid]
    present = (set(np.unique(p).tolist()) | set(np.unique(t).tolist())) - {ignore} - set(skip_ids)
    ious = [np.count_nonzero((p == c) & (t == c)) / np.count_nonzero((p == c) | (t == c)) for c in sorted(present)]
    return float(np.mean(ious)) if ious else 1.0


class Embedder:
    """Unit-length image embeddings for the cosine check; one model call per batch of images."""

    def __init__(self, kind: str, cfg: SelectModelConfig, device: str, pixel_size: int):
        self.kind, self.device, self.pixel_size = kind, device, pixel_size
        if kind == "pixels":
            return
        from transformers import AutoImageProcessor, CLIPVisionModelWithProjection, Dinov2Model

        model_cls = CLIPVisionModelWithProjection if kind == "clip" else Dinov2Model
        if cfg.profile == "random":
            self.processor, self.model = random_embedder(kind, device, torch_dtype(cfg.dtype, device))
            return
        if cfg.profile == "tiny":
            build = build_tiny_clip_vision if kind == "clip" else build_tiny_dinov2
            ref = path = str(fill_once(model_cache_dir() / "tiny" / TINY_EMBEDDERS[kind], build))
        else:
            ref = cfg.clip if kind == "clip" else cfg.dinov2
            path = resolve_model_path(ref, cfg.storage_options)
        self.processor = from_pretrained(AutoImageProcessor, ref, path)
        self.model = from_pretrained(model_cls, ref, path, dtype=torch_dtype(cfg.dtype, device)).to(device).eval()

    def __call__(self, images: list[np.ndarray]):
        import torch

        if self.kind == "pixels":
            side = (self.pixel_size, self.pixel_size)
            x = torch.from_numpy(
                np.stack(
                    [
                        np.asarray(Image.fromarray(im).resize(side, Image.Resampling.BOX), dtype=np.float32).ravel()
                        / 255.0
                        for im in images
                    ]
                )
            )
            x = x - x.mean(-1, keepdim=True)
        else:
            pixels = self.processor(images=images, return_tensors="pt")["pixel_values"]
            with torch.no_grad():
                out = self.model(pixel_values=pixels.to(self.device, self.model.dtype))
            x = out.image_embeds if self.kind == "clip" else out.pooler_output  # DINOv2: the normed CLS token
        return torch.nn.functional.normalize(x.float().cpu(), dim=-1)


class SelectParams(DetectionParams):
    embedding: Literal["clip", "dinov2", "pixels"] = Field("clip", description="embedding for the cosine check")
    eps: float = Field(0.8, ge=-1, le=1, description="keep if cosine(real, synthetic) > eps")
    miou_threshold: float = Field(0.5, ge=0, le=1, description="keep if mIoU(pseudo-label, mask) >= this")
    check_cosine: bool = Field(True, description="run the cosine check (off: no score, no embedding model)")
    check_miou: bool = Field(True, description="run the mIoU check (off: no score, no detector or SAM)")
    pixel_size: int = Field(64, ge=1, description="pixels embedding: side the images are downsampled to")


class SelectModelConfig(MaskGenModelConfig):
    clip: str = Field("openai/clip-vit-large-patch14", description="hub id, local dir or s3:// URL")
    dinov2: str = Field("facebook/dinov2-base", description="hub id, local dir or s3:// URL")


@register_stage
class SelectStage(Stage[SelectParams, SelectModelConfig]):
    name = "select"
    uses_gpu = True
    extra = "models"
    Params = SelectParams
    Model = SelectModelConfig

    def setup(self) -> None:
        p, device = self.params, self.context.device
        self.embedder = Embedder(p.embedding, self.model, device, p.pixel_size) if p.check_cosine else None
        self.generator = MaskGenerator(self.model, p, self.context.classes, device) if p.check_miou else None
        classes = self.context.classes
        self.skip_ids = frozenset(classes.names.index(n) for n in p.skip_classes if n in classes.names)

    def model_ids(self) -> dict[str, str]:
        ids = {}
        if self.params.check_cosine and self.params.embedding != "pixels":
            kind = self.params.embedding
            ids["embedding"] = {
                "tiny": f"tiny:{TINY_EMBEDDERS[kind]}",
                "random": random_id(CLIP_L if kind == "clip" else DINOV2),
            }.get(self.model.profile, getattr(self.model, kind))
        if self.params.check_miou:
            ids.update(MaskGenerator.model_ids(self.model))
        return ids

    def cosines(self, samples: list[Sample]) -> list[float]:
        """cosine(real, synthetic) per sample; each real image is embedded once for all its variants."""
        assert self.embedder is not None  # set up whenever check_cosine is on
        reals: dict[tuple[int, int], int] = {}
        images: list[np.ndarray] = []
        for s in samples:
            if (s.shard, s.index) not in reals:
                reals[(s.shard, s.index)] = len(images)
                images.append(s.array("source_image"))
        emb = self.embedder(images + [s.array("image") for s in samples])
        real_emb, synth_emb = emb[[reals[(s.shard, s.index)] for s in samples]], emb[len(images) :]
        return (real_emb * synth_emb).sum(-1).tolist()

    def mious(self, samples: list[Sample]) -> list[float]:
        assert self.generator is not None  # set up whenever check_miou is on
        classes = self.context.classes
        names = [class_names_in(s.array("mask"), classes) for s in samples]
        labels = self.generator.generate([s.array("image") for s in samples], names)
        return [
            mean_iou(label.mask, s.array("mask"), classes.ignore_index, self.skip_ids)
            for label, s in zip(labels, samples)
        ]

    def process(self, samples: list[Sample]) -> list[Sample]:
        p, label = self.params, self.context.label
        live = []
        for s in samples:
            if s.image is None:
                s.fail(label, "no_image", "select needs the synthetic image")
            elif p.check_cosine and s.source_image is None:
                s.fail(label, "no_source_image", "the cosine check needs the real image a synthesis stage keeps")
            elif p.check_miou and s.mask is None:
                s.fail(label, "no_mask", "the mIoU check needs the conditioning mask")
            else:
                live.append(s)
        if not live:
            return samples
        cos = self.cosines(live) if p.check_cosine else [None] * len(live)
        miou = self.mious(live) if p.check_miou else [None] * len(live)
        for s, c, m in zip(live, cos, miou):
            scores = dict(s.meta.get("scores", {}))
            if c is not None:
                scores.update(cosine=c, embedding=p.embedding)
            if m is not None:
                scores["miou"] = m
            s.meta["scores"] = scores
            detail = ", ".join(f"{k} {v}" for k, v in scores.items())
            if c is not None and not c > p.eps:
                s.reject(label, "low_cosine", f"{detail}; needs cosine > {p.eps}")
            elif m is not None and not m >= p.miou_threshold:
                s.reject(label, "low_miou", f"{detail}; needs miou >= {p.miou_threshold}")
        return samples
