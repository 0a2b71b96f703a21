"""Scores every sample it sees: scene density, label fidelity and text-image agreement (SENSE).

Any recipe can end with this stage. It writes `meta["scores"]` (named fields, `null` where an input is
missing, never 0) and `meta["scoring"]` (what the scores were computed from):

    density    from the sample's mask and instance map (`factory.output.scores.density`); a sample without a mask
               is measured on its auto-label instead, when there is one
    fidelity   miou and boundary_f between the sample's mask (the target, e.g. the mask a ControlNet was
               conditioned on) and the auto-label of its image; clip_score between the image and
               meta["prompt"], when a prompt exists

The auto-label is what `params.auto_label` makes: any labeling stage (kind, model, params, as in a job
spec; e.g. `maskgen`) run here on a copy of each sample with its mask removed. The copy's new mask is
the auto-label. Without `auto_label`, miou and boundary_f are null. The labeler runs on this stage's
device, so give this stage a GPU when the labeler needs one.

CLIP score = max(0, 100 * cosine(image embedding, text embedding)), the usual definition; CLIP reads
77 tokens, so longer prompts are truncated and `scoring.clip_prompt_truncated` says so.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
from PIL import Image
from pydantic import Field, field_validator

from factory.models.loading import Dtype, ModelConfig, from_pretrained, resolve_model_path, torch_dtype
from factory.models.random_vision import random_clip
from factory.models.random_weights import CLIP_L, random_id
from factory.models.tiny_vision import TINY_CLIP, tiny_clip_dir
from factory.models.weights import WeightsSource
from factory.output.scores import density, fidelity
from factory.sample import BadSample, Sample
from factory.schema import StrictModel
from factory.stages import Stage, StageContext, register_stage, resolve_stage


class AutoLabelSpec(StrictModel):
    kind: str = Field(description="a labeling stage: registered name (maskgen) or module:Class")
    model: dict[str, Any] = Field(default_factory=dict)
    params: dict[str, Any] = Field(default_factory=dict)

    def build(self, context: StageContext) -> Stage:
        cls = resolve_stage(self.kind)
        return cls(cls.Params.model_validate(self.params), cls.Model.model_validate(self.model), context)


class ScoreParams(StrictModel):
    boundary_tolerance: float = Field(2, ge=0, description="boundary F-score tolerance, in pixels")
    min_component_pixels: int = Field(
        1, ge=1, description="density without instance ids: connected regions smaller than this are not instances"
    )
    clip: bool = Field(True, description="compute the CLIP score of samples with a prompt")
    auto_label: AutoLabelSpec | None = Field(None, description="the labeling stage that makes auto-labels")

    @field_validator("auto_label")
    @classmethod
    def _labeler_exists(cls, spec):
        if spec is not None:
            try:
                stage_cls = resolve_stage(spec.kind)
            except KeyError as e:
                raise ValueError(str(e.args[0])) from None
            stage_cls.Params.model_validate(spec.params)
            stage_cls.Model.model_validate(spec.model)
        return spec


class ScoreModelConfig(ModelConfig):
    clip: str = Field("openai/clip-vit-large-patch14", description="hub id, local dir or s3:// URL of a CLIP model")
    dtype: Dtype = "auto"


@register_stage
class ScoreStage(Stage[ScoreParams, ScoreModelConfig]):
    name = "score"
    uses_gpu = True  # CLIP and the labeler run faster on one; everything else is numpy
    extra = "models"
    Params = ScoreParams
    Model = ScoreModelConfig

    def setup(self) -> None:
        self.labeler = None
        if self.params.auto_label is not None:
            self.labeler = self._labeler(self.params.auto_label)
            self.labeler.setup()
            if self.labeler.variants_per_input() != 1:
                raise ValueError(f"auto_label stage {self.params.auto_label.kind!r} must return one sample per input")
        self.clip = self.processor = None
        if self.params.clip:
            from transformers import AutoProcessor, CLIPModel

            dtype = torch_dtype(self.model.dtype, self.context.device)
            if self.model.profile == "random":
                self.clip, self.processor = random_clip(self.context.device, dtype)
                return
            if self.model.profile == "tiny":
                ref = path = tiny_clip_dir()
            else:
                ref = self.model.clip
                path = resolve_model_path(ref, self.model.storage_options)
            self.processor = from_pretrained(AutoProcessor, ref, path)
            self.clip = from_pretrained(CLIPModel, ref, path, dtype=dtype).to(self.context.device).eval()

    def _labeler(self, spec: AutoLabelSpec) -> Stage:
        ctx = self.context
        labeler_ctx = StageContext(
            label=f"{ctx.label}.auto_label", job_seed=ctx.job_seed, classes=ctx.classes, device=ctx.device
        )
        return spec.build(labeler_ctx)

    def model_ids(self) -> dict[str, str]:
        ids = {}
        if self.params.clip:
            ids["clip"] = {"tiny": f"tiny:{TINY_CLIP}", "random": random_id(CLIP_L)}.get(
                self.model.profile, self.model.clip
            )
        if self.params.auto_label is not None:
            ids.update({f"auto_label.{k}": v for k, v in self._labeler(self.params.auto_label).model_ids().items()})
        return ids

    def weight_sources(self) -> dict[str, WeightsSource]:
        """This section's CLIP, and the auto-labeller's models with its own section's options and revisions."""
        own = {k: v for k, v in self.model_ids().items() if not k.startswith("auto_label.")}
        sources = self.model.weight_sources(own)
        if self.params.auto_label is not None:
            labeler = self._labeler(self.params.auto_label).weight_sources()
            sources.update({f"auto_label.{k}": v for k, v in labeler.items()})
        return sources

    def process(self, samples: list[Sample]) -> list[Sample]:
        ignore = self.context.classes.ignore_index
        auto, clip = self._auto_labels(samples), self._clip_scores(samples)
        for sample, (label, label_instances, label_error), (clip_score, clip_info) in zip(samples, auto, clip):
            if label is not None and sample.mask is not None and label.shape != sample.mask.shape:
                label = np.asarray(Image.fromarray(label).resize(sample.mask.shape[::-1], Image.Resampling.NEAREST))
            # Density of the sample's own mask; of its auto-label when it has none (unlabeled t2i output).
            if sample.mask is not None:
                measured, instances, density_from = sample.mask, sample.instances, "mask"
            elif label is not None:
                measured, instances, density_from = label, label_instances, "auto_label"
            else:
                measured, instances, density_from = None, None, None
            fid = fidelity(sample.mask, label, self.params.boundary_tolerance, ignore)
            fid["clip_score"] = clip_score
            # Merged, not replaced: an earlier selection stage's scores (cosine, miou) stay in the json.
            sample.meta["scores"] = {
                **sample.meta.get("scores", {}),
                "density": density(measured, instances, ignore, self.params.min_component_pixels),
                "fidelity": fid,
            }
            sample.meta["scoring"] = {
                "stage": self.context.label,
                "density_from": density_from,
                "instances_from": None
                if measured is None
                else ("instance_ids" if instances is not None else "components"),
                "boundary_tolerance": self.params.boundary_tolerance,
                "auto_label": self.params.auto_label.kind if self.params.auto_label else None,
                "auto_label_error": label_error,
                **clip_info,
            }
        return samples

    def _auto_labels(self, samples: list[Sample]) -> list[tuple[np.ndarray | None, np.ndarray | None, str | None]]:
        """(auto-label, its instances, why there is none) per sample."""
        if self.labeler is None:
            return [(None, None, None)] * len(samples)
        copies = [replace(s, mask=None, instances=None, meta=dict(s.meta)) for s in samples]
        try:
            labeled = self.labeler.process(copies)
        except BadSample as e:
            if len(copies) > 1:  # label one by one, so one bad image costs only its own auto-label
                return [r for s in samples for r in self._auto_labels([s])]
            # The labeler refused this image: fidelity stays null, the sample itself is still good. Any
            # other error (CUDA, storage, a bug) is the stage's own failure, retried like any other.
            return [(None, None, str(e)[:200])]
        out: list[tuple[np.ndarray | None, np.ndarray | None, str | None]] = []
        for s in labeled:
            if s.error is not None:
                out.append((None, None, s.error["reason"]))
            elif s.mask is None:
                out.append((None, None, "no_mask"))
            else:
                out.append((s.mask, s.instances, None))
        return out

    def _clip_scores(self, samples: list[Sample]) -> list[tuple[float | None, dict]]:
        if self.clip is None:
            return [(None, {})] * len(samples)
        import torch

        prompted = [i for i, s in enumerate(samples) if s.meta.get("prompt")]
        out: list[tuple[float | None, dict]] = [(None, {"clip_prompt_tokens": None})] * len(samples)
        if not prompted:
            return out
        prompts = [str(samples[i].meta["prompt"]) for i in prompted]
        assert self.processor is not None  # loaded with self.clip
        tokenizer = self.processor.tokenizer
        limit = tokenizer.model_max_length
        inputs = self.processor(
            text=prompts,
            images=[Image.fromarray(samples[i].array("image")) for i in prompted],
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=limit,
        ).to(self.context.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.clip.dtype)
        with torch.no_grad():
            result = self.clip(**inputs)
        image = torch.nn.functional.normalize(result.image_embeds.float(), dim=-1)
        text = torch.nn.functional.normalize(result.text_embeds.float(), dim=-1)
        scores = (100 * (image * text).sum(-1)).clamp(min=0).tolist()
        for i, prompt, score in zip(prompted, prompts, scores):
            n = len(tokenizer(prompt, truncation=False).input_ids)
            out[i] = (float(score), {"clip_prompt_tokens": n, "clip_prompt_truncated": n > limit})
        return out
