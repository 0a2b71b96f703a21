"""SegGen Text2Mask: new segmentation masks drawn from text by an SDXL fine-tuned on colour maps (MaskSyn).

For each input sample the stage writes N colour maps from one prompt (an earlier stage's prompt or
caption, else the template with the classes of the sample's mask), each with its own seed, and decodes
every map to class ids with the palette stored beside the model: nearest colour, ignore beyond the
distance cap, instances from outlines when the model was trained with them. Palette classes map to the
source's class set by name; palette classes the source lacks become ignore.

What a variant carries afterwards:
- `mask` / `instances`: the decoded new label (what gets stored), in the source's class set;
- `source_image`: the real image the prompt came from;
- `image`: the raw colour map, with `meta["image_kind"] = "color_map"`. A Mask2Img stage after this one
  replaces it with a real-looking image; written without one, the sample is still valid and says so.
"""

from __future__ import annotations

import numpy as np
from pydantic import Field

from factory.models.sdxl import Scheduler, SDXLModelConfig, load_seggen_pipeline, model_ids, use_scheduler
from factory.sample import Sample
from factory.stages import register_stage
from factory.stages.diffusion import DiffusionStage, SamplingParams


class Text2MaskParams(SamplingParams):
    maps: int = Field(10, ge=1, description="colour maps (new masks) per input sample (N); paper ADE20K MaskSyn: 10")
    steps: int = Field(200, ge=1, description="denoising steps; paper: 200")
    scheduler: Scheduler = Field(
        "euler_karras",
        description="sampler: euler_karras (Euler with Karras/EDM sigma spacing, the paper's EDM-style "
        "sampling), dpmpp_2m_karras, or base (the base model's own scheduler)",
    )
    resolution: int = Field(
        768, ge=8, description="side of the square colour map, rounded to the size multiple; paper: 768"
    )
    cap: float | None = Field(
        None,
        gt=0,
        description="largest CIELAB distance (delta E) from a palette colour that still decodes to it; "
        "farther pixels become ignore. Default: per colour, half its distance to the nearest other colour",
    )


@register_stage
class Text2MaskStage(DiffusionStage[Text2MaskParams, SDXLModelConfig]):
    name = "text2mask"
    Params = Text2MaskParams
    Model = SDXLModelConfig

    def load(self):
        self.pipe, self.palette = load_seggen_pipeline(self.model, "text2mask", self.context.device)
        return self.pipe

    def setup(self) -> None:
        super().setup()
        use_scheduler(self.pipe, self.params.scheduler)
        self.to_source = self.palette.lookup_to(self.context.classes)
        m = self.size_multiple(self.pipe)
        self.side = max(m, round(self.params.resolution / m) * m)

    def variants_per_input(self) -> int:
        return self.params.maps

    def model_ids(self) -> dict[str, str]:
        return model_ids(self.model, "text2mask")

    def process(self, samples: list[Sample]) -> list[Sample]:
        """Every map of the batch in one pipeline call: they all share the square size."""
        out = [sample.expand(self.params.maps) for sample in samples]
        prompts = [self.prompt(sample, self.params.prompt) for sample in samples]
        for variants, prompt in zip(out, prompts):
            if prompt is None:
                for v in variants:
                    v.fail(self.context.label, "no_prompt", "no meta['prompt'], no meta['caption'] and no mask")
        flat = [v for variants in out for v in variants if v.error is None]
        if not flat:
            return [v for variants in out for v in variants]
        seeds = [self.seed(v) for v in flat]
        flat_prompts = [p for p, variants in zip(prompts, out) if p is not None for _ in variants]
        maps = self.generate(
            seeds,
            prompt=flat_prompts,
            # None, not "", for no negative prompt: SDXL then uses zeros, as training's dropped prompts did.
            negative_prompt=[self.params.negative_prompt] * len(flat) if self.params.negative_prompt else None,
            num_inference_steps=self.params.steps,
            guidance_scale=self.params.guidance,
            height=self.side,
            width=self.side,
        )
        cap = self.params.cap  # None: each palette colour's own radius
        dtype = self.context.classes.mask_dtype
        for v, prompt, seed, colour_map in zip(flat, flat_prompts, seeds, maps):
            ids, instances = self.palette.decode(colour_map, cap)
            mask = self.to_source[ids].astype(dtype)
            v.source_image, v.image = v.image, colour_map
            v.mask, v.instances = mask, instances
            v.meta["prompt"] = prompt
            v.meta["image_kind"] = "color_map"
            v.meta["text2mask"] = {
                "stage": self.context.label,
                "seed": seed,
                "steps": self.params.steps,
                "guidance": self.params.guidance,
                "scheduler": self.params.scheduler,
                "size": [self.side, self.side],
                "cap": None if cap is None else round(cap, 4),
                "palette": self.palette.kind,
                # Share of pixels no palette colour claimed: a quick quality signal per map.
                "ignore_fraction": round(float(np.mean(mask == self.context.classes.ignore_index)), 4),
                "models": self.model_ids(),
            }
        return [v for variants in out for v in variants]
