"""The shard writer: encoded samples in, committed WebDataset shards out.

A shard is written under `_tmp/`, moved to its final name once every source sample of the shard has
delivered all of its rows (written, failed or rejected), and committed by writing its stats file last.
A crash at any point leaves either no final tar, or a final tar without stats that the next run
regenerates from scratch: never a partial tar under a final name.
"""

from __future__ import annotations

import io
import json
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np
from PIL import Image
from webdataset import TarWriter

from factory.sample import Sample
from factory.store import REJECTED_DIR, SHARD_DIR, STATS_DIR, TMP_DIR, OutputStore

# Fixed tar member mtime: a regenerated shard is byte-identical to the first one.
_TAR_MTIME = 0.0
_UPLOAD_BLOCK = 8 * 2**20  # above S3's 5 MiB minimum multipart part size


@dataclass
class EncodedSample:
    """What crosses from the encode tasks to the writer: bytes and bookkeeping, no arrays."""

    shard: int
    index: int
    variant: int
    variants: int
    key: str
    source_id: str
    files: dict[str, bytes] | None  # extension -> bytes; None for failed samples (and rejected unless kept)
    error: dict | None
    rejected: dict | None


def encode_mask(mask: np.ndarray) -> bytes:
    """PNG bytes of a class-id mask: 8-bit L, or 16-bit for class sets too large for uint8."""
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


def encode_sample(
    sample: Sample, image_format: str, quality: int, meta_extra: dict, keep_rejected: bool = False
) -> EncodedSample:
    files = None
    if sample.ok or (keep_rejected and sample.error is None):
        meta = {"key": sample.key, "source_id": sample.source_id, "variant": sample.variant, **meta_extra}
        meta.update(sample.meta)
        if sample.rejected is not None:
            meta["rejected"] = sample.rejected
        files = {image_format: encode_image(sample.image, image_format, quality)}
        if sample.mask is not None:
            files["seg.png"] = encode_mask(sample.mask)
        if sample.instances is not None:
            files["inst.png"] = encode_mask(sample.instances.astype(np.uint16))
        files["json"] = json.dumps(meta, sort_keys=True).encode()
    return EncodedSample(
        shard=sample.shard,
        index=sample.index,
        variant=sample.variant,
        variants=sample.variants,
        key=sample.key,
        source_id=sample.source_id,
        files=files,
        error=sample.error,
        rejected=sample.rejected,
    )


@dataclass
class _OpenShard:
    expected_sources: int
    tmp_path: str
    file: object
    tar: TarWriter
    started: float
    rejected_file: object = None
    rejected_tar: TarWriter | None = None
    # Source index -> the share of it delivered so far. A row with `variants` V is 1/V of its source:
    # rows of one source may carry different V (a variant rejected before a later stage expanded its
    # siblings again), and the shares still add up to exactly 1 when every row has arrived.
    received: dict = field(default_factory=dict)
    seen: set = field(default_factory=set)  # keys received, to drop rows a retried task sends again
    waiting: dict = field(default_factory=dict)  # source index -> its rows, until they can be written
    next_index: int = 0  # the next source position to write
    samples: int = 0
    failures: list = field(default_factory=list)
    rejections: list = field(default_factory=list)

    def complete(self) -> bool:
        return self.next_index == self.expected_sources


class ShardWriter:
    """Assembles shards from encoded samples arriving in any order; one instance per writer actor."""

    def __init__(self, store: OutputStore, shard_sources: dict[int, int], job_info: dict):
        self.store = store
        self.shard_sources = shard_sources  # shard -> number of source samples planned in it
        self.job_info = job_info  # spec hash and model ids, copied into every stats file
        self.open: dict[int, _OpenShard] = {}
        self.committed: set[int] = set()
        self.run_id = uuid.uuid4().hex[:8]

    def add(self, records: list[EncodedSample]) -> list[int]:
        """Take records in any order; write them in key order; return the shards this call committed.

        Rows arrive in whatever order Ray finishes blocks, so a source position's rows wait in memory
        until every earlier position is written: the tar is then the same bytes on every run. A record
        seen before (Ray retried the task that sent it) is dropped, so a retry never duplicates a sample.
        """
        touched = set()
        for rec in records:
            if rec.shard in self.committed:
                continue
            if "." in rec.key:
                raise ValueError(f"key {rec.key!r} contains a dot: webdataset would split the sample")
            shard = self._shard(rec.shard)
            if rec.key in shard.seen:
                continue
            shard.seen.add(rec.key)
            shard.received[rec.index] = shard.received.get(rec.index, 0) + Fraction(1, rec.variants)
            if shard.received[rec.index] > 1:
                raise ValueError(f"shard {rec.shard} sample {rec.index}: more rows than its variants")
            shard.waiting.setdefault(rec.index, []).append(rec)
            touched.add(rec.shard)
        for s in touched:
            self._write_ready(s, self.open[s])
        done = [s for s in sorted(touched) if self.open[s].complete()]
        for s in done:
            self._commit(s)
        return done

    def _write_ready(self, shard: int, state: _OpenShard) -> None:
        """Write every source position, in order, whose rows have all arrived."""
        while state.received.get(state.next_index) == 1:
            for rec in sorted(state.waiting.pop(state.next_index), key=lambda r: r.variant):
                if rec.error is not None:
                    state.failures.append({"key": rec.key, "source_id": rec.source_id, **rec.error})
                elif rec.rejected is not None:
                    state.rejections.append({"key": rec.key, "source_id": rec.source_id, **rec.rejected})
                    if rec.files is not None:
                        self._rejected_tar(shard, state).write({"__key__": rec.key, **rec.files})
                else:
                    state.tar.write({"__key__": rec.key, **rec.files})
                    state.samples += 1
            state.next_index += 1

    def _shard(self, shard: int) -> _OpenShard:
        if shard not in self.open:
            if shard not in self.shard_sources:
                raise ValueError(f"shard {shard} is not pending in this run")
            tmp_path = self.store.path(TMP_DIR, f"{self.store.shard_name(shard)}.{self.run_id}.tar")
            self.store.fs.makedirs(tmp_path.rsplit("/", 1)[0], exist_ok=True)
            # Bounded upload buffers (s3fs defaults to 50 MiB per open file, and many shards are open).
            f = self.store.fs.open(tmp_path, "wb", block_size=_UPLOAD_BLOCK)
            self.open[shard] = _OpenShard(
                expected_sources=self.shard_sources[shard],
                tmp_path=tmp_path,
                file=f,
                tar=TarWriter(f, mtime=_TAR_MTIME),
                started=time.time(),
            )
        return self.open[shard]

    def _rejected_tar(self, shard: int, state: _OpenShard) -> TarWriter:
        if state.rejected_tar is None:
            state.rejected_file = self.store.fs.open(self._rejected_tmp(shard), "wb", block_size=_UPLOAD_BLOCK)
            state.rejected_tar = TarWriter(state.rejected_file, mtime=_TAR_MTIME)
        return state.rejected_tar

    def _rejected_tmp(self, shard: int) -> str:
        return self.store.path(TMP_DIR, f"{self.store.shard_name(shard)}.{self.run_id}.rejected.tar")

    def _commit(self, shard: int) -> None:
        state = self.open.pop(shard)
        state.tar.close()
        self.store.sync(state.file)
        state.file.close()
        final = self.store.shard_path(shard)
        self.store.fs.makedirs(final.rsplit("/", 1)[0], exist_ok=True)
        if state.rejected_tar is not None:
            state.rejected_tar.close()
            self.store.sync(state.rejected_file)
            state.rejected_file.close()
            rejected_final = self.store.path(REJECTED_DIR, f"{self.store.shard_name(shard)}.tar")
            self.store.fs.makedirs(rejected_final.rsplit("/", 1)[0], exist_ok=True)
            self.store.fs.mv(self._rejected_tmp(shard), rejected_final)
        self.store.fs.mv(state.tmp_path, final)
        finished = time.time()
        stats = {
            "shard": shard,
            "url": self.store.public_url(SHARD_DIR, f"{self.store.shard_name(shard)}.tar"),
            "sources": state.expected_sources,
            "samples": state.samples,
            "failed": len(state.failures),
            "rejected": len(state.rejections),
            "failures_by_reason": dict(Counter(f"{f['stage']}:{f['reason']}" for f in state.failures)),
            "rejected_by_reason": dict(Counter(f"{r['stage']}:{r['reason']}" for r in state.rejections)),
            "failures": state.failures,
            "rejections": state.rejections,
            "bytes": self.store.fs.size(final),
            "started": state.started,
            "finished": finished,
            "seconds": round(finished - state.started, 3),
            **self.job_info,
        }
        self.store.write_json(stats, STATS_DIR, f"{self.store.shard_name(shard)}.json")
        self.committed.add(shard)

    def incomplete(self) -> dict[int, dict]:
        """Shards still open (should be none once the pipeline has drained)."""
        return {
            s: {"sources": st.expected_sources, "seen_sources": len(st.received)} for s, st in self.open.items()
        }

    def abort(self) -> None:
        """Close and delete what was open; those shards stay uncommitted and are redone on the next run."""
        for shard, state in self.open.items():
            for tar, f in ((state.tar, state.file), (state.rejected_tar, state.rejected_file)):
                if f is not None and not f.closed:
                    tar.close()
                    f.close()
            for path in (state.tmp_path, self._rejected_tmp(shard)):
                if self.store.fs.exists(path):
                    self.store.fs.rm(path)
        self.open.clear()
