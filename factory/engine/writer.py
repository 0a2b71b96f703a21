"""The shard writer: one shard's samples in, one committed WebDataset shard out, from whichever worker runs it.

Commit order: the tar appears under `shards/` only once complete (`OutputStore.open_atomic`), then the
failure list is written to `failures/`, and the stats file last: it is the commit marker. A crash or a
failed write at any point leaves either no final tar, or a whole final tar without stats that the next
run regenerates: never a partial tar under a final name. Two attempts of one shard may overlap (a Ray
retry, a driver that lost its lease): an attempt that finds the shard committed writes nothing, and no
attempt ever deletes a shard's files, so none can undo another's commit. Every write is idempotent
(same bytes, same names): attempts that overlap write the same files.
"""

from __future__ import annotations

import io
import json
import tarfile
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np
from PIL import Image

from factory.engine import metrics
from factory.engine.errors import retry
from factory.engine.records import Failure, JobInfo, ShardResult, ShardWork
from factory.output.layout import FAILURES_DIR, REJECTED_DIR, SHARD_DIR, STATS_DIR, OutputStore
from factory.sample import Sample

# Fixed tar member mtime: a regenerated shard is byte-identical to the first one.
_TAR_MTIME = 0


@dataclass(frozen=True)
class WriteSettings:
    image_format: str
    quality: int
    keep_rejected: bool
    max_failure_fraction: float
    retries: int
    backoff: float


def encode_mask(mask: np.ndarray) -> bytes:
    """PNG bytes of a class-id or instance mask: 8-bit L for uint8, 16-bit for uint16."""
    buf = io.BytesIO()
    if mask.dtype == np.uint8:
        Image.fromarray(mask, mode="L").save(buf, format="PNG")
    else:
        Image.fromarray(mask.astype(np.uint16)).save(buf, format="PNG")
    return buf.getvalue()


def encode_image(image: np.ndarray, image_format: str, quality: int) -> bytes:
    buf = io.BytesIO()
    pil = Image.fromarray(image, mode="RGB")
    if image_format == "jpg":
        pil.save(buf, format="JPEG", quality=quality)
    else:
        pil.save(buf, format="PNG")
    return buf.getvalue()


def encode_files(sample: Sample, image_format: str, quality: int, meta_extra: dict) -> dict[str, bytes]:
    """The files of one written (or kept rejected) sample: image, masks and json, by extension."""
    meta = {"key": sample.key, "source_id": sample.source_id, "variant": sample.variant, **meta_extra}
    meta.update(sample.meta)
    if sample.rejected is not None:
        meta["rejected"] = sample.rejected
    files = {image_format: encode_image(sample.array("image"), image_format, quality)}
    if sample.mask is not None:
        files["seg.png"] = encode_mask(sample.mask)
    if sample.instances is not None:
        files["inst.png"] = encode_mask(sample.instances.astype(np.uint16))
    files["json"] = json.dumps(meta, sort_keys=True).encode()
    return files


def failure_records(samples: list[Sample]) -> list[dict]:
    """One record per failed or rejected row, in shard order: what `failures/shard-N.jsonl` holds."""
    out = []
    for s in samples:
        for kind, what in (("failed", s.error), ("rejected", s.rejected if s.error is None else None)):
            if what is not None:
                out.append({"key": s.key, "source_id": s.source_id, "kind": kind, **what})
    return out


def write_shard(work: ShardWork, store: OutputStore, settings: WriteSettings, job: JobInfo) -> ShardResult:
    """Commit one shard, or leave it uncommitted; returns what the driver counts of it."""
    counts = {
        "samples": sum(s.ok for s in work.samples),
        "failed": sum(s.error is not None for s in work.samples),
        "rejected": sum(s.error is None and s.rejected is not None for s in work.samples),
    }
    if work.failure is not None:
        return ShardResult.failed_at(work.shard, work.failure, **counts)
    rows = len(work.samples)
    if rows and counts["failed"] / rows > settings.max_failure_fraction:
        reasons = Counter(f"{s.error['stage']}:{s.error['reason']}" for s in work.samples if s.error is not None)
        top = ", ".join(f"{r} {n}" for r, n in reasons.most_common(3))
        too_many = Failure(
            stage="commit",
            cause=f"{counts['failed']} of {rows} rows failed ({top}), above output.max_failure_fraction "
            f"{settings.max_failure_fraction}",
            advice="fix the input data or the stage (factory stage SPEC NAME runs it alone), or raise "
            "output.max_failure_fraction",
        )
        return ShardResult.failed_at(work.shard, too_many, **counts)
    try:
        retry(
            lambda: _commit(work, store, settings, job),
            f"writing shard {work.shard}",
            settings.retries,
            settings.backoff,
        )
    except Exception as e:
        return ShardResult.failed_at(work.shard, Failure.of("write", e), **counts)
    return ShardResult(
        work.shard, "committed", samples=counts["samples"], failed=counts["failed"], rejected=counts["rejected"]
    )


class ShardWriter:
    """Commits whole shards from whichever worker holds them: picklable, opens the store per call."""

    def __init__(self, store_url: str, options: dict, settings: WriteSettings, job: JobInfo):
        self.store_url = store_url
        self.options = options
        self.settings = settings
        self.job = job

    def commit(self, work: ShardWork) -> ShardResult:
        result = write_shard(work, OutputStore(self.store_url, self.options), self.settings, self.job)
        if result.committed:
            metrics.shard_committed(self.job.job, result, work.samples, time.time() - work.started)
        return result


def _write_tar(store: OutputStore, members, *parts: str) -> None:
    """A WebDataset tar: each sample's files as `KEY.EXT` members, extensions sorted, fixed metadata.

    Written with the standard library in stream mode (object-store files do not seek). Not webdataset's
    TarWriter: importing webdataset imports torch, seconds of start-up in every write worker.
    """
    with store.open_atomic(*parts) as f:
        tar = tarfile.open(fileobj=f, mode="w|", format=tarfile.PAX_FORMAT)
        try:
            for key, files in members:
                for ext in sorted(files):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size, info.mtime, info.mode = len(files[ext]), _TAR_MTIME, 0o444
                    tar.addfile(info, io.BytesIO(files[ext]))
            tar.close()
        except BaseException:
            # The file is being discarded: mark the tar stream closed, or its __del__ would try to flush
            # it again (into the same full disk) and print a traceback from the garbage collector.
            # typeshed declares neither attribute, though both exist (TarFile and its stream-mode _Stream).
            tar.closed = tar.fileobj.closed = True  # type: ignore[attr-defined]
            raise


def _commit(work: ShardWork, store: OutputStore, settings: WriteSettings, job: JobInfo) -> dict:
    name = store.shard_name(work.shard)
    meta_extra = job.to_json()

    def members(wanted):
        for s in work.samples:
            if wanted(s):
                yield s.key, encode_files(s, settings.image_format, settings.quality, meta_extra)

    def is_rejected(s: Sample) -> bool:
        return s.error is None and s.rejected is not None

    committed = store.read_json(STATS_DIR, f"{name}.json")
    if committed is not None:
        # Another attempt of this shard (a Ray retry whose first try was not dead after all, an old driver
        # after a lease takeover) committed it first: its files stand as they are.
        return committed
    kept_rejected = settings.keep_rejected and any(is_rejected(s) for s in work.samples)
    if kept_rejected:
        _write_tar(store, members(is_rejected), REJECTED_DIR, f"{name}.tar")
    _write_tar(store, members(lambda s: s.ok), SHARD_DIR, f"{name}.tar")
    # If the stats cannot be written, the tar stays: deleting it could delete the tar of another attempt
    # that committed meanwhile. A whole tar without stats is what a crash here leaves anyway; the next
    # run rewrites it.
    return _write_stats(work, store, job, name, kept_rejected)


def _write_stats(work: ShardWork, store: OutputStore, job: JobInfo, name: str, kept_rejected: bool) -> dict:
    failures = failure_records(work.samples)
    if failures:
        store.put_bytes(
            b"".join(json.dumps(r, sort_keys=True).encode() + b"\n" for r in failures), FAILURES_DIR, f"{name}.jsonl"
        )
    by_kind = {
        kind: Counter(f"{r['stage']}:{r['reason']}" for r in failures if r["kind"] == kind)
        for kind in ("failed", "rejected")
    }
    finished = time.time()
    stats = {
        "shard": work.shard,
        "url": store.public_url(SHARD_DIR, f"{name}.tar"),
        "sources": len({s.index for s in work.samples}),
        "samples": sum(s.ok for s in work.samples),
        "failed": sum(by_kind["failed"].values()),
        "rejected": sum(by_kind["rejected"].values()),
        "failures_by_reason": dict(by_kind["failed"]),
        "rejected_by_reason": dict(by_kind["rejected"]),
        "failures_url": store.public_url(FAILURES_DIR, f"{name}.jsonl") if failures else None,
        "rejected_url": store.public_url(REJECTED_DIR, f"{name}.tar") if kept_rejected else None,
        "bytes": store.fs.size(store.shard_path(work.shard)),
        "started": work.started,
        "finished": finished,
        "seconds": round(finished - work.started, 3),
        "stages": {label: step.to_json() for label, step in work.stages.items()},
        # Stages whose batches were split after CUDA ran out of memory: their batch composition, and so
        # their pixels, may differ from a run of the same spec that did not split (see `factory status`).
        "split_for_memory": sorted(label for label, step in work.stages.items() if step.oom_splits),
        **job.to_json(),
    }
    store.write_json(stats, STATS_DIR, f"{name}.json")
    return stats
