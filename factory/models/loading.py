"""Model loading shared by the model stages: where weights come from, and the tiny test profile.

Weights are named three ways: a Hugging Face hub id (left to `from_pretrained`, at the commit the job
pinned), a local directory, or an fsspec URL (`s3://`, `gs://`, ...) that is copied once per node into a
local cache, because `from_pretrained` only reads local files (pinning and verifying: weights.py). Every
model also has a tiny profile: the same classes built from small configs with random weights, saved once
and then loaded through the same `from_pretrained` calls as real weights, so tests and GPU-less machines
exercise the real loading code.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from factory.models.weights import (
    WeightsSource,
    check_local,
    expected_pin,
    fetch_object,
    hub_revision,
    is_hub_id,
    plain_ref,
)
from factory.schema import StrictModel

log = logging.getLogger(__name__)

Profile = Literal["pretrained", "tiny", "random"]
PROFILE_HELP = (
    "pretrained: the named weights; tiny: small random-weight models (tests); random: the real "
    "architecture with random weights, from configs shipped in the package (benchmarks, memory planning)"
)
Dtype = Literal["auto", "fp16", "bf16", "fp32"]


class ModelConfig(StrictModel):
    """What the `model` section of every model stage has: the profile, how to reach object storage, and
    which hub revision to load."""

    profile: Profile = Field("pretrained", description=PROFILE_HELP)
    storage_options: dict = Field(default_factory=dict, description="fsspec options for object-store URLs")
    revision: str | dict[str, str] | None = Field(
        None,
        description="hub models: a commit hash, or a branch or tag resolved to its commit when the job is planned "
        "(by default main); one value for the stage's one hub model, or {model name: revision} for several",
    )

    def weight_sources(self, ids: dict[str, str]) -> dict[str, WeightsSource]:
        """The models among `ids` (a stage's `model_ids()`) that load real weights, with this section's
        storage options and revisions. Raises ValueError naming `revision` if it names no hub model."""
        refs = {name: ref for name, ref in ids.items() if not ref.startswith(("tiny:", "random:"))}
        hub = [name for name, ref in refs.items() if is_hub_id(plain_ref(ref))]
        if isinstance(self.revision, str):
            if len(hub) != 1:
                raise ValueError(
                    f"revision: one revision needs exactly one hub model in the stage, and it loads {len(hub)} "
                    f"({', '.join(hub) or 'none'}); give {{model name: revision}} instead"
                )
            revisions = {hub[0]: self.revision}
        else:
            revisions = dict(self.revision or {})
        for name in revisions:
            if name not in hub:
                raise ValueError(
                    f"revision.{name}: the stage loads no hub model named {name!r}; its hub models: "
                    f"{', '.join(hub) or 'none'} (local paths and URLs are pinned by their files)"
                )
        return {name: WeightsSource(ref, self.storage_options, revisions.get(name)) for name, ref in refs.items()}


def resolve_model_path(ref: str, storage_options: dict | None = None) -> str:
    """A name `from_pretrained` can load: hub ids unchanged, local paths checked, URLs copied to the cache.

    Under a job's pins (weights.py), a local path must still hold the pinned files and a URL is copied from
    the pinned objects; a hub id is loaded at its pinned commit by `from_pretrained`.
    """
    ref = plain_ref(ref)
    if "://" in ref:
        return fetch_object(ref, storage_options)
    path = Path(ref).expanduser()
    if path.exists():
        pinned = expected_pin(ref)
        if pinned is not None:
            check_local(pinned, path)
        return str(path)
    if is_hub_id(ref):
        return ref
    raise FileNotFoundError(f"model path {ref!r} does not exist (and is not a hub id like 'org/name')")


def from_pretrained(cls: Any, ref: str, resolved: str, **kwargs: Any) -> Any:
    """`cls.from_pretrained(resolved)`, with a clear error when a hub id cannot be fetched."""
    _quiet_loading()
    if is_hub_id(resolved) and "revision" not in kwargs and (revision := hub_revision(ref)) is not None:
        kwargs["revision"] = revision
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
