"""PLACEHOLDER"""

from __future__ import annotations

import itertools
from functools import partial
from typing import Literal, NamedTuple

import numpy as np
from pydantic import Field

from factory.models.cache import fill_once, model_cache_dir
from factory.models.loading import (
    PROFILE_HELP,
    Dtype,
    ModelConfig,
    Profile,
    from_pretrained,
    resolve_model_path,
    torch_dtype,
)
from factory.models.random_vision import random_detector
from factory.models.random_weights import GROUNDING_DINO, random_id
from factory.models.tiny_vision import TINY_DETECTOR, TINY_SAM, build_tiny_detector, build_tiny_sam, tiny_sam
from factory.schema import StrictModel
from factory.sources.classes import ClassSet

SAM_VIT_H = "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth"


# Dataset names that are one glued word read badly as detector prompts.
DEFAULT_PHRASES = {
    "pottedplant": "potted plant",
    "tvmonitor": "tv monitor",
    "diningtable": "dining table",
    "aeroplane": "airplane",
}


class DetectionParams(StrictModel):
    """What decides the pseudo-labels; shared by the maskgen and select stages."""

    box_threshold: float = Field(0.35, ge=0, le=1, description="keep a box if its best token probability is above")
    text_threshold: float = Field(
        0.25,
        ge=0,
        le=1,
        description="label a box with a class only if that class's "
        "tokens score above; boxes with no such class are dropped",
    )
    nms_threshold: float = Field(0.7, gt=0, le=1, description="boxes of one class overlapping more are merged")
    max_boxes: int = Field(100, ge=1, description="most boxes per image given to SAM, highest scores first")
    phrases: dict[str, str] = Field(
        default_factory=lambda: dict(DEFAULT_PHRASES), description="class name -> text the detector is prompted with"
    )
    skip_classes: list[str] = Field(
        default_factory=lambda: ["background"], description="classes never prompted for: no object to find"
    )
    detector_batch_size: int = Field(8, ge=1, description="(image, prompt) pairs per detector call")
    sam_batch_size: int = Field(4, ge=1, description="images per SAM image-encoder call")


class MaskGenModelConfig(ModelConfig):
    profile: Profile = Field("pretrained", description=PROFILE_HELP + " (GroundingDINO-B, SAM of sam_type)")
    detector: str = Field("IDEA-Research/grounding-dino-base", description="hub id, local dir or s3:// URL")
    sam: str = Field(SAM_VIT_H, description="SAM checkpoint .pth: local path or fsspec URL")
    sam_type: Literal["vit_h", "vit_l", "vit_b"] = Field("vit_h", description="segment-anything registry size")
    dtype: Dtype = "fp32"


class PseudoLabel(NamedTuple):
    mask: np.ndarray  # (H, W) class ids of the class set; ignore where no mask landed
    instances: np.ndarray  # (H, W) int32, instances 1..n by descending score, 0 = none
    scores: list[float]  # score of instance i + 1
    class_ids: list[int]  # class id of instance i + 1


def build_sam(sam_type: str, checkpoint: str | None, device: str = "cpu"):
    """A SAM model from a state-dict checkpoint: the registry sizes, or 'tiny'; no checkpoint: random weights."""
    import torch
    from segment_anything import sam_model_registry

    if checkpoint is None:
        from factory.models.random_weights import building

        with building(device, torch.float32):
            return sam_model_registry[sam_type]().eval()
    if sam_type != "tiny":
        return sam_model_registry[sam_type](checkpoint=checkpoint).eval()
    sam = tiny_sam()
    sam.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
    return sam


def merge_masks(masks, scores, class_ids, ignore: int, dtype) -> PseudoLabel:
    """One semantic mask from N overlapping masks: each pixel takes the highest-scoring mask covering it.

    `masks` (N, H, W) bool, `scores` (N,), `class_ids` (N,); torch tensors or arrays, on any device.
    Ties go to the mask listed first. Masks that win no pixel are dropped; the others are numbered
    1..n by descending score.
    """
    import torch

    masks = torch.as_tensor(masks, dtype=torch.bool)
    scores = torch.as_tensor(scores, dtype=torch.float32, device=masks.device)
    class_ids = torch.as_tensor(class_ids, dtype=torch.int64, device=masks.device)
    covered = masks.any(0)
    if len(scores) == 0:
        return PseudoLabel(np.full(covered.shape, ignore, dtype), np.zeros(covered.shape, np.int32), [], [])
    order = torch.sort(scores, descending=True, stable=True).indices
    masks, scores, class_ids = masks[order], scores[order], class_ids[order]
    # max returns the first maximal index: after the sort, the highest score, then the earlier mask.
    best = torch.where(masks, scores[:, None, None], -torch.inf).max(0).indices
    won = torch.zeros(len(scores), dtype=torch.bool, device=masks.device)
    won[best[covered]] = True
    number = torch.zeros(len(scores), dtype=torch.int64, device=masks.device)
    number[won] = torch.arange(1, int(won.sum()) + 1, device=masks.device)
    instances = torch.where(covered, number[best], 0)
    semantic = torch.where(covered, class_ids[best], ignore)
    return PseudoLabel(
        semantic.cpu().numpy().astype(dtype),
        instances.cpu().numpy().astype(np.int32),
        [round(float(s), 6) for s in scores[won]],
        [int(c) for c in class_ids[won]],
    )


class MaskGenerator:
    """GroundingDINO + SAM, loaded once; `generate` labels a batch of images with given class names."""

    def __init__(self, cfg: MaskGenModelConfig, settings: DetectionParams, classes: ClassSet, device: str):
        import torch
        from segment_anything import SamPredictor
        from transformers import GroundingDinoForObjectDetection, GroundingDinoProcessor

        self.settings, self.classes, self.device = settings, classes, device
        self.dtype = torch_dtype(cfg.dtype, device)
        sam_type: str  # a segment-anything registry size, or "tiny"
        if cfg.profile == "random":
            self.detector, self.processor = random_detector(device, self.dtype)
            sam_type, sam_path = cfg.sam_type, None
        elif cfg.profile == "tiny":
            det_ref = det_path = str(fill_once(model_cache_dir() / "tiny" / TINY_DETECTOR, build_tiny_detector))
            sam_path = str(fill_once(model_cache_dir() / "tiny" / TINY_SAM, build_tiny_sam) / "sam_tiny.pth")
            sam_type = "tiny"
        else:
            det_ref, sam_type = cfg.detector, cfg.sam_type
            det_path = resolve_model_path(cfg.detector, cfg.storage_options)
            sam_path = resolve_model_path(cfg.sam, cfg.storage_options)
        if cfg.profile != "random":
            self.processor = from_pretrained(GroundingDinoProcessor, det_ref, det_path)
            self.detector = from_pretrained(GroundingDinoForObjectDetection, det_ref, det_path, dtype=self.dtype)
        self.detector.to(device).eval()
        # Inference only: no parameter needs a gradient (and FLOP counting traces outputs that would).
        self.predictor = SamPredictor(build_sam(sam_type, sam_path, device).to(device).requires_grad_(False))
        # SAM's checkpoints are fp32: lower precision is applied by autocast on GPUs only.
        self.autocast = partial(
            torch.autocast,
            device_type="cuda",
            dtype=self.dtype,
            enabled=device.startswith("cuda") and self.dtype != torch.float32,
        )
        self._token_counts: dict[str, int] = {}

    @staticmethod
    def model_ids(cfg: MaskGenModelConfig) -> dict[str, str]:
        if cfg.profile == "tiny":
            return {"detector": f"tiny:{TINY_DETECTOR}", "sam": f"tiny:{TINY_SAM}"}
        if cfg.profile == "random":
            return {"detector": random_id(GROUNDING_DINO), "sam": f"random:sam_{cfg.sam_type}"}
        return {"detector": cfg.detector, "sam": cfg.sam}

    def generate(self, images: list[np.ndarray], class_names: list[str] | list[list[str]]) -> list[PseudoLabel]:
        """One pseudo-label per image; `class_names` is one list for every image, or one list per image."""
        import torch

        lists = class_names if class_names and isinstance(class_names[0], list) else [class_names] * len(images)
        skip = set(self.settings.skip_classes)
        per_image = [[n for n in names if isinstance(n, str) and n not in skip] for names in lists]
        detections = self.detect(images, per_image)
        boxed = [i for i, d in enumerate(detections) if len(d[1])]
        ignore, dtype = self.classes.ignore_index, self.classes.mask_dtype
        out = [merge_masks(np.zeros((0, *im.shape[:2]), bool), [], [], ignore, dtype) for im in images]
        with torch.no_grad(), self.autocast():
            for i, features in zip(boxed, self._encode([images[i] for i in boxed])):
                boxes, scores, class_ids = detections[i]
                masks = self._segment(images[i], features, boxes)
                out[i] = merge_masks(masks, scores, class_ids, ignore, dtype)
        return out

    # ------------------------------------------------------------------------------- detection

    def _prompt(self, names: list[str]) -> tuple[str, list[tuple[int, int]]]:
        """'sofa. potted plant.' and the character span of each name in it."""
        text, spans = "", []
        for name in names:
            phrase = self.settings.phrases.get(name, name).lower()
            spans.append((len(text), len(text) + len(phrase)))
            text += phrase + ". "
        return text.rstrip(), spans

    def _chunks(self, names: list[str]) -> list[list[str]]:
        """Names split so each prompt fits the detector's text length (150 ADE classes need several)."""
        budget = self.detector.config.max_text_len - 2  # [CLS] and [SEP]
        chunks: list[list[str]] = [[]]
        used = 0
        for name in names:
            if name not in self._token_counts:
                phrase = self.settings.phrases.get(name, name).lower() + "."
                self._token_counts[name] = len(self.processor.tokenizer(phrase, add_special_tokens=False).input_ids)
            cost = self._token_counts[name]
            if chunks[-1] and used + cost > budget:
                chunks.append([])
                used = 0
            chunks[-1].append(name)
            used += cost
        return [c for c in chunks if c]

    def detect(self, images: list[np.ndarray], names_per_image: list[list[str]]):
        """Per image: (boxes (n, 4) xyxy pixels, scores (n,), class ids (n,)) after NMS, best first."""
        import torch
        from torchvision.ops import batched_nms, box_convert

        s = self.settings
        pairs = [(i, chunk) for i, names in enumerate(names_per_image) for chunk in self._chunks(names)]
        # Only images of one size share a call, and text is padded to one fixed length: otherwise an
        # image's boxes would depend on what else was in its batch (padding changes GroundingDINO's
        # features), and a resumed shard would not label its images the same way.
        pairs.sort(key=lambda p: images[p[0]].shape[:2])
        batches = []
        for _, group in itertools.groupby(pairs, key=lambda p: images[p[0]].shape[:2]):
            same_size = list(group)
            n = s.detector_batch_size
            batches += [same_size[k : k + n] for k in range(0, len(same_size), n)]
        found: list[list[tuple]] = [[] for _ in images]
        for batch in batches:
            texts, spans = zip(*(self._prompt(chunk) for _, chunk in batch))
            text = self.processor.tokenizer(
                list(texts),
                padding="max_length",
                truncation=True,
                max_length=self.detector.config.max_text_len,
                return_offsets_mapping=True,
                return_tensors="pt",
            ).to(self.device)
            offsets = text.pop("offset_mapping")
            pixels = self.processor.image_processor([images[i] for i, _ in batch], return_tensors="pt")
            with torch.no_grad():
                out = self.detector(
                    **text,
                    pixel_values=pixels["pixel_values"].to(self.device, self.dtype),
                    pixel_mask=pixels["pixel_mask"].to(self.device),
                )
            probs = out.logits[:, :, : offsets.shape[1]].float().sigmoid()  # (pairs, queries, tokens)
            # A token counts when it is text (not [CLS], [SEP] or padding, which have empty offsets).
            real = (offsets[..., 1] > offsets[..., 0]) & text["attention_mask"].bool()
            for b, (i, chunk) in enumerate(batch):
                in_span = torch.stack(
                    [(offsets[b, :, 0] >= a) & (offsets[b, :, 1] <= e) & real[b] for a, e in spans[b]]
                )  # (names, tokens)
                box_score = torch.where(real[b], probs[b], 0).max(-1).values
                class_score, best = torch.where(in_span[None], probs[b][:, None, :], 0).max(-1).values.max(-1)
                keep = (box_score > s.box_threshold) & (class_score > s.text_threshold)
                h, w = images[i].shape[:2]
                size = torch.tensor([w, h, w, h], dtype=torch.float32, device=self.device)
                boxes = box_convert(out.pred_boxes[b][keep].float(), "cxcywh", "xyxy") * size
                boxes = torch.minimum(boxes.clamp_min(0), size)
                ids = torch.tensor([self.classes.index(n) for n in chunk], device=self.device)[best[keep]]
                found[i].append((boxes, box_score[keep], ids))
        result = []
        for parts in found:
            if not parts:
                result.append((torch.zeros((0, 4)), torch.zeros(0), torch.zeros(0, dtype=torch.int64)))
                continue
            boxes, scores, ids = (torch.cat(p) for p in zip(*parts))
            keep = batched_nms(boxes, scores, ids, s.nms_threshold)[: s.max_boxes]
            result.append((boxes[keep], scores[keep], ids[keep]))
        return result

    # ------------------------------------------------------------------------------- segmentation

    def _encode(self, images: list[np.ndarray]):
        """SAM image embeddings, `sam_batch_size` images per encoder call; yields one per image in order.

        `SamPredictor.set_image` encodes one image per call; the encoder accepts a batch, so the images are
        encoded together here and each image's features are handed to the predictor as `set_image` would.
        """
        import torch

        sam, transform = self.predictor.model, self.predictor.transform
        for start in range(0, len(images), self.settings.sam_batch_size):
            chunk = images[start : start + self.settings.sam_batch_size]
            resized = [transform.apply_image(im) for im in chunk]
            batch = torch.stack(
                [sam.preprocess(torch.as_tensor(r, device=self.device).permute(2, 0, 1)) for r in resized]
            )
            features = sam.image_encoder(batch)
            for j, r in enumerate(resized):
                yield features[j : j + 1], r.shape[:2]

    def _segment(self, image: np.ndarray, encoded, boxes):
        """(N, H, W) bool masks, one per box, from a single batched decoder call."""
        features, input_size = encoded
        p = self.predictor
        p.reset_image()
        p.features, p.original_size, p.input_size, p.is_image_set = features, image.shape[:2], tuple(input_size), True
        masks, _, _ = p.predict_torch(
            point_coords=None,
            point_labels=None,
            boxes=p.transform.apply_boxes_torch(boxes.to(self.device), image.shape[:2]),
            multimask_output=False,
        )
        return masks[:, 0]
