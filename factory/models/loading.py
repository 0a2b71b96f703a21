"""Model loading shared by the model stages: where weights come from, and the tiny test profile.

Weights are named three ways: a Hugging Face hub id (left to `from_pretrained`), a local directory, or
an fsspec URL (`s3://`, `gs://`, ...) that is copied once per node into a local cache, because
`from_pretrained` only reads local files. Every model also has a tiny profile: the same classes built
from small configs with random weights, saved once and then loaded through the same `from_pretrained`
calls as real weights, so tests and GPU-less machines exercise the real loading code.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import string
import socket
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import fsspec

log = logging.getLogger(__name__)

TINY_CONTROLNET = "controlnet-seg-sd15-v1"
_COMPLETE = ".factory-complete"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def model_cache_dir() -> Path:
    """The node-local model cache; read at call time so tests and jobs can point it elsewhere."""
    return Path(os.environ.get("FACTORY_MODEL_CACHE") or "~/.cache/factory/models").expanduser()


@contextmanager
def _file_lock(path: Path):
    """An exclusive fcntl lock: every actor on a node takes it, so only the first one fills the cache."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def fill_once(dest: Path, fill: Callable[[Path], None]) -> Path:
    """Run `fill(dest)` once per node; the completion marker is written last, so a crash mid-way is redone.

    Every fill that completes appends a line to `<dest>.log` beside the entry (when, which process, how
    long), so "was this model fetched once on this node?" has an answer after the fact.
    """
    if (dest / _COMPLETE).is_file():
        return dest
    with _file_lock(dest.with_name(dest.name + ".lock")):
        if (dest / _COMPLETE).is_file():  # another process finished while we waited for the lock
            return dest
        shutil.rmtree(dest, ignore_errors=True)  # leftovers of an interrupted fill
        dest.mkdir(parents=True)
        started = time.time()
        fill(dest)
        (dest / _COMPLETE).write_text("ok\n")
        with open(dest.with_name(dest.name + ".log"), "a") as record:
            record.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} filled by {socket.gethostname()} "
                         f"pid {os.getpid()} in {time.time() - started:.1f}s\n")
    return dest


def is_hub_id(ref: str) -> bool:
    return "://" not in ref and not Path(ref).expanduser().exists() and bool(_HUB_ID.match(ref))


def resolve_model_path(ref: str, storage_options: dict | None = None) -> str:
    """A name `from_pretrained` can load: hub ids unchanged, local paths checked, URLs copied to the cache."""
    if ref.startswith("file://"):
        ref = ref[len("file://"):]
    if "://" not in ref:
        path = Path(ref).expanduser()
        if path.exists():
            return str(path)
        if _HUB_ID.match(ref):
            return ref
        raise FileNotFoundError(f"model path {ref!r} does not exist (and is not a hub id like 'org/name')")

    fs, root = fsspec.core.url_to_fs(ref, **(storage_options or {}))
    root = root.rstrip("/")
    name = re.sub(r"[^\w.-]", "_", root.rsplit("/", 1)[-1])[:64]
    dest = model_cache_dir() / f"{hashlib.sha256(ref.encode()).hexdigest()[:16]}-{name}"

    def copy(target: Path) -> None:
        if not fs.exists(root):
            raise FileNotFoundError(f"model URL {ref!r} does not exist")
        log.info("copying model %s to %s", ref, target)
        if fs.isfile(root):
            fs.get_file(root, str(target / name))
            return
        for src in fs.find(root, withdirs=False):
            rel = src[len(root):].lstrip("/")
            (target / rel).parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(src, str(target / rel))

    fill_once(dest, copy)
    # A single weights file is returned as that file; a prefix as the directory holding its files.
    single = dest / name
    return str(single) if single.is_file() else str(dest)


def from_pretrained(cls: Any, ref: str, resolved: str, **kwargs: Any) -> Any:
    """`cls.from_pretrained(resolved)`, with a clear error when a hub id cannot be fetched."""
    _quiet_loading()
    try:
        return cls.from_pretrained(resolved, **kwargs)
    except (OSError, ValueError) as e:  # huggingface_hub's errors derive from OSError / ValueError
        if not is_hub_id(resolved):
            raise
        raise OSError(
            f"cannot load {cls.__name__} {ref!r} from the Hugging Face hub: the hub is unreachable from this "
            "machine (or offline mode is on) and the model is not in the local HF cache. Give a local "
            "directory or an object-store URL (s3://bucket/prefix, with storage_options) holding the "
            f"model's files instead. Cause: {type(e).__name__}: {e}"
        ) from e


def _quiet_loading() -> None:
    """No per-file loading bars: every actor loads its models, and the job's own progress line is the one
    to read in the driver's log."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def write_tiny_clip_tokenizer(target: Path):
    """A byte-level CLIP BPE tokenizer with every byte in its vocabulary, so any prompt tokenizes."""
    from transformers import CLIPTokenizer

    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    # GPT-2's byte -> unicode table: bytes that are not printable get code points from 256 upwards.
    chars = [chr(b) for b in printable] + [chr(256 + i) for i in range(256 - len(printable))]
    vocab: dict[str, int] = {}
    for suffix in ("", "</w>"):
        for c in chars:
            vocab[c + suffix] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    with tempfile.TemporaryDirectory(dir=target) as tmp:
        Path(tmp, "vocab.json").write_text(json.dumps(vocab))
        Path(tmp, "merges.txt").write_text("#version: 0.2\n")
        return CLIPTokenizer.from_pretrained(tmp, model_max_length=77)


def tiny_bert_tokenizer(extra_tokens: tuple[str, ...] = (), **kwargs):
    """A WordPiece tokenizer whose vocabulary is every lowercase letter, digit and punctuation mark.

    Each character also exists as a `##` continuation, so any ASCII text tokenizes without [UNK]
    (one token per character), which is all a model with random weights needs.
    """
    from transformers import BertTokenizer

    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *extra_tokens, *chars, *("##" + c for c in chars)]
    return BertTokenizer(vocab={w: i for i, w in enumerate(words)}, **kwargs)


def tiny_t5_tokenizer():
    """A T5 Unigram tokenizer over single characters: any ASCII text tokenizes, ids stay below 100."""
    from transformers import T5Tokenizer

    chars = string.ascii_letters + string.digits + string.punctuation
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [("▁" + c, -3.0) for c in chars] + [(c, -4.0) for c in chars]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=512)


def tiny_gemma_tokenizer():
    """A Gemma BPE without merges (one token per character), with Gemma's pad/eos/bos ids 0/1/2."""
    from transformers import GemmaTokenizer

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4, "▁": 5}
    for c in string.ascii_letters + string.digits + string.punctuation + "\n":
        vocab.setdefault(c, len(vocab))
    return GemmaTokenizer(vocab=vocab, merges=[])


def _build_tiny_controlnet(target: Path) -> None:
    import torch
    from diffusers import (AutoencoderKL, ControlNetModel, StableDiffusionControlNetPipeline,
                           UNet2DConditionModel, UniPCMultistepScheduler)
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = write_tiny_clip_tokenizer(target)
    # Same block layout as SD1.5 (cross-attention blocks first), at diffusers' test sizes.
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
    )
    torch.manual_seed(0)
    controlnet = ControlNetModel(
        block_out_channels=(32, 64), layers_per_block=2, in_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), cross_attention_dim=32,
        conditioning_embedding_out_channels=(16, 32),
    )
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=[32, 64], in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
    )
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
        vocab_size=1000, max_position_embeddings=77, layer_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ))
    scheduler = UniPCMultistepScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
    )
    pipe = StableDiffusionControlNetPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, controlnet=controlnet,
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(str(target))


def tiny_controlnet_pipeline_dir() -> str:
    """Directory of the tiny seg ControlNet pipeline (random weights), built once per node."""
    return str(fill_once(model_cache_dir() / "tiny" / TINY_CONTROLNET, _build_tiny_controlnet))


def torch_dtype(dtype_name: str, device: str):
    """The dtype to load with: fp16 on GPUs by default; fp16 on CPU falls back to fp32 (slow, ops missing)."""
    import torch

    cuda = device.startswith("cuda")
    if dtype_name == "auto":
        return torch.float16 if cuda else torch.float32
    if dtype_name == "fp16" and not cuda:
        log.warning("dtype fp16 is not usable on %s; loading in fp32", device)
        return torch.float32
    table = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    if dtype_name not in table:
        raise ValueError(f"unknown dtype {dtype_name!r}; use auto, fp16, bf16 or fp32")
    return table[dtype_name]


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
        StableDiffusionControlNetPipeline, base_ref, base,
        controlnet=cn, safety_checker=None, requires_safety_checker=False, dtype=dtype,
    )
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe
