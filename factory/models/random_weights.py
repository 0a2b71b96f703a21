"""The `random` profile: the real architecture of a published model, with random weights, from shipped configs.

`factory/data/model_configs/<name>/` holds the config files of the public checkpoints (diffusers'
`model_index.json` and per-component `config.json`, transformers' `config.json` and
`preprocessor_config.json`): config facts only, no weights, so nothing is downloaded. A model is built
straight on its device in its dtype (or on `meta` to count parameters for free). Used for benchmarks, for
memory planning (how many actors fit on a GPU), and to smoke-test the real-size code paths anywhere.

Tokenizers are the tiny ones (`factory.models.loading`): every id they produce lies inside the real vocabulary
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

from factory.models.tokenizers import tiny_gemma_tokenizer, tiny_t5_tokenizer, write_tiny_clip_tokenizer

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


# Random weights are cycled from one block of uniform noise of this (prime) length: torch's CPU random
# number generator takes ~8 s per billion values (measured here), a copy a fraction of that.
_PERIOD = 1_000_003
_blocks: dict = {}


def _block(device, dtype):
    import torch

    key = (str(device), dtype)
    if key not in _blocks:
        # On the CPU, with a CPU generator, whatever the default device (`building` sets it to the model's, and
        # a CUDA default device with a CPU generator raises): the same weights on every device.
        noise = torch.rand(_PERIOD, generator=torch.Generator().manual_seed(0), dtype=torch.float32, device="cpu")
        noise = noise * 2 - 1
        _blocks[key] = noise.to(device=device, dtype=dtype)
    return _blocks[key]


def _fill_uniform(tensor, low: float, high: float):
    """`tensor` filled with values spread uniformly over [low, high), cycled from the noise block."""
    import torch

    if tensor.is_meta or not tensor.is_floating_point() or not tensor.is_contiguous():
        return tensor
    with torch.no_grad():
        flat, block = tensor.view(-1), _block(tensor.device, tensor.dtype)
        for start in range(0, flat.numel(), _PERIOD):
            part = flat[start : start + _PERIOD]
            part.copy_(block[: part.numel()])
        flat.mul_((high - low) / 2).add_((high + low) / 2)
    return tensor


def _fast_init_functions() -> dict:
    """torch.nn.init's random initialisers, same bounds and variances, filled from the noise block."""
    import math

    from torch.nn import init

    def uniform_(tensor, a=0.0, b=1.0, generator=None):
        return _fill_uniform(tensor, a, b)

    def normal_(tensor, mean=0.0, std=1.0, generator=None):
        return _fill_uniform(tensor, mean - math.sqrt(3) * std, mean + math.sqrt(3) * std)

    def trunc_normal_(tensor, mean=0.0, std=1.0, a=-2.0, b=2.0, generator=None):
        bound = min(math.sqrt(3) * std, b - mean, mean - a)
        return _fill_uniform(tensor, mean - bound, mean + bound)

    def kaiming_(tensor, a=0, mode="fan_in", nonlinearity="leaky_relu", generator=None):
        std = init.calculate_gain(nonlinearity, a) / math.sqrt(init._calculate_correct_fan(tensor, mode))
        return normal_(tensor, 0.0, std)

    def xavier_(tensor, gain=1.0, generator=None):
        fan_in, fan_out = init._calculate_fan_in_and_fan_out(tensor)
        return normal_(tensor, 0.0, gain * math.sqrt(2.0 / (fan_in + fan_out)))

    def orthogonal_(tensor, gain=1, generator=None):
        return normal_(tensor, 0.0, gain / math.sqrt(tensor.shape[-1]))

    return {
        "uniform_": uniform_,
        "normal_": normal_,
        "trunc_normal_": trunc_normal_,
        "kaiming_uniform_": kaiming_,
        "kaiming_normal_": kaiming_,
        "xavier_uniform_": xavier_,
        "xavier_normal_": xavier_,
        "orthogonal_": orthogonal_,
    }


@contextmanager
def building(device: str, dtype):
    """Parameters are created on `device` in `dtype` (no fp32 copy on the host, no second copy on the GPU),
    with torch's random initialisers replaced by `_fast_init_functions` (transformers' too)."""
    import sys

    import torch
    from transformers import initialization

    fast = _fast_init_functions()
    patched = [
        (module, name, getattr(module, name))
        for module in (sys.modules[m] for m in initialization.TORCH_MODULES_TO_PATCH if m in sys.modules)
        for name in fast
        if hasattr(module, name)
    ]
    originals = {name: initialization.TORCH_INIT_FUNCTIONS[name] for name in fast}
    previous = torch.get_default_dtype()
    try:
        for module, name, _ in patched:
            setattr(module, name, fast[name])
        initialization.TORCH_INIT_FUNCTIONS.update(fast)
        torch.set_default_dtype(dtype)
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)
        initialization.TORCH_INIT_FUNCTIONS.update(originals)
        for module, name, original in patched:
            setattr(module, name, original)


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


def component(name: str, key: str, device: str, dtype, work_dir: Path) -> Any:
    """One entry of a pipeline folder's `model_index.json`, built: a model with random weights, a scheduler
    from its config, a tiny tokenizer; a text encoder takes the special-token ids of its tokenizer."""
    import diffusers
    import transformers

    library, class_name = read_config(name, "model_index.json")[key]
    if library is None:
        return None
    if key.startswith("tokenizer"):
        return _tokenizer(class_name, work_dir)
    if key.startswith("scheduler"):
        return getattr(diffusers, class_name).from_config(read_config(name, key, "scheduler_config.json"))
    if library == "diffusers":
        return diffusers_component(name, key, device, dtype)
    cls = getattr(transformers, class_name)
    config = cls.config_class.from_dict(read_config(name, key, "config.json"))
    tokenizer_key = key.replace("text_encoder", "tokenizer")
    if tokenizer_key != key:
        align_special_tokens(config, component(name, tokenizer_key, device, dtype, work_dir))
    return transformers_model(cls, config, device, dtype)


def pipeline_components(name: str, device: str, dtype, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """Every component `model_index.json` names, built; `skip` leaves some out."""
    keys = [k for k in read_config(name, "model_index.json") if not k.startswith("_") and k not in skip]
    with tempfile.TemporaryDirectory() as work:
        return {key: component(name, key, device, dtype, Path(work)) for key in keys}


def count_parameters(module: Any) -> int:
    """Parameters, each counted once: a tied LM head (BLIP-2's OPT, Gemma) is its input embedding."""
    return sum(p.numel() for p in module.parameters())


def weight_bytes(module: Any) -> int:
    """Bytes a model's weights take on its device, what memory planning counts per model copy: every
    parameter and every persistent buffer (what its `state_dict` holds: SD3.5-large's 89.7M-value
    `pos_embed` table is one), each at its own dtype's size, a tensor shared by several modules counted
    once. Non-persistent buffers (rotary `inv_freq` tables and the like) are computed from the config, not
    weights, and are left out."""
    seen: set[int] = set()
    total = 0
    for sub in module.modules():
        skip = sub._non_persistent_buffers_set
        tensors = [*sub._parameters.values(), *(b for name, b in sub._buffers.items() if name not in skip)]
        for tensor in tensors:
            if tensor is not None and id(tensor) not in seen:
                seen.add(id(tensor))
                total += tensor.numel() * tensor.element_size()
    return total
