"""Text-to-image synthesis (SENSE): N new images per real image from each of several generators.

The prompt is what an earlier stage put in `meta["prompt"]` (the dense caption), else the `prompt`
template filled with the class names of the real image's mask. No mask conditions these images, so the
samples leave with `mask = None` and `instances = None`: written as image + json (unlabeled), or labeled
by a later stage (the Mask Generator), which then owns the `seg.png` and the `pseudo_label` flag. The
real image stays in `source_image` for the scoring stages.

All generators live in one stage because a stage turns each input into a fixed number of rows: with G
generators and N images each, every input becomes G*N variants, generator g's image n being variant
g*N + n. `model.offload: true` keeps only the running component of each pipeline on the GPU, so two
large generators fit on one card.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from factory.models.loading import PROFILE_HELP, Profile
from factory.models.pipelines import DiffusionModelConfig
from factory.models.random_weights import T2I, random_id
from factory.models.t2i import FAMILIES, load_t2i_pipeline, prompt_tokens, size_multiple
from factory.models.tiny_t2i import tiny_id
from factory.sample import Sample
from factory.schema import StrictModel
from factory.stages import register_stage
from factory.stages.diffusion import DiffusionParams, DiffusionStage, generation_size, group_by


class GeneratorSpec(StrictModel):
    name: str = Field(min_length=1, description="names the generator in each sample's json")
    family: Literal["flux", "sd3", "sana", "sdxl"]
    model: str | None = Field(None, description="hub id, local dir or s3:// URL; default: the family's model")
    variant: str | None = Field(None, description="weights variant to load (e.g. fp16, bf16)")
    dtype: Literal["auto", "fp16", "bf16", "fp32"] = Field(
        "auto", description="auto: bf16 on GPUs (fp16 for SDXL), fp32 on CPU"
    )
    steps: int | None = Field(None, ge=1, description="denoising steps; default per family")
    guidance: float | None = Field(None, ge=0, description="guidance scale; default per family")
    resolution: int | None = Field(None, ge=8, description="long side in pixels; default per family")
    max_sequence_length: int | None = Field(
        None, ge=1, le=512, description="tokens the T5 (Flux, SD3) or Gemma (Sana) encoder reads; CLIP reads 77"
    )

    def setting(self, field: str):
        value = getattr(self, field)
        return getattr(FAMILIES[self.family], field) if value is None else value


class T2IParams(DiffusionParams):
    generators: list[GeneratorSpec] = Field(
        default_factory=lambda: [GeneratorSpec(name="flux", family="flux"), GeneratorSpec(name="sd35", family="sd3")],
        min_length=1,
    )
    images_per_generator: int = Field(1, ge=1, description="N: images per real image from each generator")
    negative_prompt: str = Field("", description="passed to the families that take one (SD3, Sana, SDXL)")

    @model_validator(mode="after")
    def _unique_names(self):
        names = [g.name for g in self.generators]
        if len(set(names)) != len(names):
            raise ValueError(f"generator names must be unique: {names}")
        return self


class T2IModelConfig(DiffusionModelConfig):
    profile: Profile = Field("pretrained", description=PROFILE_HELP + "; tiny and random apply to every generator")
    offload: bool = Field(False, description="model CPU offload on GPUs (diffusers enable_model_cpu_offload)")


@register_stage
class TextToImageStage(DiffusionStage[T2IParams, T2IModelConfig]):
    name = "t2i"
    salt_seeds_with_label = False
    Params = T2IParams
    Model = T2IModelConfig

    def load(self):
        return {
            g.name: load_t2i_pipeline(
                g.family,
                g.model,
                self.model.profile,
                g.dtype,
                self.context.device,
                self.model.storage_options,
                g.variant,
                self.model.offload,
            )
            for g in self.params.generators
        }

    def variants_per_input(self) -> int:
        return len(self.params.generators) * self.params.images_per_generator

    def model_ids(self) -> dict[str, str]:
        if self.model.profile == "tiny":
            return {g.name: f"tiny:{tiny_id(g.family)}" for g in self.params.generators}
        if self.model.profile == "random":
            return {g.name: random_id(T2I[g.family]) for g in self.params.generators}
        return {g.name: g.model or FAMILIES[g.family].default_model for g in self.params.generators}

    def generation_size(self, generator: GeneratorSpec, height: int, width: int) -> tuple[int, int]:
        """(h, w): long side at the generator's resolution, the real image's aspect ratio, sides rounded."""
        multiple = size_multiple(self.pipes[generator.name], generator.family)
        return generation_size(height, width, generator.setting("resolution"), multiple)

    def process(self, samples: list[Sample]) -> list[Sample]:
        n, k = self.params.images_per_generator, self.variants_per_input()
        out: list[list[Sample]] = []
        live: list[tuple[int, str]] = []
        for i, sample in enumerate(samples):
            prompt = self.prompt(sample, self.params.prompt)
            variants = sample.expand(k)
            out.append(variants)
            if prompt is None:
                for v in variants:
                    v.fail(self.context.label, "no_prompt", "no meta['prompt'], no meta['caption'] and no mask")
                continue
            for v in variants:
                # The real image stays for scoring; the mask it had does not describe the new image.
                v.source_image, v.image, v.mask, v.instances = sample.image, None, None, None
                v.meta["prompt"], v.meta["seed"] = prompt, self.seed(v)
            live.append((i, prompt))
        # Per generator, one pipeline call per generation size, holding every image of that size.
        for g_index, generator in enumerate(self.params.generators):
            sizes = [self.generation_size(generator, *samples[i].array("image").shape[:2]) for i, _ in live]
            for size, members in group_by(sizes).items():
                group = [(live[m][1], out[live[m][0]][g_index * n : (g_index + 1) * n]) for m in members]
                self._generate(generator, size, group)
        return [v for variants in out for v in variants]

    def _generate(self, generator: GeneratorSpec, size: tuple[int, int], group: list[tuple[str, list[Sample]]]):
        """One pipeline call for the N images of each real image in `group`; fills the variants in place."""
        pipe, family = self.pipes[generator.name], generator.family
        max_len = generator.setting("max_sequence_length")
        prompts = [p for p, variants in group for _ in variants]
        flat = [v for _, variants in group for v in variants]
        kwargs = dict(FAMILIES[family].call_kwargs)
        if max_len is not None:
            kwargs["max_sequence_length"] = max_len
        if family != "flux":  # guidance-distilled Flux reads a negative prompt only under true CFG (2x cost)
            kwargs["negative_prompt"] = [self.params.negative_prompt] * len(prompts)
        images = self.generate(
            [v.meta["seed"] for v in flat],
            pipe=pipe,
            prompt=prompts,
            num_inference_steps=generator.setting("steps"),
            guidance_scale=generator.setting("guidance"),
            height=size[0],
            width=size[1],
            **kwargs,
        )
        tokens = {p: prompt_tokens(pipe, family, p, max_len) for p, _ in group}
        for v, prompt, image in zip(flat, prompts, images):
            v.image = image
            v.meta["synthesis"] = {
                "stage": self.context.label,
                "conditioning": "text",
                "generator": generator.name,
                "family": family,
                "model": self.model_ids()[generator.name],
                "steps": generator.setting("steps"),
                "guidance": generator.setting("guidance"),
                "resolution": generator.setting("resolution"),
                "size": list(size),
                "text_encoders": {attr: dict(info) for attr, info in tokens[prompt].items()},
            }
