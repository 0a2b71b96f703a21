"""Mask -> image synthesis with a segmentation ControlNet (ImgSyn: the mask is kept, new images drawn for it).

Each source mask is mapped to ADE150 ids, painted in the ADE150 palette `lllyasviel/sd-controlnet-seg`
was trained on, and K images are generated for it. Source classes with no ADE150 counterpart are painted
black, which is what that model saw for unlabeled pixels. The images are resized back to the mask's size,
so the mask and instance map pass through bit-exact.
"""

from __future__ import annotations

from PIL import Image
from pydantic import Field

from factory.models.controlnet import load_controlnet_pipeline
from factory.models.loading import Dtype
from factory.models.pipelines import DiffusionModelConfig
from factory.models.random_weights import SD15, SD_CONTROLNET_SEG, random_id
from factory.models.tiny_diffusion import TINY_CONTROLNET
from factory.sample import Sample
from factory.sources.classes import ade150_lookup, ade150_palette, colorize
from factory.stages import register_stage
from factory.stages.diffusion import RESOLUTION_HELP, MaskConditionedParams, MaskConditionedStage, resize_to


class ControlNetParams(MaskConditionedParams):
    variants: int = Field(5, ge=1, description="images generated per source sample (K)")
    resolution: int = Field(512, ge=8, description=RESOLUTION_HELP)
    class_map: dict[str, str | None] = Field(
        default_factory=dict,
        description="source class name -> ADE150 class name (null: unlabeled); overrides the shipped table",
    )


class ControlNetModelConfig(DiffusionModelConfig):
    base: str = Field("stable-diffusion-v1-5/stable-diffusion-v1-5", description="hub id, local dir or s3:// URL")
    controlnet: str = Field("lllyasviel/sd-controlnet-seg", description="hub id, local dir or s3:// URL")
    dtype: Dtype = "auto"


@register_stage
class ControlNetStage(MaskConditionedStage[ControlNetParams, ControlNetModelConfig]):
    name = "controlnet"
    salt_seeds_with_label = False
    Params = ControlNetParams
    Model = ControlNetModelConfig

    def check(self) -> None:
        try:
            ade150_lookup(self.context.classes, self.params.class_map or None)
        except KeyError as e:
            raise ValueError(f"class_map: {e.args[0]}") from None

    def load(self):
        return load_controlnet_pipeline(self.model, self.context.device, self.model.dtype)

    def setup(self) -> None:
        super().setup()
        self.lut = ade150_lookup(self.context.classes, self.params.class_map or None)
        self.palette = ade150_palette()

    def variants_per_input(self) -> int:
        return self.params.variants

    def model_ids(self) -> dict[str, str]:
        if self.model.profile == "tiny":
            return {"base": f"tiny:{TINY_CONTROLNET}", "controlnet": f"tiny:{TINY_CONTROLNET}"}
        if self.model.profile == "random":
            return {"base": random_id(SD15), "controlnet": random_id(SD_CONTROLNET_SEG)}
        return {"base": self.model.base, "controlnet": self.model.controlnet}

    def generate_for(self, sources: list[Sample], groups: list[list[Sample]], size: tuple[int, int]) -> None:
        """All K variants of `sources` in one pipeline call; fills the variants in `groups` in place."""
        gh, gw = size
        prompts, conds, flat = [], [], []
        for src, variants in zip(sources, groups):
            prompt = self.prompt(src, self.params.prompt)
            # NEAREST keeps every conditioning pixel an exact palette colour.
            cond = Image.fromarray(colorize(src.array("mask"), self.palette, self.lut)).resize(
                (gw, gh), Image.Resampling.NEAREST
            )
            for v in variants:
                v.meta["prompt"], v.meta["seed"] = prompt, self.seed(v)
                prompts.append(prompt)
                conds.append(cond)
                flat.append(v)
        images = self.generate(
            [v.meta["seed"] for v in flat],
            prompt=prompts,
            negative_prompt=[self.params.negative_prompt] * len(prompts),
            image=conds,
            num_inference_steps=self.params.steps,
            guidance_scale=self.params.guidance,
            controlnet_conditioning_scale=self.params.conditioning_scale,
            height=gh,
            width=gw,
        )
        synthesis = {
            "stage": self.context.label,
            "steps": self.params.steps,
            "guidance": self.params.guidance,
            "resolution": self.params.resolution,
            "size": [gh, gw],
        }
        for v, image in zip(flat, images):
            # New arrays, never in place: the variants of a source share its arrays.
            v.source_image, v.image = v.image, resize_to(image, *v.array("mask").shape[:2])
            v.meta["synthesis"] = dict(synthesis, models=self.model_ids())
