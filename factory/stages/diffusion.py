"""What the diffusion stages share: prompts, generation sizes, batched pipeline calls and the fast paths.

`controlnet`, `mask2img`, `text2mask` and `t2i` are `DiffusionStage`s. Each `process()` batch is
generated in as few pipeline calls as possible: all variants of all sources that share a generation size
go into one call, each image with its own `torch.Generator` seeded by `sample.seed(job_seed, ...)`, so
an image's noise never depends on its neighbours. The engine fixes every batch's composition by the
shard's contents, so a regenerated shard repeats the same calls: bit-identical on the same hardware.

Prompt precedence, the same for every diffusion stage (and for SegGen training):
1. `meta["prompt"]`, what a prompt stage (or a dense captioner) wrote;
2. `meta["caption"]`, a captioner's output;
3. the stage's `prompt` template, `{classes}` = the class names in the sample's mask, most pixels first.
A sample with none of the three (no mask either) has no prompt: `prompt_for` returns None.

The fast paths are `model.speed` options (see `SpeedOptions`); each one is measured on and off by
`bench/bench_gpu.py` (docs/gpu.md).
"""

from __future__ import annotations

import logging
import time
from abc import abstractmethod
from typing import Any, ClassVar, TypeVar

import numpy as np
from pydantic import Field

from factory.models.pipelines import DiffusionModelConfig, apply_speed, mark_cuda_graph_step, unet_size_multiple
from factory.sample import Sample
from factory.schema import StrictModel
from factory.sources.classes import ClassSet, class_names_in
from factory.stages import Stage

log = logging.getLogger(__name__)


def prompt_for(meta: dict, mask: np.ndarray | None, classes: ClassSet, template: str) -> str | None:
    """The prompt of a sample, by the precedence in this module's docstring."""
    for key in ("prompt", "caption"):
        if meta.get(key):
            return str(meta[key])
    if mask is None:
        return None
    return template.replace("{classes}", ", ".join(class_names_in(mask, classes)))


def generation_size(height: int, width: int, resolution: int, multiple: int) -> tuple[int, int]:
    """(h, w): long side near `resolution`, the aspect ratio of (height, width), both multiples of `multiple`."""
    scale = resolution / max(height, width)

    def side(n: int) -> int:
        return max(multiple, round(n * scale / multiple) * multiple)

    return side(height), side(width)


def to_uint8(images: np.ndarray) -> np.ndarray:
    """A pipeline's float images in [0, 1] (output_type="np") as uint8 RGB."""
    return (np.clip(np.nan_to_num(images), 0.0, 1.0) * 255).round().astype(np.uint8)


def resize_to(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """The generated image at the mask's size: the image follows the mask, never the reverse."""
    from PIL import Image

    if image.shape[:2] == (height, width):
        return image
    return np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BICUBIC))


def group_by(keys: list) -> dict[Any, list[int]]:
    """Positions of equal keys, in first-seen order: the pipeline calls of one batch."""
    groups: dict[Any, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    return groups


# ---------------------------------------------------------------- fast paths


# ---------------------------------------------------------------- parameters


class DiffusionParams(StrictModel):
    """What the `params` of every diffusion stage have: the prompt template and the negative prompt."""

    prompt: str = Field(
        "a photo of {classes}",
        description="template used when no earlier stage left meta['prompt'] or meta['caption']; "
        "{classes} = names of the classes in the sample's mask, most pixels first",
    )
    negative_prompt: str = ""


class SamplingParams(DiffusionParams):
    """... and of a stage with one pipeline: steps and guidance (a stage redeclares a field to change its
    default, e.g. its paper's step count)."""

    steps: int = Field(50, ge=1, description="denoising steps")
    guidance: float = Field(7.5, ge=0, description="classifier-free guidance scale")


RESOLUTION_HELP = (
    "long side of the generated image; the mask's aspect ratio is kept and each side is rounded to "
    "the pipeline's size multiple"
)


class MaskConditionedParams(SamplingParams):
    """... and of a stage conditioned on the sample's mask through a ControlNet."""

    resolution: int = Field(512, ge=8, description=RESOLUTION_HELP)
    conditioning_scale: float = Field(1.0, ge=0, description="ControlNet conditioning scale")


# ---------------------------------------------------------------- the base stage

DiffusionParamsT = TypeVar("DiffusionParamsT", bound=DiffusionParams)
MaskConditionedParamsT = TypeVar("MaskConditionedParamsT", bound=MaskConditionedParams)
DiffusionModelT = TypeVar("DiffusionModelT", bound=DiffusionModelConfig)


class DiffusionStage(Stage[DiffusionParamsT, DiffusionModelT]):
    """A stage that loads diffusers pipelines in `load()` and calls them through `generate()`.

    Subclasses implement `load()` (returning one pipeline, or a dict of them) and `process()`; `setup()`
    loads, applies `self.model.speed` and times it. `seconds` holds the load time and, after the first
    call, that call's time, which includes torch.compile when compile is on.
    """

    uses_gpu = True
    extra = "models"
    # Whether seeds are salted with the stage label (two stages of a kind in one job then draw different
    # noise). ControlNet and t2i predate the salt and keep their seeds, so their images stay the same.
    salt_seeds_with_label: ClassVar[bool] = True

    @abstractmethod
    def load(self) -> Any:
        """The stage's diffusers pipeline, or a dict of named pipelines."""

    def setup(self) -> None:
        started = time.perf_counter()
        loaded = self.load()
        self.pipes = loaded if isinstance(loaded, dict) else {"": loaded}
        self.pipe = next(iter(self.pipes.values()))
        for pipe in self.pipes.values():
            apply_speed(pipe, self.model.speed)
        self.seconds = {"load": round(time.perf_counter() - started, 3)}

    def size_multiple(self, pipe: Any) -> int:
        return unet_size_multiple(pipe)

    def prompt(self, sample: Sample, template: str) -> str | None:
        return prompt_for(sample.meta, sample.mask, self.context.classes, template)

    def seed(self, variant: Sample) -> int:
        return variant.seed(self.context.job_seed, self.context.label if self.salt_seeds_with_label else "")

    def generate(self, seeds: list[int], pipe: Any = None, **kwargs) -> np.ndarray:
        """One pipeline call, one image per seed (each image its own generator); uint8 (n, h, w, 3)."""
        import torch

        pipe = pipe if pipe is not None else self.pipe
        speed = self.model.speed
        if speed.cuda_graphs:
            kwargs["callback_on_step_end"] = mark_cuda_graph_step
        started = time.perf_counter()
        result = pipe(
            generator=[torch.Generator(self.context.device).manual_seed(s) for s in seeds], output_type="np", **kwargs
        )
        if "first_call" not in self.seconds:
            self.seconds["first_call"] = round(time.perf_counter() - started, 3)
            if speed.compile:
                log.info(
                    "%s: first pipeline call %.1fs (includes torch.compile of %s)",
                    self.context.label,
                    self.seconds["first_call"],
                    ", ".join(speed.compile),
                )
        return to_uint8(result.images)


class MaskConditionedStage(DiffusionStage[MaskConditionedParamsT, DiffusionModelT]):
    """A diffusion stage drawing `variants_per_input()` images for each mask (ControlNet, Mask2Img).

    Every sample needs a mask (none: each variant fails `no_mask`). Images are generated at the mask's
    aspect ratio, long side `params.resolution`, one pipeline call per generation size holding every
    image of every mask of that size; `generate_for` makes one such call and fills the variants.
    """

    def setup(self) -> None:
        super().setup()
        self.multiple = self.size_multiple(self.pipe)

    def generation_size(self, height: int, width: int) -> tuple[int, int]:
        return generation_size(height, width, self.params.resolution, self.multiple)

    @abstractmethod
    def generate_for(self, sources: list[Sample], groups: list[list[Sample]], size: tuple[int, int]) -> None:
        """One pipeline call at `size` for these sources; fills each source's group of variants."""

    def process(self, samples: list[Sample]) -> list[Sample]:
        out = [sample.expand(self.variants_per_input()) for sample in samples]
        live, sizes = [], []
        for i, sample in enumerate(samples):
            if sample.mask is None:
                out[i] = [
                    v.fail(self.context.label, "no_mask", f"{self.name} needs a mask to condition on") for v in out[i]
                ]
            else:
                live.append(i)
                sizes.append(self.generation_size(*sample.mask.shape[:2]))
        for size, members in group_by(sizes).items():
            self.generate_for([samples[live[m]] for m in members], [out[live[m]] for m in members], size)
        return [v for variants in out for v in variants]
