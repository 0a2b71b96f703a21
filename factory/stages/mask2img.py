"""SegGen Mask2Img: new images for a mask from a ControlNet trained on a frozen SDXL (ImgSyn and MaskSyn).

The mask is painted in the palette stored with the ControlNet (source classes map to palette classes by
name, or through `class_map`; others are black, as unlabeled pixels were in training), with instance
outlines in the edge colour when the model was trained with them. M images are drawn per mask, each
with its own seed, and resized back to the mask's size, so mask and instances pass through bit-exact.

After Text2Mask (`meta["image_kind"] == "color_map"`) the mask is the decoded new one, painted again
from its ids, so the image is conditioned on exactly the label that is stored; the real image the
prompt came from is already in `source_image` and stays there. Otherwise the input image is real and
moves to `source_image`.
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from factory.sample import Sample
from factory.sdxl import (SDXLModelConfig, Scheduler, load_seggen_pipeline, model_ids, prompt_for, size_multiple,
                          use_scheduler)
from factory.stages import Stage, register_stage


class Mask2ImgParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    images: int = Field(
        1, ge=1, description="images per input mask (M); paper ADE20K: ImgSyn 50, MaskSyn 1 per new mask"
    )
    steps: int = Field(40, ge=1, description="denoising steps; paper: 40")
    guidance: float = Field(7.5, ge=0, description="classifier-free guidance scale")
    conditioning_scale: float = Field(1.0, ge=0, description="ControlNet conditioning scale")
    scheduler: Scheduler = Field("base", description="sampler: base (the SDXL base's), euler_karras, dpmpp_2m_karras")
    resolution: int = Field(
        768, ge=8,
        description="long side of the generated image (paper: 768); the mask's aspect ratio is kept and each "
        "side rounded to the pipeline's size multiple",
    )
    prompt: str = Field(
        "a photo of {classes}",
        description="template used when no earlier stage left meta['prompt'] or meta['caption']; "
        "{classes} = names of the classes in the mask, most pixels first",
    )
    negative_prompt: str = ""
    class_map: dict[str, str | None] = Field(
        default_factory=dict,
        description="source class name -> palette class name (null: unlabeled), where the names differ",
    )


@register_stage
class Mask2ImgStage(Stage):
    name = "mask2img"
    uses_gpu = True
    Params = Mask2ImgParams
    Model = SDXLModelConfig

    def setup(self) -> None:
        self.pipe, self.palette = load_seggen_pipeline(self.model, "mask2img", self.context.device)
        use_scheduler(self.pipe, self.params.scheduler)
        self.to_palette = self.palette.lookup_from(self.context.classes, self.params.class_map)
        self.size_multiple = size_multiple(self.pipe)

    def variants_per_input(self) -> int:
        return self.params.images

    def model_ids(self) -> dict[str, str]:
        return model_ids(self.model, "mask2img")

    def generation_size(self, height: int, width: int) -> tuple[int, int]:
        """(h, w): long side near `resolution`, the mask's aspect ratio, both multiples of the size multiple."""
        m = self.size_multiple
        scale = self.params.resolution / max(height, width)
        return max(m, round(height * scale / m) * m), max(m, round(width * scale / m) * m)

    def condition(self, sample: Sample) -> np.ndarray:
        """The colour map the ControlNet sees, at the mask's size."""
        instances = sample.instances if self.palette.outlines else None
        return self.palette.encode(self.to_palette[sample.mask.astype(np.int64)], instances)

    def process(self, samples: list[Sample]) -> list[Sample]:
        out = []
        for sample in samples:
            if sample.mask is None:
                out += [v.fail(self.context.label, "no_mask", "mask2img needs a mask to condition on")
                        for v in sample.expand(self.params.images)]
            else:
                # One call per input mask: a variant's pixels depend only on its own seed.
                out += self._generate(sample)
        return out

    def _generate(self, sample: Sample) -> list[Sample]:
        import torch

        h, w = sample.mask.shape[:2]
        gh, gw = self.generation_size(h, w)
        # NEAREST keeps every conditioning pixel an exact palette colour.
        cond = Image.fromarray(self.condition(sample)).resize((gw, gh), Image.NEAREST)
        prompt = prompt_for(sample.meta, sample.mask, self.context.classes, self.params.prompt)
        variants = sample.expand(self.params.images)
        seeds = [v.seed(self.context.job_seed, self.context.label) for v in variants]
        result = self.pipe(
            prompt=[prompt] * len(variants),
            # None, not "", for no negative prompt: SDXL then uses zeros, as training's dropped prompts did.
            negative_prompt=[self.params.negative_prompt] * len(variants) if self.params.negative_prompt else None,
            image=[cond] * len(variants),
            num_inference_steps=self.params.steps,
            guidance_scale=self.params.guidance,
            controlnet_conditioning_scale=self.params.conditioning_scale,
            generator=[torch.Generator(self.context.device).manual_seed(s) for s in seeds],
            height=gh,
            width=gw,
            output_type="np",
        )
        images = (np.clip(result.images, 0.0, 1.0) * 255).round().astype(np.uint8)
        after_text2mask = sample.meta.get("image_kind") == "color_map"
        for v, seed, image in zip(variants, seeds, images):
            if (h, w) != (gh, gw):
                # The image follows the mask, never the reverse: the mask is the label and stays exact.
                image = np.asarray(Image.fromarray(image).resize((w, h), Image.BICUBIC))
            if not after_text2mask:
                v.source_image = v.image
            v.image = image
            v.meta["prompt"], v.meta["variant"] = prompt, v.variant
            v.meta["image_kind"] = "synthetic"
            v.meta["mask2img"] = {
                "stage": self.context.label,
                "seed": seed,
                "steps": self.params.steps,
                "guidance": self.params.guidance,
                "conditioning_scale": self.params.conditioning_scale,
                "scheduler": self.params.scheduler,
                "size": [gh, gw],
                "palette": self.palette.kind,
                "models": self.model_ids(),
            }
        return variants
