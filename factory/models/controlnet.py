"""The Stable Diffusion 1.5 seg ControlNet pipeline of the Diffusion Synthesis recipe: pretrained, tiny or random."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from factory.models.loading import from_pretrained, resolve_model_path, torch_dtype
from factory.models.tiny_diffusion import tiny_controlnet_pipeline_dir


def load_controlnet_pipeline(model_cfg: Any, device: str, dtype_name: str):
    """A StableDiffusionControlNetPipeline on `device`: real or tiny through `from_pretrained`, or random.

    `model_cfg` has `profile`, `base`, `controlnet` and `storage_options` (the stage's Model section).
    """
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    dtype = torch_dtype(dtype_name, device)
    if model_cfg.profile == "random":
        from factory.models import random_weights

        pipe = StableDiffusionControlNetPipeline(
            **random_weights.pipeline_components(random_weights.SD15, device, dtype),
            controlnet=random_weights.diffusers_component(random_weights.SD_CONTROLNET_SEG, "", device, dtype),
            requires_safety_checker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe
    if model_cfg.profile == "tiny":
        base_ref = base = tiny_controlnet_pipeline_dir()
        controlnet_ref = controlnet = str(Path(base) / "controlnet")
    else:
        base_ref, controlnet_ref = model_cfg.base, model_cfg.controlnet
        base = resolve_model_path(base_ref, model_cfg.storage_options)
        controlnet = resolve_model_path(controlnet_ref, model_cfg.storage_options)
    cn = from_pretrained(ControlNetModel, controlnet_ref, controlnet, dtype=dtype)
    pipe = from_pretrained(
        StableDiffusionControlNetPipeline,
        base_ref,
        base,
        controlnet=cn,
        safety_checker=None,
        requires_safety_checker=False,
        dtype=dtype,
    )
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe
