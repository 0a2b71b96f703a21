"""The `random` profile: the real architecture of a published model, with random weights, from shipped configs.

`factory/data/model_configs/<name>/` holds the config files of the public checkpoints (diffusers'
`model_index.json` and per-component `config.json`, transformers' `config.json` and
`preprocessor_config.json`): config facts only, no weights, so nothing is downloaded. A model is built
straight on its device in its dtype (or on `meta` to count parameters for free). Used for benchmarks, for
memory planning (how many actors fit on a GPU), and to smoke-test the real-size code paths anywhere.

Tokenizers are the tiny ones (`factory.models`): every id they produce lies inside the real vocabulary
and the text encoders pad to their full length (77 CLIP tokens, `max_sequence_length` T5/Gemma tokens),
so the compute per call is the real model's. Special-token ids in a text config are set to the tiny
tokenizer's, which changes no shape.
"""

from __future__ import annotations

import json
import tempfile
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Any

from factory.models import tiny_bert_tokenizer, tiny_gemma_tokenizer, tiny_t5_tokenizer, write_tiny_clip_tokenizer

# Names of the config folders, by the role they play in the stages.
SD15 = "stable-diffusion-v1-5"
SD_CONTROLNET_SEG = "sd-controlnet-seg"
SDXL = "stable-diffusion-xl-base-1.0"
SDXL_CONTROLNET = "controlnet-sdxl-1.0"
T2I = {"flux": "FLUX.1-dev", "sd3": "stable-diffusion-3.5-large", "sana": "Sana_1600M_1024px", "sdxl": SDXL}
BLIP = {"blip": "blip-image-captioning-large", "blip2": "blip2-opt-2.7b"}
CLIP_L = "clip-vit-large-patch14"
DINOV2 = "dinov2-base"
GROUNDING_DINO = "grounding-dino-base"
VLM = "gemma-3-4b-it"


def config_dir(name: str) -> Path:
    path = Path(str(resources.files("factory.data") / "model_configs" / name))
    if not path.is_dir():
        raise FileNotFoundError(f"no shipped model config {name!r} under factory/data/model_configs")
    return path


def read_config(name: str, *parts: str) -> dict:
    return json.loads((config_dir(name).joinpath(*parts)).read_text())


def random_id(name: str) -> str:
    """How a random-weight model is named in sample json and stats."""
    return f"random:{name}"


@contextmanager
def building(device: str, dtype):
    """Parameters are created on `device` in `dtype`: no fp32 copy on the host, no second copy on the GPU."""
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


# ---------------------------------------------------------------- transformers models


def transformers_config(name: str, file: str = "config.json"):
    from transformers import AutoConfig

    data = read_config(name, file)
    return AutoConfig.for_model(data.pop("model_type"), **data)


def transformers_model(cls: Any, config: Any, device: str, dtype) -> Any:
    with building(device, dtype):
        model = cls._from_config(config, dtype=dtype)
    return model.eval()


def image_processor(name: str):
    from transformers import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(str(config_dir(name)))


def align_special_tokens(config: Any, tokenizer: Any) -> None:
    """The text config's bos/eos/pad/sep ids set to the tokenizer's (the vocabulary size stays the real one)."""
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id"):
        token_id = getattr(tokenizer, attr, None)
        if token_id is not None and hasattr(config, attr):
            setattr(config, attr, token_id)


# ---------------------------------------------------------------- diffusers pipelines


def _tokenizer(class_name: str, work_dir: Path):
    if class_name.startswith("CLIPTokenizer"):
        return write_tiny_clip_tokenizer(work_dir)
    if class_name.startswith("T5Tokenizer"):
        return tiny_t5_tokenizer()
    if class_name.startswith("GemmaTokenizer"):
        return tiny_gemma_tokenizer()
    raise ValueError(f"no tiny tokenizer for {class_name}")


def diffusers_component(name: str, component: str, device: str, dtype) -> Any:
    """One model of a pipeline folder (`unet`, `vae`, `transformer`, ...) or a single-model folder ('')."""
    import diffusers

    config = read_config(name, component, "config.json") if component else read_config(name, "config.json")
    cls = getattr(diffusers, config["_class_name"])
    with building(device, dtype):
        return cls.from_config(config).eval()


def pipeline_components(name: str, device: str, dtype, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """Every component `model_index.json` names, built with random weights; `skip` leaves some out."""
    import diffusers
    import transformers

    index = read_config(name, "model_index.json")
    components: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as work:
        for key, value in index.items():
            if key.startswith("_") or key in skip:
                continue
            library, class_name = value
            if library is None:
                components[key] = None
            elif key.startswith("tokenizer"):
                components[key] = _tokenizer(class_name, Path(work))
            elif key.startswith("scheduler"):
                components[key] = getattr(diffusers, class_name).from_config(
                    read_config(name, key, "scheduler_config.json"))
            elif library == "diffusers":
                components[key] = diffusers_component(name, key, device, dtype)
            else:
                cls = getattr(transformers, class_name)
                config = cls.config_class.from_dict(read_config(name, key, "config.json"))
                components[key] = (config, cls)  # built below, once its tokenizer is known
    for key, value in list(components.items()):
        if isinstance(value, tuple):
            config, cls = value
            tokenizer = components.get(key.replace("text_encoder", "tokenizer"))
            if tokenizer is not None:
                align_special_tokens(config, tokenizer)
            components[key] = transformers_model(cls, config, device, dtype)
    return components


def count_parameters(module: Any) -> int:
    return sum(p.numel() for p in module.parameters())
