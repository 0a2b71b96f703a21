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
import logging
import os
import re
import shutil
import socket
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from factory.schema import StrictModel
from factory.storage import url_to_fs

log = logging.getLogger(__name__)

Profile = Literal["pretrained", "tiny", "random"]
PROFILE_HELP = (
    "pretrained: the named weights; tiny: small random-weight models (tests); random: the real "
    "architecture with random weights, from configs shipped in the package (benchmarks, memory planning)"
)
Dtype = Literal["auto", "fp16", "bf16", "fp32"]


class ModelConfig(StrictModel):
    """What the `model` section of every model stage has: the profile, and how to reach object storage."""

    profile: Profile = Field("pretrained", description=PROFILE_HELP)
    storage_options: dict = Field(default_factory=dict, description="fsspec options for object-store URLs")


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
            record.write(
                f"{time.strftime('%Y-%m-%dT%H:%M:%S')} filled by {socket.gethostname()} "
                f"pid {os.getpid()} in {time.time() - started:.1f}s\n"
            )
    return dest


def is_hub_id(ref: str) -> bool:
    return "://" not in ref and not Path(ref).expanduser().exists() and bool(_HUB_ID.match(ref))


def resolve_model_path(ref: str, storage_options: dict | None = None) -> str:
    """A name `from_pretrained` can load: hub ids unchanged, local paths checked, URLs copied to the cache."""
    if ref.startswith("file://"):
        ref = ref[len("file://") :]
    if "://" not in ref:
        path = Path(ref).expanduser()
        if path.exists():
            return str(path)
        if _HUB_ID.match(ref):
            return ref
        raise FileNotFoundError(f"model path {ref!r} does not exist (and is not a hub id like 'org/name')")

    fs, root = url_to_fs(ref, storage_options)
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
            rel = src[len(root) :].lstrip("/")
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
