"""Reading a job's output: the one module that does, for the loader, `status`, `preview`, `report`,
`select` and `captions`.

Everything here streams. A shard is read as a tar stream (webdataset's tar expander and key grouping
over an fsspec file), stats and failures one shard file at a time, a selection one shard's key list at a
time: memory stays flat whatever the number of shards and samples.

A selection (written by `factory select`) is two things under `selections/`:
    NAME.json                 the summary: score, fraction, order, threshold, kept and dropped counts
    NAME/shard-000000.txt     the keys kept from that shard, one per line, in shard order
A shard the selection has no key file for (committed after the selection was made) contributes nothing.
"""

from __future__ import annotations

import io
import json
from collections import Counter
from typing import Any, Callable, Iterable, Iterator

import numpy as np
from PIL import Image
from webdataset.tariterators import group_by_keys, tar_file_expander

from factory.store import FAILURES_DIR, OutputStore

SELECTIONS_DIR = "selections"
IMAGE_EXTS = ("jpg", "png")


def open_output(url: str, storage_options: dict[str, Any] | None = None,
                endpoint_url: str | None = None) -> OutputStore:
    """The output at `url` (a path, file://, s3://...); `endpoint_url` is the S3 endpoint shortcut."""
    options = dict(storage_options or {})
    if endpoint_url:
        options.setdefault("client_kwargs", {})["endpoint_url"] = endpoint_url
    return OutputStore(url, options)


def read_manifest(store: OutputStore) -> dict:
    manifest = store.read_json("manifest.json")
    if manifest is None:
        raise FileNotFoundError(f"{store.url}: no manifest.json, so no job has been planned here")
    return manifest


def committed_shards(store: OutputStore) -> list[int]:
    """The committed shard ids, ascending (one listing of `stats/`)."""
    return sorted(store.committed_shards())


# ---------------------------------------------------------------- samples


def iter_shard_samples(store: OutputStore, shard: int,
                       select_files: Callable[[str], bool] | None = None) -> Iterator[tuple[str, dict[str, bytes]]]:
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


def iter_samples(store: OutputStore, shards: Iterable[int] | None = None,
                 select_files: Callable[[str], bool] | None = None) -> Iterator[tuple[int, str, dict[str, bytes]]]:
    """(shard, key, files) over the given shards (default: every committed one), in shard order."""
    for shard in committed_shards(store) if shards is None else shards:
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


# ---------------------------------------------------------------- stats and failures


def iter_stats(store: OutputStore) -> Iterator[tuple[int, dict]]:
    """(shard, stats summary) of each committed shard, in shard order, a batch of files at a time."""
    return store.iter_stats()


def iter_failures(store: OutputStore, shards: Iterable[int] | None = None) -> Iterator[tuple[int, dict]]:
    """(shard, record) for every failed or rejected sample, from `failures/shard-N.jsonl`, line by line."""
    for shard in committed_shards(store) if shards is None else shards:
        path = store.path(FAILURES_DIR, f"{store.shard_name(shard)}.jsonl")
        try:
            f = store.fs.open(path, "rt")
        except FileNotFoundError:
            continue
        with f:
            for line in f:
                if line.strip():
                    yield shard, json.loads(line)


def job_status(store: OutputStore) -> dict:
    """Shards done, samples, failures by reason, rate and size, summed over the stats as they stream."""
    manifest = read_manifest(store)
    reasons: Counter = Counter()
    totals = {"samples": 0, "failed": 0, "rejected": 0, "bytes": 0}
    shards, started, finished = 0, None, None
    for _, s in iter_stats(store):
        shards += 1
        reasons.update(s["failures_by_reason"])
        reasons.update(s["rejected_by_reason"])
        for k in totals:
            totals[k] += s[k]
        started = s["started"] if started is None else min(started, s["started"])
        finished = s["finished"] if finished is None else max(finished, s["finished"])
    span = finished - started if shards else 0
    return {
        "job": manifest["name"],
        "spec_hash": manifest["spec_hash"],
        "shards_done": shards,
        "shards_total": manifest["plan"]["num_shards"],
        "sources_planned": manifest["plan"]["num_samples"],
        "samples": totals["samples"],
        "failed": totals["failed"],
        "rejected": totals["rejected"],
        "by_reason": dict(reasons),
        "samples_per_second": round(totals["samples"] / span, 3) if span > 0 else None,
        "bytes": totals["bytes"],
    }


# ---------------------------------------------------------------- selections


def selection_names(store: OutputStore) -> list[str]:
    store.fs.invalidate_cache()
    try:
        names = store.fs.ls(store.path(SELECTIONS_DIR), detail=False)
    except FileNotFoundError:
        return []
    return sorted(n.rsplit("/", 1)[-1][: -len(".json")] for n in names if n.endswith(".json"))


def read_selection(store: OutputStore, name: str) -> dict:
    summary = store.read_json(SELECTIONS_DIR, f"{name}.json")
    if summary is None:
        known = ", ".join(selection_names(store)) or "none"
        raise FileNotFoundError(f"{store.url}: no selection {name!r} (selections: {known})")
    return summary


def selected_keys(store: OutputStore, name: str, shard: int) -> set[str]:
    """The keys selection `name` kept from `shard` (empty if it has no key file for the shard)."""
    try:
        data = store.fs.cat_file(store.path(SELECTIONS_DIR, name, f"{store.shard_name(shard)}.txt"))
    except FileNotFoundError:
        return set()
    return set(data.decode().split())


def write_selected_keys(store: OutputStore, name: str, shard: int, keys: list[str]) -> None:
    path = store.path(SELECTIONS_DIR, name, f"{store.shard_name(shard)}.txt")
    if store.is_local():
        store.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    store.fs.pipe_file(path, "".join(k + "\n" for k in keys).encode())


def remove_selection(store: OutputStore, name: str) -> None:
    """Delete a selection, summary first (before writing it again: no stale key file may survive, and no
    reader may pair the old summary with new key files)."""
    store.fs.invalidate_cache()
    for path in (store.path(SELECTIONS_DIR, f"{name}.json"), store.path(SELECTIONS_DIR, name)):
        if store.fs.exists(path):
            store.fs.rm(path, recursive=True)
