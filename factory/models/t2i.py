"""Text-to-image pipelines for the SENSE recipe: Flux, SD3.5, Sana and SDXL, real or tiny.

Each family names its diffusers pipeline, the text tokenizers it prompts (and how many tokens each
reads), and how the image size must be rounded. The tiny profile builds the same pipeline classes from
small configs with random weights (the sizes diffusers' own tests use), saves them once per node and
loads them back through `from_pretrained`, so the real loading code is what tests run.

Tokenizers for the tiny profile are written at run time from a small vocabulary: CLIP's byte-level BPE
(`write_tiny_clip_tokenizer`), a T5 Unigram over single characters, and a Gemma BPE over characters.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from factory.models.loading import from_pretrained, resolve_model_path, torch_dtype
from factory.models.pipelines import unet_size_multiple
from factory.models.tiny_t2i import tiny_t2i_dir


@dataclass(frozen=True)
class Family:
    pipeline: str  # diffusers class name
    default_model: str
    # tokenizer attribute -> "clip" (reads model_max_length = 77 tokens) or "long" (reads
    # max_sequence_length tokens: T5 in Flux/SD3, Gemma in Sana)
    tokenizers: dict[str, str]
    steps: int
    guidance: float
    resolution: int
    max_sequence_length: int | None
    dtype_on_gpu: str  # what "auto" means on a GPU: fp16 overflows in Flux/SD3/Sana, bf16 does not
    call_kwargs: dict


FAMILIES: dict[str, Family] = {
    "flux": Family(
        "FluxPipeline",
        "black-forest-labs/FLUX.1-dev",
        {"tokenizer": "clip", "tokenizer_2": "long"},
        28,
        3.5,
        1024,
        512,
        "bf16",
        {},
    ),
    "sd3": Family(
        "StableDiffusion3Pipeline",
        "stabilityai/stable-diffusion-3.5-large",
        {"tokenizer": "clip", "tokenizer_2": "clip", "tokenizer_3": "long"},
        28,
        3.5,
        1024,
        512,
        "bf16",
        {},
    ),
    # Sana's resolution binning would snap every size to its own table; the stage picks sizes itself.
    "sana": Family(
        "SanaPipeline",
        "Efficient-Large-Model/Sana_1600M_1024px_diffusers",
        {"tokenizer": "long"},
        20,
        4.5,
        1024,
        300,
        "bf16",
        {"use_resolution_binning": False},
    ),
    "sdxl": Family(
        "StableDiffusionXLPipeline",
        "stabilityai/stable-diffusion-xl-base-1.0",
        {"tokenizer": "clip", "tokenizer_2": "clip"},
        30,
        5.0,
        1024,
        None,
        "fp16",
        {},
    ),
}


def size_multiple(pipe: Any, family: str) -> int:
    """What every image side must divide by: the VAE's downscale times the denoiser's own."""
    vae = pipe.vae_scale_factor
    if family == "flux":
        return vae * 2  # Flux packs latents into 2x2 patches
    if family == "sd3":
        return vae * pipe.transformer.config.patch_size
    if family == "sana":
        return max(32, vae * pipe.transformer.config.patch_size)  # SanaPipeline refuses other sizes
    return unet_size_multiple(pipe)


def prompt_tokens(pipe: Any, family: str, prompt: str, max_sequence_length: int | None) -> dict[str, dict]:
    """Per text tokenizer of the pipeline: tokens in the prompt, tokens it reads, and whether it truncated."""
    out = {}
    for attr, kind in FAMILIES[family].tokenizers.items():
        tokenizer = getattr(pipe, attr)
        limit = tokenizer.model_max_length if kind == "clip" else max_sequence_length
        if limit is None:
            raise ValueError(f"{family}: its {attr} reads max_sequence_length tokens, and none is set")
        n = len(tokenizer(prompt, add_special_tokens=True, truncation=False).input_ids)
        out[attr] = {"kind": kind, "tokens": n, "limit": limit, "truncated": n > limit}
    return out


# ---------------------------------------------------------------- tiny builders


# ---------------------------------------------------------------- loading


def load_t2i_pipeline(
    family: str,
    ref: str | None,
    profile: str,
    dtype_name: str,
    device: str,
    storage_options: dict,
    variant: str | None = None,
    offload: bool = False,
):
    """A family's pipeline on `device`: tiny, random (the published architecture), or `ref` (hub id, local
    dir, s3:// URL)."""
    import diffusers

    info = FAMILIES[family]
    cls = getattr(diffusers, info.pipeline)
    if dtype_name == "auto" and device.startswith("cuda"):
        dtype_name = info.dtype_on_gpu
    dtype = torch_dtype(dtype_name, device)
    if profile == "random":
        from factory.models.random_weights import T2I, pipeline_components

        build_on = "cpu" if offload and device.startswith("cuda") else device
        extra = {"add_watermarker": False} if family == "sdxl" else {}
        pipe = cls(**pipeline_components(T2I[family], build_on, dtype), **extra)
        return _placed(pipe, cls, device, offload)
    if profile == "tiny":
        ref = path = tiny_t2i_dir(family)
        variant = None
    else:
        ref = ref or info.default_model
        path = resolve_model_path(ref, storage_options)
    kwargs = {"dtype": dtype}
    if variant:
        kwargs["variant"] = variant
    return _placed(from_pretrained(cls, ref, path, **kwargs), cls, device, offload)


def _placed(pipe: Any, cls: type, device: str, offload: bool):
    if offload and device.startswith("cuda"):
        pipe.enable_model_cpu_offload()  # each component visits the GPU only while it runs
    else:
        pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    # The pipelines log every truncated prompt in full; the stage records truncation in each sample's json.
    logging.getLogger(cls.__module__).setLevel(logging.ERROR)
    return pipe
