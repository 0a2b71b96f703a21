"""The output location: shards, their stats, the job manifest and the index, on any fsspec filesystem.

Layout under the output root:
    manifest.json                 spec (credentials redacted), spec hash and plan summary, written at planning
    plan/part-00000.parquet       the planned sample ids, one row group per shard, a bounded number per part
    shards/shard-000000.tar       committed shards (a tar appears under this name only when complete)
    rejected/shard-000000.tar     samples a selection stage rejected (only with output.keep_rejected)
    failures/shard-000000.jsonl   every failed and rejected row of the shard, with its stage and reason
    stats/shard-000000.json       the shard's summary, written last: its presence is the commit marker
    _tmp/                         shards being written; cleared by the run that holds the lease
    _lease.json                   the running job's lease and heartbeat: one run writes an output at a time
    index.json                    all committed shards with their sample counts, written at the end
"""

from __future__ import annotations

import json
import os
import uuid
from contextlib import contextmanager
from typing import Any

import fsspec

from factory.spec import OutputSpec

SHARD_DIR = "shards"
STATS_DIR = "stats"
FAILURES_DIR = "failures"
REJECTED_DIR = "rejected"
TMP_DIR = "_tmp"
UPLOAD_BLOCK = 8 * 2**20  # above S3's 5 MiB minimum multipart part size; bounds each upload buffer


def storage_options(output: OutputSpec) -> dict[str, Any]:
    """fsspec options for the output, with `endpoint_url` turned into s3fs's form."""
    options = dict(output.storage_options)
    if output.endpoint_url:
        options.setdefault("client_kwargs", {})["endpoint_url"] = output.endpoint_url
    return options


class OutputStore:
    def __init__(self, url: str, options: dict[str, Any] | None = None):
        self.url = url.rstrip("/")
        self.options = options or {}
        self.fs, self.root = fsspec.core.url_to_fs(self.url, **self.options)
        self.root = self.root.rstrip("/")

    @classmethod
    def for_output(cls, output: OutputSpec) -> "OutputStore":
        return cls(output.url, storage_options(output))

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def public_url(self, *parts: str) -> str:
        """The URL a reader uses (s3://..., or a local path)."""
        rel = "/".join(parts)
        protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        if protocol in ("file", "local"):
            return self.path(*parts)
        return f"{protocol}://{self.path(*parts)}" if rel else f"{protocol}://{self.root}"

    @staticmethod
    def shard_name(shard: int) -> str:
        return f"shard-{shard:06d}"

    def shard_path(self, shard: int) -> str:
        return self.path(SHARD_DIR, f"{self.shard_name(shard)}.tar")

    def stats_path(self, shard: int) -> str:
        return self.path(STATS_DIR, f"{self.shard_name(shard)}.json")

    def ensure_root(self) -> None:
        """Create the output folder (locally) or the bucket (object stores), if missing."""
        self.fs.makedirs(self.root, exist_ok=True)

    def read_json(self, *parts: str) -> Any | None:
        path = self.path(*parts)
        self.fs.invalidate_cache()  # object-store listings are cached per process; another process may have written
        if not self.fs.exists(path):
            return None
        with self.fs.open(path, "rb") as f:
            return json.load(f)

    def write_json(self, data: Any, *parts: str) -> None:
        self.put_bytes(json.dumps(data, indent=2, sort_keys=True).encode(), *parts)

    def put_bytes(self, body: bytes, *parts: str) -> None:
        with self.open_atomic(*parts) as f:
            f.write(body)

    @contextmanager
    def open_atomic(self, *parts: str, mode: str = "wb"):
        """A file that appears under its final name only once it is complete.

        Locally it is written under `_tmp/`, flushed to disk and renamed into place. On object stores
        an upload becomes visible only when it completes, so it goes to its final name directly, and
        an error inside the block discards the upload instead of completing it with partial data.
        """
        final = self.path(*parts)
        if not self.is_local():
            f = self.fs.open(final, mode, block_size=UPLOAD_BLOCK)
            try:
                yield f
            except BaseException:
                if hasattr(f, "discard"):
                    f.discard()
                raise
            f.close()
            return
        tmp = self.path(TMP_DIR, f"{uuid.uuid4().hex[:12]}.{final.rsplit('/', 1)[-1]}")
        self.fs.makedirs(self.path(TMP_DIR), exist_ok=True)
        with self.fs.open(tmp, mode) as f:
            yield f
            # After a power loss a commit marker must never stand beside a tar the disk had not written.
            f.flush()
            os.fsync(f.fileno())
        self.fs.makedirs(final.rsplit("/", 1)[0], exist_ok=True)
        self.fs.mv(tmp, final)

    def remove(self, *parts: str) -> None:
        path = self.path(*parts)
        if self.fs.exists(path):
            self.fs.rm(path)

    def is_local(self) -> bool:
        protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        return protocol in ("file", "local")

    def committed_shards(self) -> set[int]:
        """Ids of the shards whose stats file exists, from one listing of the stats folder."""
        self.fs.invalidate_cache()
        try:
            names = self.fs.ls(self.path(STATS_DIR), detail=False)
        except FileNotFoundError:
            return set()
        done = set()
        for name in names:
            base = name.rsplit("/", 1)[-1]
            if base.startswith("shard-") and base.endswith(".json"):
                done.add(int(base[len("shard-") : -len(".json")]))
        return done

    def iter_stats(self, shards: set[int] | None = None, batch: int = 256):
        """(shard id, stats) of the committed shards in shard order, read `batch` files at a time.

        Streams: memory holds one batch of stats files, whatever the number of shards; on object stores
        each batch is fetched concurrently (fsspec `cat` of a list of paths).
        """
        wanted = sorted(self.committed_shards() if shards is None else shards)
        for start in range(0, len(wanted), batch):
            ids = wanted[start : start + batch]
            paths = [self.stats_path(s) for s in ids]
            bodies = self.fs.cat(paths)
            for shard, path in zip(ids, paths):
                yield shard, json.loads(bodies[path])

    def clear_tmp(self) -> None:
        tmp = self.path(TMP_DIR)
        self.fs.invalidate_cache()
        if self.fs.exists(tmp):
            self.fs.rm(tmp, recursive=True)

    def remove_all(self, keep: set[str] = frozenset()) -> None:
        """Delete the output, but for the top-level entries named in `keep` (the running job's lease)."""
        self.fs.invalidate_cache()
        if not self.fs.exists(self.root):
            return
        for path in self.fs.ls(self.root, detail=False):
            if path.rstrip("/").rsplit("/", 1)[-1] not in keep:
                self.fs.rm(path, recursive=True)
