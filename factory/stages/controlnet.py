"""Mask -> image synthesis with a segmentation ControlNet (ImgSyn: the mask is kept, new images drawn for it).

Each source mask is mapped to ADE150 ids, painted in the ADE150 palette `lllyasviel/sd-controlnet-seg`
was trained on, and K images are generated for it. Source classes with no ADE150 counterpart are painted
black, which is what that model saw for unlabeled pixels. The images are resized back to the mask's size,
so the mask and instance map pass through bit-exact.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from factory.classes import ade150_lookup, ade150_palette, class_names_in, colorize
from factory.models import TINY_CONTROLNET, load_controlnet_pipeline
from factory.sample import Sample
from factory.stages import Stage, register_stage


class ControlNetParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    variants: int = Field(5, ge=1, description="images generated per source sample (K)")
    steps: int = Field(50, ge=1, description="denoising steps")
    guidance: float = Field(7.5, ge=0, description="classifier-free guidance scale")
    resolution: int = Field(
        512, ge=8,
        description="long side of the generated image; the mask's aspect ratio is kept and each side is "
        "rounded to the pipeline's size multiple",
    )
    prompt: str = Field(
        "a photo of {classes}",
        description="prompt template; {classes} = names of the classes in the mask, most pixels first. "
        "A prompt an earlier stage put in meta['prompt'] wins.",
    )
    negative_prompt: str = ""
    conditioning_scale: float = Field(1.0, ge=0, description="ControlNet conditioning scale")
    sources_per_call: int = Field(
        1, ge=1,
        description="source samples per pipeline call; each call generates all K variants of its sources "
        "as one batch. With 1 the batch composition is fixed per source, so a regenerated shard is "
        "bit-identical; larger values batch more but make images depend on which samples share a call.",
    )
    class_map: dict[str, str | None] = Field(
        default_factory=dict,
        description="source class name -> ADE150 class name (null: unlabeled); overrides the shipped table",
    )


class ControlNetModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    profile: Literal["pretrained", "tiny"] = "pretrained"
    base: str = Field("stable-diffusion-v1-5/stable-diffusion-v1-5", description="hub id, local dir or s3:// URL")
    controlnet: str = Field("lllyasviel/sd-controlnet-seg", description="hub id, local dir or s3:// URL")
    dtype: Literal["auto", "fp16", "bf16", "fp32"] = "auto"
    storage_options: dict = Field(default_factory=dict, description="fsspec options for object-store URLs")


@register_stage
class ControlNetStage(Stage):
    name = "controlnet"
    uses_gpu = True
    Params = ControlNetParams
    Model = ControlNetModelConfig

    def check(self) -> None:
        try:
            ade150_lookup(self.context.classes, self.params.class_map or None)
        except KeyError as e:
            raise ValueError(f"class_map: {e.args[0]}") from None

    def setup(self) -> None:
        self.pipe = load_controlnet_pipeline(self.model, self.context.device, self.model.dtype)
        self.lut = ade150_lookup(self.context.classes, self.params.class_map or None)
        self.palette = ade150_palette()
        # Latents are 1/vae_scale_factor of the image and the UNet halves them once per down block
        # but the last: a side must divide by both or the skip connections do not line up.
        unet_downs = len(self.pipe.unet.config.down_block_types)
        self.size_multiple = self.pipe.vae_scale_factor * 2 ** (unet_downs - 1)

    def variants_per_input(self) -> int:
        return self.params.variants

    def model_ids(self) -> dict[str, str]:
        if self.model.profile == "tiny":
            return {"base": f"tiny:{TINY_CONTROLNET}", "controlnet": f"tiny:{TINY_CONTROLNET}"}
        return {"base": self.model.base, "controlnet": self.model.controlnet}

    def generation_size(self, height: int, width: int) -> tuple[int, int]:
        """(h, w): long side near `resolution`, the mask's aspect ratio, both multiples of the size multiple."""
        m = self.size_multiple
        scale = self.params.resolution / max(height, width)
        return (max(m, round(height * scale / m) * m), max(m, round(width * scale / m) * m))

    def prompt_for(self, sample: Sample) -> str:
        if sample.meta.get("prompt"):
            return str(sample.meta["prompt"])
        names = class_names_in(sample.mask, self.context.classes)
        return self.params.prompt.replace("{classes}", ", ".join(names))

    def process(self, samples: list[Sample]) -> list[Sample]:
        k = self.params.variants
        out: dict[int, list[Sample]] = {}
        # Sources sharing a generation size can share a call; calls never mix sizes.
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, sample in enumerate(samples):
            if sample.mask is None:
                out[i] = [v.fail(self.context.label, "no_mask", "controlnet needs a mask to condition on")
                          for v in sample.expand(k)]
            else:
                by_size.setdefault(self.generation_size(*sample.mask.shape[:2]), []).append(i)
        n = self.params.sources_per_call
        for size, indices in by_size.items():
            for start in range(0, len(indices), n):
                chunk = indices[start:start + n]
                for i, variants in zip(chunk, self._generate([samples[i] for i in chunk], size)):
                    out[i] = variants
        return [v for i in range(len(samples)) for v in out[i]]

    def _generate(self, sources: list[Sample], size: tuple[int, int]) -> list[list[Sample]]:
        """All K variants of `sources` in one pipeline call; returns the variants per source."""
        import torch

        k, (gh, gw) = self.params.variants, size
        prompts, conds, generators, groups = [], [], [], []
        for src in sources:
            prompt = self.prompt_for(src)
            colours = colorize(src.mask, self.palette, self.lut)
            # NEAREST keeps every conditioning pixel an exact palette colour.
            cond = Image.fromarray(colours).resize((gw, gh), Image.NEAREST)
            variants = src.expand(k)
            for v in variants:
                seed = v.seed(self.context.job_seed)
                v.meta["prompt"], v.meta["seed"], v.meta["variant"] = prompt, seed, v.variant
                prompts.append(prompt)
                conds.append(cond)
                generators.append(torch.Generator(self.context.device).manual_seed(seed))
            groups.append(variants)
        result = self.pipe(
            prompt=prompts,
            negative_prompt=[self.params.negative_prompt] * len(prompts),
            image=conds,
            num_inference_steps=self.params.steps,
            guidance_scale=self.params.guidance,
            controlnet_conditioning_scale=self.params.conditioning_scale,
            generator=generators,
            height=gh,
            width=gw,
            output_type="np",
        )
        images = (np.clip(result.images, 0.0, 1.0) * 255).round().astype(np.uint8)
        synthesis = {
            "stage": self.context.label,
            "steps": self.params.steps,
            "guidance": self.params.guidance,
            "resolution": self.params.resolution,
            "size": [gh, gw],
            "models": self.model_ids(),
        }
        flat = [v for group in groups for v in group]
        for v, image in zip(flat, images):
            h, w = v.mask.shape[:2]
            if (h, w) != (gh, gw):
                # The image follows the mask, never the reverse: the mask is the label and stays exact.
                image = np.asarray(Image.fromarray(image).resize((w, h), Image.BICUBIC))
            v.source_image, v.image = v.image, image
            v.meta["synthesis"] = dict(synthesis, models=dict(synthesis["models"]))
        return groups
