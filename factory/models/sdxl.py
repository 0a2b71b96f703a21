"""SDXL pieces shared by the SegGen stages and their training: model configs, tiny models, loading, prompts,
and the models plus denoising loss a training worker uses.

A SegGen model folder (what `factory train text2mask|mask2img` writes to `<output>/final/`) holds only
what training changed, beside the palette it was trained with:

    unet/ (Text2Mask) or controlnet/ (Mask2Img)   save_pretrained folder
    palette.json                                   the colours the model draws / was conditioned on
    seggen.json                                    kind, base model, resolution, steps trained

Everything else (VAE, both text encoders and tokenizers, scheduler) comes from the SDXL base model named
in the spec. The tiny profile builds an SDXL base with diffusers' test-sized configs and random weights,
and tiny Text2Mask / Mask2Img folders in the same layout, so tests load through the real code.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from factory.models.loading import Dtype, from_pretrained, resolve_model_path, torch_dtype
from factory.models.pipelines import DiffusionModelConfig
from factory.models.tiny_diffusion import TINY_MASK2IMG, TINY_SDXL, TINY_TEXT2MASK, tiny_sdxl_dir, tiny_seggen_dir
from factory.models.weights import hub_revision, is_hub_id
from factory.sources.classes import class_set
from factory.sources.palettes import Palette

SDXL_BASE = "stabilityai/stable-diffusion-xl-base-1.0"

Scheduler = Literal["base", "euler_karras", "dpmpp_2m_karras"]


class SDXLModelConfig(DiffusionModelConfig):
    """The `model` section of the SegGen stages."""

    base: str = Field(SDXL_BASE, description="SDXL base: hub id, local dir or s3:// URL (VAE, text encoders)")
    weights: str | None = Field(
        None, description="the model folder `factory train` wrote (<output>/final): local dir, s3:// URL or hub id"
    )
    vae: str | None = Field(None, description="optional VAE replacing the base's (e.g. an fp16-safe SDXL VAE)")
    dtype: Dtype = "auto"

    @model_validator(mode="after")
    def _pretrained_needs_weights(self):
        if self.profile == "pretrained" and not self.weights:
            raise ValueError("profile pretrained needs `weights`: the final/ folder of `factory train`")
        return self

    @property
    def pretrained_weights(self) -> str:
        """`weights`, which the pretrained profile has (the check above)."""
        if self.weights is None:
            raise ValueError("profile pretrained needs `weights`: the final/ folder of `factory train`")
        return self.weights


# ---------------------------------------------------------------- tiny models


# ---------------------------------------------------------------- loading


def weights_dir(ref: str, storage_options: dict | None = None) -> str:
    """A local folder holding a SegGen model: local paths as they are, URLs copied, hub ids downloaded."""
    resolved = resolve_model_path(ref, storage_options)
    if not is_hub_id(resolved):
        return resolved
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(resolved, revision=hub_revision(ref))
    except Exception as e:  # offline, unknown repo: the same advice as from_pretrained's
        raise OSError(
            f"cannot fetch SegGen model {ref!r} from the Hugging Face hub ({type(e).__name__}: {e}). Give the "
            "local folder or object-store URL that `factory train` wrote (<output>/final) instead."
        ) from e


def base_ref(model: SDXLModelConfig) -> tuple[str, str]:
    """(name recorded, name loaded) of the SDXL base."""
    if model.profile == "tiny":
        return f"tiny:{TINY_SDXL}", tiny_sdxl_dir()
    return model.base, resolve_model_path(model.base, model.storage_options)


def model_ids(model: SDXLModelConfig, kind: str) -> dict[str, str]:
    if model.profile == "random":
        from factory.models.random_weights import SDXL, SDXL_CONTROLNET, random_id

        return {"base": random_id(SDXL), kind: random_id(SDXL if kind == "text2mask" else SDXL_CONTROLNET)}
    if model.profile == "tiny":
        name = TINY_TEXT2MASK if kind == "text2mask" else TINY_MASK2IMG
        return {"base": f"tiny:{TINY_SDXL}", kind: f"tiny:{name}"}
    ids = {"base": model.base, kind: model.pretrained_weights}
    if model.vae:
        ids["vae"] = model.vae
    return ids


def load_seggen_pipeline(model: SDXLModelConfig, kind: str, device: str) -> tuple[Any, Palette]:
    """The generation pipeline of a SegGen model on `device`, and the palette stored with it.

    text2mask: StableDiffusionXLPipeline with the fine-tuned UNet; mask2img:
    StableDiffusionXLControlNetPipeline with the trained ControlNet on the frozen base.
    """
    from diffusers import (
        AutoencoderKL,
        ControlNetModel,
        StableDiffusionXLControlNetPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )

    dtype = torch_dtype(model.dtype, device)
    if model.profile == "random":
        return _random_seggen_pipeline(kind, device, dtype), Palette.for_classes(class_set("ade150"))
    base_name, base = base_ref(model)
    if model.profile == "tiny":
        weights_name, folder = f"tiny:{kind}", tiny_seggen_dir(kind)
    else:
        weights_name = model.pretrained_weights
        folder = weights_dir(weights_name, model.storage_options)
    palette = Palette.load(folder)
    extra = {}
    if model.vae:
        extra["vae"] = from_pretrained(
            AutoencoderKL, model.vae, resolve_model_path(model.vae, model.storage_options), dtype=dtype
        )
    if kind == "text2mask":
        unet = from_pretrained(UNet2DConditionModel, weights_name, folder, subfolder="unet", dtype=dtype)
        pipe = from_pretrained(
            StableDiffusionXLPipeline, base_name, base, unet=unet, dtype=dtype, add_watermarker=False, **extra
        )
    else:
        controlnet = from_pretrained(ControlNetModel, weights_name, folder, subfolder="controlnet", dtype=dtype)
        pipe = from_pretrained(
            StableDiffusionXLControlNetPipeline,
            base_name,
            base,
            controlnet=controlnet,
            dtype=dtype,
            add_watermarker=False,
            **extra,
        )
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe, palette


def _random_seggen_pipeline(kind: str, device: str, dtype) -> Any:
    """The SDXL base with random weights; mask2img adds a full-size SDXL ControlNet (the UNet's encoder)."""
    from diffusers import StableDiffusionXLControlNetPipeline, StableDiffusionXLPipeline

    from factory.models import random_weights

    parts = random_weights.pipeline_components(random_weights.SDXL, device, dtype)
    if kind == "text2mask":
        pipe = StableDiffusionXLPipeline(**parts, add_watermarker=False)
    else:
        controlnet = random_weights.diffusers_component(random_weights.SDXL_CONTROLNET, "", device, dtype)
        pipe = StableDiffusionXLControlNetPipeline(**parts, controlnet=controlnet, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def use_scheduler(pipe: Any, name: Scheduler) -> None:
    """Swap the sampler; the Karras ones take the base's noise schedule and space sigmas as in EDM."""
    from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler

    if name == "euler_karras":
        pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, use_karras_sigmas=True)
    elif name == "dpmpp_2m_karras":
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(
            pipe.scheduler.config, use_karras_sigmas=True, algorithm_type="dpmsolver++", solver_order=2
        )


# ---------------------------------------------------------------- training
