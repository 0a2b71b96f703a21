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

import contextlib
import logging
import time
from abc import abstractmethod
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from factory.sources.classes import ClassSet, class_names_in
from factory.sample import Sample
from factory.stages import Stage

log = logging.getLogger(__name__)

# Modules a pipeline may hold that torch.compile and channels_last apply to.
DENOISERS = ("unet", "controlnet", "transformer")


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


def unet_size_multiple(pipe: Any) -> int:
    """Latents are 1/vae_scale_factor of the image and the UNet halves them once per down block but the
    last: a side must divide by both or the skip connections do not line up; the SDXL pipeline also
    refuses sides that are not multiples of 8."""
    return max(8, pipe.vae_scale_factor * 2 ** (len(pipe.unet.config.down_block_types) - 1))


def to_uint8(images: np.ndarray) -> np.ndarray:
    """A pipeline's float images in [0, 1] (output_type="np") as uint8 RGB."""
    return (np.clip(np.nan_to_num(images), 0.0, 1.0) * 255).round().astype(np.uint8)


def resize_to(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """The generated image at the mask's size: the image follows the mask, never the reverse."""
    from PIL import Image

    if image.shape[:2] == (height, width):
        return image
    return np.asarray(Image.fromarray(image).resize((width, height), Image.BICUBIC))


def group_by(keys: list) -> dict[Any, list[int]]:
    """Positions of equal keys, in first-seen order: the pipeline calls of one batch."""
    groups: dict[Any, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    return groups


# ---------------------------------------------------------------- fast paths


class SpeedOptions(BaseModel):
    """GPU fast paths of a diffusion stage (`model.speed`); none changes what is generated beyond rounding."""

    model_config = ConfigDict(extra="forbid")

    sdpa: Literal["auto", "flash", "efficient", "cudnn", "math"] = Field(
        "auto", description="scaled-dot-product attention backend; auto lets torch choose per call")
    channels_last: bool = Field(False, description="UNet, ControlNet and VAE weights and activations in NHWC")
    compile: list[Literal["unet", "controlnet", "transformer", "vae"]] = Field(
        default_factory=list, description="modules to torch.compile (once per actor, on the first call)")
    compile_mode: Literal["default", "max-autotune-no-cudagraphs"] = "default"
    cuda_graphs: bool = Field(False, description="capture the compiled modules in CUDA graphs (needs compile)")
    vae_batch: int | None = Field(None, ge=1, description="decode latents this many at a time; none: all at once")

    @model_validator(mode="after")
    def _graphs_need_compile(self):
        if self.cuda_graphs and not self.compile:
            raise ValueError("cuda_graphs needs compile (the graphs are captured by torch.compile)")
        return self

    def torch_compile_mode(self) -> str:
        if not self.cuda_graphs:
            return self.compile_mode
        return "reduce-overhead" if self.compile_mode == "default" else "max-autotune"


def decode_in_batches(vae: Any, n: int) -> None:
    """Make `vae.decode` split its input into chunks of `n` latents: bounds the decoder's activation memory."""
    import torch
    from diffusers.models.autoencoders.vae import DecoderOutput

    decode = vae.decode

    def chunked(z, *args, return_dict: bool = True, **kwargs):
        if z.shape[0] <= n:
            return decode(z, *args, return_dict=return_dict, **kwargs)
        sample = torch.cat([decode(c, *args, return_dict=False, **kwargs)[0] for c in z.split(n)])
        return DecoderOutput(sample=sample) if return_dict else (sample,)

    vae.decode = chunked


def apply_speed(pipe: Any, speed: SpeedOptions) -> None:
    """channels_last, batched VAE decode and torch.compile on a loaded pipeline, in that order."""
    import torch

    modules = {name: getattr(pipe, name, None) for name in (*DENOISERS, "vae")}
    if speed.channels_last:
        for name in ("unet", "controlnet", "vae"):
            if modules[name] is not None:
                modules[name].to(memory_format=torch.channels_last)
    if speed.vae_batch:
        decode_in_batches(pipe.vae, speed.vae_batch)
    for name in speed.compile:
        module = modules.get(name)
        if module is None:
            raise ValueError(f"model.speed.compile: the pipeline has no {name}")
        if name == "vae":
            # Pipelines call vae.decode, not forward: compile that method.
            pipe.vae.decode = torch.compile(pipe.vae.decode, mode=speed.torch_compile_mode())
        else:
            module.compile(mode=speed.torch_compile_mode())


def sdpa_context(backend: str):
    if backend == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel({"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                        "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[backend])


def _mark_cuda_graph_step(pipe, step, timestep, callback_kwargs):
    """Between denoising steps: the compiled modules' graph outputs of the last step may be overwritten."""
    import torch

    torch.compiler.cudagraph_mark_step_begin()
    return callback_kwargs


# ---------------------------------------------------------------- the base stage


class DiffusionStage(Stage):
    """A stage that loads diffusers pipelines in `load()` and calls them through `generate()`.

    Subclasses implement `load()` (returning one pipeline, or a dict of them) and `process()`; `setup()`
    loads, applies `self.model.speed` and times it. `seconds` holds the load time and, after the first
    call, that call's time, which includes torch.compile when compile is on.
    """

    uses_gpu = True
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
            kwargs["callback_on_step_end"] = _mark_cuda_graph_step
        started = time.perf_counter()
        with sdpa_context(speed.sdpa):
            result = pipe(generator=[torch.Generator(self.context.device).manual_seed(s) for s in seeds],
                          output_type="np", **kwargs)
        if "first_call" not in self.seconds:
            self.seconds["first_call"] = round(time.perf_counter() - started, 3)
            if speed.compile:
                log.info("%s: first pipeline call %.1fs (includes torch.compile of %s)", self.context.label,
                         self.seconds["first_call"], ", ".join(speed.compile))
        return to_uint8(result.images)


class MaskConditionedStage(DiffusionStage):
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
        live = []
        for i, sample in enumerate(samples):
            if sample.mask is None:
                out[i] = [v.fail(self.context.label, "no_mask", f"{self.name} needs a mask to condition on")
                          for v in out[i]]
            else:
                live.append(i)
        sizes = [self.generation_size(*samples[i].mask.shape[:2]) for i in live]
        for size, members in group_by(sizes).items():
            self.generate_for([samples[live[m]] for m in members], [out[live[m]] for m in members], size)
        return [v for variants in out for v in variants]
