"""The Mask Generator: pseudo-labels from GroundingDINO boxes turned into masks by SAM.

GroundingDINO (transformers' `GroundingDinoForObjectDetection`) is prompted with the class names
("sofa. chair. potted plant.") and gives boxes; SAM (segment-anything) turns every box of an image into
a mask in one batched decoder call; the masks become one semantic mask where, pixel by pixel, the
highest-scoring mask wins (never the last one written). Pixels no mask covers are ignore (255).

A box is kept when its best token probability exceeds `box_threshold` (GroundingDINO's box score, also
the instance's score); its class is the class whose prompt tokens score highest, if that exceeds
`text_threshold`. Boxes of one class overlapping by more than `nms_threshold` IoU are merged.

`MaskGenerator` is shared: the `maskgen` stage labels images that have no mask (or all of them), and the
`select` stage labels synthetic images to compare with the mask they were generated from.
"""

from __future__ import annotations

import itertools

from functools import partial
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from factory.sources.classes import ClassSet
from factory.models.loading import (fill_once, from_pretrained, model_cache_dir, resolve_model_path, tiny_bert_tokenizer,
                            torch_dtype)
from factory.models.random_weights import GROUNDING_DINO, PROFILE_HELP, random_id
from factory.sample import Sample
from factory.stages import Stage, register_stage

TINY_DETECTOR = "grounding-dino-v2"
TINY_SAM = "sam-v1"
SAM_VIT_H = "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth"
# Dataset names that are one glued word read badly as detector prompts.
DEFAULT_PHRASES = {"pottedplant": "potted plant", "tvmonitor": "tv monitor", "diningtable": "dining table",
                   "aeroplane": "airplane"}


class DetectionParams(BaseModel):
    """What decides the pseudo-labels; shared by the maskgen and select stages."""

    model_config = ConfigDict(extra="forbid")

    box_threshold: float = Field(0.35, ge=0, le=1, description="keep a box if its best token probability is above")
    text_threshold: float = Field(0.25, ge=0, le=1, description="label a box with a class only if that class's "
                                  "tokens score above; boxes with no such class are dropped")
    nms_threshold: float = Field(0.7, gt=0, le=1, description="boxes of one class overlapping more are merged")
    max_boxes: int = Field(100, ge=1, description="most boxes per image given to SAM, highest scores first")
    phrases: dict[str, str] = Field(default_factory=lambda: dict(DEFAULT_PHRASES),
                                    description="class name -> text the detector is prompted with")
    skip_classes: list[str] = Field(default_factory=lambda: ["background"],
                                    description="classes never prompted for: no object to find")
    detector_batch_size: int = Field(8, ge=1, description="(image, prompt) pairs per detector call")
    sam_batch_size: int = Field(4, ge=1, description="images per SAM image-encoder call")


class MaskGenModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    profile: Literal["pretrained", "tiny", "random"] = Field(
        "pretrained", description=PROFILE_HELP + " (GroundingDINO-B, SAM of sam_type)")
    detector: str = Field("IDEA-Research/grounding-dino-base", description="hub id, local dir or s3:// URL")
    sam: str = Field(SAM_VIT_H, description="SAM checkpoint .pth: local path or fsspec URL")
    sam_type: Literal["vit_h", "vit_l", "vit_b"] = Field("vit_h", description="segment-anything registry size")
    dtype: Literal["auto", "fp16", "bf16", "fp32"] = "fp32"
    storage_options: dict = Field(default_factory=dict, description="fsspec options for object-store URLs")


class PseudoLabel(NamedTuple):
    mask: np.ndarray  # (H, W) class ids of the class set; ignore where no mask landed
    instances: np.ndarray  # (H, W) int32, instances 1..n by descending score, 0 = none
    scores: list[float]  # score of instance i + 1
    class_ids: list[int]  # class id of instance i + 1


def _tiny_sam():
    import torch
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    # segment-anything's own layout (build_sam.py) at test sizes: a 256 px encoder, 16x16 embeddings.
    dim, size, patch = 32, 256, 16
    return Sam(
        image_encoder=ImageEncoderViT(
            depth=2, embed_dim=64, img_size=size, mlp_ratio=4, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=2, patch_size=patch, qkv_bias=True, use_rel_pos=True, global_attn_indexes=(1,),
            window_size=4, out_chans=dim,
        ),
        prompt_encoder=PromptEncoder(embed_dim=dim, image_embedding_size=(size // patch, size // patch),
                                     input_image_size=(size, size), mask_in_chans=4),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3, transformer=TwoWayTransformer(depth=2, embedding_dim=dim, mlp_dim=64, num_heads=2),
            transformer_dim=dim, iou_head_depth=3, iou_head_hidden_dim=32,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    ).eval()


def _build_tiny_sam(target: Path) -> None:
    import torch

    torch.manual_seed(0)
    torch.save(_tiny_sam().state_dict(), target / "sam_tiny.pth")


def _build_tiny_detector(target: Path) -> None:
    import torch
    from transformers import (BertConfig, GroundingDinoConfig, GroundingDinoForObjectDetection,
                              GroundingDinoImageProcessor, GroundingDinoProcessor, SwinConfig)

    tokenizer = tiny_bert_tokenizer()
    backbone = SwinConfig(embed_dim=32, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], window_size=4, image_size=64,
                          out_features=["stage2", "stage3", "stage4"])
    text = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=37, max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id)
    # decoder_layers >= 2: with one layer the box-head weight tying fails at init.
    config = GroundingDinoConfig(
        backbone_config=backbone, text_config=text, d_model=32, encoder_layers=1, decoder_layers=2,
        encoder_ffn_dim=32, decoder_ffn_dim=32, encoder_attention_heads=2, decoder_attention_heads=2,
        num_queries=20, encoder_n_points=2, decoder_n_points=2,
    )
    torch.manual_seed(0)
    GroundingDinoForObjectDetection(config).save_pretrained(str(target))
    processor = GroundingDinoProcessor(
        # 128 px: at 64 px the smallest feature level is 1x1, which GroupNorm cannot normalise alone.
        image_processor=GroundingDinoImageProcessor(size={"shortest_edge": 128, "longest_edge": 192}),
        tokenizer=tokenizer,
    )
    processor.save_pretrained(str(target))


def _random_detector(device: str, dtype):
    """GroundingDINO-B (Swin-B, BERT-base) with random weights; its processor at the real 800-1333 px."""
    from transformers import GroundingDinoForObjectDetection, GroundingDinoProcessor

    from factory.models import random_weights

    tokenizer = tiny_bert_tokenizer()
    config = random_weights.transformers_config(GROUNDING_DINO)
    random_weights.align_special_tokens(config.text_config, tokenizer)
    processor = GroundingDinoProcessor(image_processor=random_weights.image_processor(GROUNDING_DINO),
                                       tokenizer=tokenizer)
    return random_weights.transformers_model(GroundingDinoForObjectDetection, config, device, dtype), processor


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
    sam = _tiny_sam()
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
        semantic.cpu().numpy().astype(dtype), instances.cpu().numpy().astype(np.int32),
        [round(float(s), 6) for s in scores[won]], [int(c) for c in class_ids[won]],
    )


class MaskGenerator:
    """GroundingDINO + SAM, loaded once; `generate` labels a batch of images with given class names."""

    def __init__(self, cfg: MaskGenModelConfig, settings: DetectionParams, classes: ClassSet, device: str):
        import torch
        from segment_anything import SamPredictor
        from transformers import GroundingDinoForObjectDetection, GroundingDinoProcessor

        self.settings, self.classes, self.device = settings, classes, device
        self.dtype = torch_dtype(cfg.dtype, device)
        if cfg.profile == "random":
            self.detector, self.processor = _random_detector(device, self.dtype)
            sam_type, sam_path = cfg.sam_type, None
        elif cfg.profile == "tiny":
            det_ref = det_path = str(fill_once(model_cache_dir() / "tiny" / TINY_DETECTOR, _build_tiny_detector))
            sam_path = str(fill_once(model_cache_dir() / "tiny" / TINY_SAM, _build_tiny_sam) / "sam_tiny.pth")
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
        self.autocast = partial(torch.autocast, device_type="cuda", dtype=self.dtype,
                                enabled=device.startswith("cuda") and self.dtype != torch.float32)
        self._token_counts: dict[str, int] = {}

    @staticmethod
    def model_ids(cfg: MaskGenModelConfig) -> dict[str, str]:
        if cfg.profile == "tiny":
            return {"detector": f"tiny:{TINY_DETECTOR}", "sam": f"tiny:{TINY_SAM}"}
        if cfg.profile == "random":
            return {"detector": random_id(GROUNDING_DINO), "sam": f"random:sam_{cfg.sam_type}"}
        return {"detector": cfg.detector, "sam": f"{cfg.sam_type}:{cfg.sam}"}

    def generate(self, images: list[np.ndarray], class_names: list[str] | list[list[str]]) -> list[PseudoLabel]:
        """One pseudo-label per image; `class_names` is one list for every image, or one list per image."""
        import torch

        per_image = class_names if class_names and isinstance(class_names[0], list) else [class_names] * len(images)
        skip = set(self.settings.skip_classes)
        per_image = [[n for n in names if n not in skip] for names in per_image]
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
        chunks, used = [[]], 0
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
        for _, same_size in itertools.groupby(pairs, key=lambda p: images[p[0]].shape[:2]):
            same_size = list(same_size)
            n = s.detector_batch_size
            batches += [same_size[k:k + n] for k in range(0, len(same_size), n)]
        found: list[list[tuple]] = [[] for _ in images]
        for batch in batches:
            texts, spans = zip(*(self._prompt(chunk) for _, chunk in batch))
            text = self.processor.tokenizer(list(texts), padding="max_length", truncation=True,
                                            max_length=self.detector.config.max_text_len,
                                            return_offsets_mapping=True, return_tensors="pt").to(self.device)
            offsets = text.pop("offset_mapping")
            pixels = self.processor.image_processor([images[i] for i, _ in batch], return_tensors="pt")
            with torch.no_grad():
                out = self.detector(**text, pixel_values=pixels["pixel_values"].to(self.device, self.dtype),
                                    pixel_mask=pixels["pixel_mask"].to(self.device))
            probs = out.logits[:, :, :offsets.shape[1]].float().sigmoid()  # (pairs, queries, tokens)
            # A token counts when it is text (not [CLS], [SEP] or padding, which have empty offsets).
            real = (offsets[..., 1] > offsets[..., 0]) & text["attention_mask"].bool()
            for b, (i, chunk) in enumerate(batch):
                in_span = torch.stack([(offsets[b, :, 0] >= a) & (offsets[b, :, 1] <= e) & real[b]
                                       for a, e in spans[b]])  # (names, tokens)
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
            chunk = images[start:start + self.settings.sam_batch_size]
            resized = [transform.apply_image(im) for im in chunk]
            batch = torch.stack([
                sam.preprocess(torch.as_tensor(r, device=self.device).permute(2, 0, 1)) for r in resized
            ])
            features = sam.image_encoder(batch)
            for j, r in enumerate(resized):
                yield features[j:j + 1], r.shape[:2]

    def _segment(self, image: np.ndarray, encoded, boxes):
        """(N, H, W) bool masks, one per box, from a single batched decoder call."""
        features, input_size = encoded
        p = self.predictor
        p.reset_image()
        p.features, p.original_size, p.input_size, p.is_image_set = features, image.shape[:2], tuple(input_size), True
        masks, _, _ = p.predict_torch(
            point_coords=None, point_labels=None,
            boxes=p.transform.apply_boxes_torch(boxes.to(self.device), image.shape[:2]), multimask_output=False,
        )
        return masks[:, 0]


class MaskGenParams(DetectionParams):
    mode: Literal["fill_missing", "replace"] = Field(
        "fill_missing", description="fill_missing: label only samples without a mask; replace: label every sample",
    )
    classes: list[str] | None = Field(
        None, description="class names to detect; default every class of the source's class set "
        "(less skip_classes)",
    )


@register_stage
class MaskGenStage(Stage):
    name = "maskgen"
    uses_gpu = True
    Params = MaskGenParams
    Model = MaskGenModelConfig

    def setup(self) -> None:
        classes = self.context.classes
        wanted = self.params.classes if self.params.classes is not None else list(classes.names)
        # Canonical names: a synonym in the spec resolves to the class it names (KeyError if none).
        self.names = [classes.names[classes.index(n)] for n in wanted]
        self.generator = MaskGenerator(self.model, self.params, classes, self.context.device)

    def model_ids(self) -> dict[str, str]:
        return MaskGenerator.model_ids(self.model)

    def process(self, samples: list[Sample]) -> list[Sample]:
        todo = [s for s in samples if s.image is not None and (self.params.mode == "replace" or s.mask is None)]
        for s in samples:
            s.meta["pseudo_label"] = False
        for s, label in zip(todo, self.generator.generate([s.image for s in todo], self.names)):
            s.mask, s.instances = label.mask, label.instances
            s.meta["pseudo_label"] = True
            s.meta["pseudo_instances"] = {
                "classes": [self.context.classes.names[c] for c in label.class_ids], "scores": label.scores,
            }
        return samples
