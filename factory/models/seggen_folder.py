"""A SegGen model folder, as `factory train text2mask|mask2img` writes it and the SegGen stages load it:

    unet/ (Text2Mask) or controlnet/ (Mask2Img)   save_pretrained folder
    palette.json                                   the colours the model draws / was conditioned on
    seggen.json                                    kind, base model, resolution, steps trained

Everything else (VAE, both text encoders and tokenizers, scheduler) comes from the SDXL base model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

MODEL_INFO = "seggen.json"


SUBFOLDER = {"text2mask": "unet", "mask2img": "controlnet"}


def controlnet_from_unet(unet: Any, vae_config: dict) -> Any:
    """A ControlNet initialised from the UNet, its conditioning encoder downsampling as much as the VAE.

    The encoder halves the colour map once per channel step after the first, and must land on the latent
    size: SDXL's VAE (x8) takes diffusers' default (16, 32, 96, 256), the tiny one (x2) (16, 32).
    """
    from diffusers import ControlNetModel

    steps = len(vae_config["block_out_channels"])
    return ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32, 96, 256)[:steps])


def write_model_info(target: Path, kind: str, **info: Any) -> None:
    (Path(target) / MODEL_INFO).write_text(json.dumps({"kind": kind, **info}, indent=1, sort_keys=True))
