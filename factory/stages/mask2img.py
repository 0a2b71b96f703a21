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
from pydantic import Field

from factory.models.sdxl import Scheduler, SDXLModelConfig, load_seggen_pipeline, model_ids, use_scheduler
from factory.sample import Sample
from factory.stages import register_stage
from factory.stages.diffusion import RESOLUTION_HELP, MaskConditionedParams, MaskConditionedStage, resize_to


class Mask2ImgParams(MaskConditionedParams):
    images: int = Field(
        1, ge=1, description="images per input mask (M); paper ADE20K: ImgSyn 50, MaskSyn 1 per new mask"
    )
    steps: int = Field(40, ge=1, description="denoising steps; paper: 40")
    scheduler: Scheduler = Field("base", description="sampler: base (the SDXL base's), euler_karras, dpmpp_2m_karras")
    resolution: int = Field(768, ge=8, description=RESOLUTION_HELP + "; paper: 768")
    class_map: dict[str, str | None] = Field(
        default_factory=dict,
        description="source class name -> palette class name (null: unlabeled), where the names differ",
    )


@register_stage
class Mask2ImgStage(MaskConditionedStage[Mask2ImgParams, SDXLModelConfig]):
    name = "mask2img"
    Params = Mask2ImgParams
    Model = SDXLModelConfig

    def load(self):
        self.pipe, self.palette = load_seggen_pipeline(self.model, "mask2img", self.context.device)
        return self.pipe

    def setup(self) -> None:
        super().setup()
        use_scheduler(self.pipe, self.params.scheduler)
        self.to_palette = self.palette.lookup_from(self.context.classes, self.params.class_map)

    def variants_per_input(self) -> int:
        return self.params.images

    def model_ids(self) -> dict[str, str]:
        return model_ids(self.model, "mask2img")

    def condition(self, sample: Sample) -> np.ndarray:
        """The colour map the ControlNet sees, at the mask's size."""
        instances = sample.instances if self.palette.outlines else None
        return self.palette.encode(self.to_palette[sample.array("mask").astype(np.int64)], instances)

    def generate_for(self, sources: list[Sample], groups: list[list[Sample]], size: tuple[int, int]) -> None:
        gh, gw = size
        prompts, conds, seeds, flat = [], [], [], []
        for sample, variants in zip(sources, groups):
            # NEAREST keeps every conditioning pixel an exact palette colour.
            cond = Image.fromarray(self.condition(sample)).resize((gw, gh), Image.Resampling.NEAREST)
            prompt = self.prompt(sample, self.params.prompt)
            for v in variants:
                prompts.append(prompt)
                conds.append(cond)
                seeds.append(self.seed(v))
                flat.append(v)
        images = self.generate(
            seeds,
            prompt=prompts,
            # None, not "", for no negative prompt: SDXL then uses zeros, as training's dropped prompts did.
            negative_prompt=[self.params.negative_prompt] * len(prompts) if self.params.negative_prompt else None,
            image=conds,
            num_inference_steps=self.params.steps,
            guidance_scale=self.params.guidance,
            controlnet_conditioning_scale=self.params.conditioning_scale,
            height=gh,
            width=gw,
        )
        for v, prompt, seed, image in zip(flat, prompts, seeds, images):
            if v.meta.get("image_kind") != "color_map":
                v.source_image = v.image
            v.image = resize_to(image, *v.array("mask").shape[:2])
            v.meta["prompt"] = prompt
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
