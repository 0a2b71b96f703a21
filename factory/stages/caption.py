"""Caption every real image with BLIP (or BLIP-2): the first step of the Diffusion Synthesis recipe.

The caption goes into `meta["caption"]`, where the prompt stage reads it and the shard json keeps it.
Decoding is greedy (or beam search) and never sampled, so a regenerated shard gets the same captions.
All images of a batch go through one `generate` call: the processor resizes them to the model's input
size, so images of any size share the call.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from factory.models.cache import fill_once, model_cache_dir
from factory.models.loading import (
    Dtype,
    ModelConfig,
    from_pretrained,
    resolve_model_path,
    torch_dtype,
)
from factory.models.random_vision import random_captioner
from factory.models.random_weights import BLIP, random_id
from factory.models.tiny_vision import TINY_BLIP, TINY_BLIP2, build_tiny_blip, build_tiny_blip2
from factory.sample import Sample
from factory.schema import StrictModel
from factory.stages import Stage, register_stage

DEFAULT_MODELS = {"blip": "Salesforce/blip-image-captioning-large", "blip2": "Salesforce/blip2-opt-2.7b"}


class CaptionParams(StrictModel):
    max_new_tokens: int = Field(30, ge=1, description="longest caption, in tokens")
    num_beams: int = Field(1, ge=1, description="1 = greedy decoding; more = beam search (still deterministic)")
    prompt: str | None = Field(
        None,
        description="text the caption continues (BLIP: kept as the caption's start, e.g. 'a photography "
        "of'; BLIP-2: a question or instruction, not repeated in the caption)",
    )


class CaptionModelConfig(ModelConfig):
    family: Literal["blip", "blip2"] = "blip"
    model: str | None = Field(
        None,
        description="hub id, local dir or s3:// URL; default Salesforce/blip-image-captioning-large "
        "(blip) or Salesforce/blip2-opt-2.7b (blip2)",
    )
    dtype: Dtype = "auto"


def load_captioner(cfg: CaptionModelConfig, device: str):
    """(model, processor) for the configured family: real or tiny through `from_pretrained`, or random."""
    from transformers import Blip2ForConditionalGeneration, Blip2Processor, BlipForConditionalGeneration, BlipProcessor

    model_cls, processor_cls, tiny_name, build = {
        "blip": (BlipForConditionalGeneration, BlipProcessor, TINY_BLIP, build_tiny_blip),
        "blip2": (Blip2ForConditionalGeneration, Blip2Processor, TINY_BLIP2, build_tiny_blip2),
    }[cfg.family]
    if cfg.profile == "random":
        model, processor = random_captioner(cfg.family, device, torch_dtype(cfg.dtype, device))
        return model.to(device).eval(), processor
    if cfg.profile == "tiny":
        ref = path = str(fill_once(model_cache_dir() / "tiny" / tiny_name, build))
    else:
        ref = cfg.model or DEFAULT_MODELS[cfg.family]
        path = resolve_model_path(ref, cfg.storage_options)
    processor = from_pretrained(processor_cls, ref, path)
    model = from_pretrained(model_cls, ref, path, dtype=torch_dtype(cfg.dtype, device))
    return model.to(device).eval(), processor


@register_stage
class CaptionStage(Stage[CaptionParams, CaptionModelConfig]):
    name = "caption"
    uses_gpu = True
    extra = "models"
    Params = CaptionParams
    Model = CaptionModelConfig

    def setup(self) -> None:
        self.captioner, self.processor = load_captioner(self.model, self.context.device)

    def model_ids(self) -> dict[str, str]:
        if self.model.profile == "tiny":
            return {"captioner": f"tiny:{TINY_BLIP if self.model.family == 'blip' else TINY_BLIP2}"}
        if self.model.profile == "random":
            return {"captioner": random_id(BLIP[self.model.family])}
        return {"captioner": self.model.model or DEFAULT_MODELS[self.model.family]}

    def caption(self, images: list) -> list[str]:
        """One caption per image, from a single batched `generate` call."""
        import torch

        kwargs: dict[str, Any] = {"images": images, "return_tensors": "pt"}
        if self.params.prompt:
            kwargs.update(text=[self.params.prompt] * len(images), padding=True)
        inputs = self.processor(**kwargs).to(self.context.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.captioner.dtype)
        with torch.no_grad():
            ids = self.captioner.generate(
                **inputs, max_new_tokens=self.params.max_new_tokens, num_beams=self.params.num_beams, do_sample=False
            )
        if self.model.family == "blip2" and "input_ids" in inputs:
            # BLIP-2's language model returns the prompt before the answer: keep only the answer.
            ids = ids[:, inputs["input_ids"].shape[1] :]
        return [c.strip() for c in self.processor.batch_decode(ids, skip_special_tokens=True)]

    def process(self, samples: list[Sample]) -> list[Sample]:
        with_image = [s for s in samples if s.image is not None]
        for s in samples:
            if s.image is None:
                s.fail(self.context.label, "no_image", "caption needs an image")
        if with_image:
            for s, text in zip(with_image, self.caption([s.image for s in with_image])):
                s.meta["caption"] = text
        return samples
