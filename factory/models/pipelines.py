"""What the diffusion pipelines share: their size multiple, and the GPU fast paths a stage turns on in
`model.speed` (each measured on and off by `bench/bench_gpu.py`, docs/gpu.md)."""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Literal

from pydantic import Field, model_validator

from factory.models.loading import ModelConfig
from factory.schema import StrictModel

# Modules a pipeline may hold that torch.compile and channels_last apply to.
DENOISERS = ("unet", "controlnet", "transformer")


def unet_size_multiple(pipe: Any) -> int:
    """Latents are 1/vae_scale_factor of the image and the UNet halves them once per down block but the
    last: a side must divide by both or the skip connections do not line up; the SDXL pipeline also
    refuses sides that are not multiples of 8."""
    return max(8, pipe.vae_scale_factor * 2 ** (len(pipe.unet.config.down_block_types) - 1))


class SpeedOptions(StrictModel):
    """GPU fast paths of a diffusion stage (`model.speed`); none changes what is generated beyond rounding."""

    sdpa: Literal["auto", "flash", "efficient", "cudnn", "math"] = Field(
        "auto", description="scaled-dot-product attention backend of the denoisers; auto lets torch choose per call"
    )
    channels_last: bool = Field(False, description="UNet, ControlNet and VAE weights and activations in NHWC")
    compile: list[Literal["unet", "controlnet", "transformer", "vae"]] = Field(
        default_factory=list, description="modules to torch.compile (once per actor, on the first call)"
    )
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
    """The SDPA backend on the denoisers, channels_last, batched VAE decode and torch.compile on a loaded
    pipeline, in that order."""
    import torch

    modules = {name: getattr(pipe, name, None) for name in (*DENOISERS, "vae")}
    if speed.sdpa != "auto":
        for name in DENOISERS:
            if modules[name] is not None:
                use_sdpa_backend(modules[name], speed.sdpa)
    if speed.channels_last:
        for name in ("unet", "controlnet", "vae"):
            module = modules[name]
            if module is not None:
                module.to(memory_format=torch.channels_last)
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

    return sdpa_kernel(
        {
            "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION,
            "math": SDPBackend.MATH,
        }[backend]
    )


def use_sdpa_backend(module: Any, backend: str) -> None:
    """Run `module`'s forward under one SDPA backend. Only the denoisers get it: the VAE's attention has
    head_dim 512, above flash attention's 256, so a backend forced around the whole pipeline call fails
    there with "No available kernel"."""
    forward = module.forward

    @functools.wraps(forward)
    def forward_with_backend(*args, **kwargs):
        with sdpa_context(backend):
            return forward(*args, **kwargs)

    module.forward = forward_with_backend


def mark_cuda_graph_step(pipe, step, timestep, callback_kwargs):
    """Between denoising steps: the compiled modules' graph outputs of the last step may be overwritten."""
    import torch

    torch.compiler.cudagraph_mark_step_begin()
    return callback_kwargs


class DiffusionModelConfig(ModelConfig):
    """The `model` section of every diffusion stage: a profile, object-store options and the fast paths."""

    speed: SpeedOptions = Field(default_factory=SpeedOptions, description="GPU fast paths (docs/gpu.md)")
