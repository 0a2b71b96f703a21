"""Reading the committed shards of a job's output: samples, their decoded arrays, the failure records.

Everything here streams. A shard is read as a tar stream (webdataset's tar expander and key grouping
over an fsspec file), failures one shard's file at a time: memory stays flat whatever the number of
shards and samples. The loader, `status`, `preview`, `report`, `select` and `captions` read through here.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterable, Iterator

import numpy as np
from PIL import Image
from webdataset.tariterators import group_by_keys, tar_file_expander

from factory.output.layout import FAILURES_DIR, OutputStore, shard_name

IMAGE_EXTS = ("jpg", "png")


# ---------------------------------------------------------------- samples


def iter_shard_samples(
    store: OutputStore, shard: int, select_files: Callable[[str], bool] | None = None
) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) for each sample of a committed shard, in tar order.

    `select_files` (a predicate on member names, e.g. only `.json`) skips the other members' bytes, so a
    pass over the scores does not hold the pixels.
    """
    with store.fs.open(store.shard_path(shard), "rb") as f:
        members = tar_file_expander([{"url": store.shard_path(shard), "stream": f}], select_files=select_files)
        for sample in group_by_keys(members):
            key = sample.pop("__key__")
            sample.pop("__url__")
            yield key, sample


def iter_samples(
    store: OutputStore, shards: Iterable[int] | None = None, select_files: Callable[[str], bool] | None = None
) -> Iterator[tuple[int, str, dict[str, bytes]]]:
    """(shard, key, files) over the given shards (default: every committed one), in shard order."""
    for shard in store.committed_shards() if shards is None else shards:
        for key, files in iter_shard_samples(store, shard, select_files):
            yield shard, key, files


def only_json(name: str) -> bool:
    return name.endswith(".json")


def sample_meta(files: dict[str, bytes]) -> dict:
    return json.loads(files["json"])


def image_bytes(files: dict[str, bytes]) -> bytes:
    return files[next(e for e in IMAGE_EXTS if e in files)]


def decode_image(files: dict[str, bytes]) -> np.ndarray:
    """The sample's image as (H, W, 3) uint8 RGB."""
    return decode_image_bytes(image_bytes(files))


def decode_mask(files: dict[str, bytes]) -> np.ndarray | None:
    """The class-id mask, bit-exact: uint8 (uint16 for class sets over 254), or None if the sample has none."""
    return decode_mask_bytes(files["seg.png"]) if "seg.png" in files else None


def decode_image_bytes(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def decode_mask_bytes(data: bytes) -> np.ndarray:
    """A `seg.png`: 8-bit stays uint8, 16-bit becomes uint16 (PIL reads it as int32 or uint16)."""
    mask = np.asarray(Image.open(io.BytesIO(data)))
    if mask.ndim != 2:
        raise ValueError(f"seg.png has shape {mask.shape}: not a single-channel class-id mask")
    return mask if mask.dtype == np.uint8 else mask.astype(np.uint16)


# ---------------------------------------------------------------- failures


def iter_failures(store: OutputStore, shards: Iterable[int] | None = None) -> Iterator[tuple[int, dict]]:
    """(shard, record) for every failed or rejected sample, from `failures/shard-N.jsonl`, line by line."""
    for shard in store.committed_shards() if shards is None else shards:
        path = store.path(FAILURES_DIR, f"{shard_name(shard)}.jsonl")
        try:
            f = store.fs.open(path, "rt")
        except FileNotFoundError:
            continue
        with f:
            for line in f:
                if line.strip():
                    yield shard, json.loads(line)
