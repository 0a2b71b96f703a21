"""The layout of a job's output: the one place every file of it is named, and the store that reads and
writes them on any fsspec filesystem.

Under the output root:
    manifest.json                 spec (credentials redacted), spec hash, plan summary and pinned weights,
                                  written at planning
    plan/part-00000.parquet       the planned sample ids, one row group per shard, SHARDS_PER_PART shards a part
    shards/shard-000000.tar       committed shards (a tar appears under this name only when complete)
    rejected/shard-000000.tar     samples a selection stage rejected (only with output.keep_rejected)
    failures/shard-000000.jsonl   every failed and rejected row of the shard, with its stage and reason
    stats/shard-000000.json       the shard's summary, written last: its presence is the commit marker
    selections/NAME.json          a `factory select` selection's summary, written after its key files:
    selections/NAME/shard-000000.txt  the keys it kept from that shard, one per line
    report/report.html            `factory report`'s page and plots (by default)
    _tmp/                         shards being written; cleared by the run that holds the lease
    _lease.json                   the running job's lease and heartbeat: one run writes an output at a time
    index.json                    all committed shards with their sample counts, written at the end
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Iterator, Set
from typing import Any

from factory.storage import TMP_DIR, Folder, fsspec_options

MANIFEST = "manifest.json"
INDEX = "index.json"
LEASE_FILE = "_lease.json"
PLAN_DIR = "plan"
SHARDS_PER_PART = 256  # a plan part holds this many shards, one parquet row group each
SHARD_DIR = "shards"
STATS_DIR = "stats"
FAILURES_DIR = "failures"
REJECTED_DIR = "rejected"
SELECTIONS_DIR = "selections"
REPORT_DIR = "report"


def shard_name(shard: int) -> str:
    return f"shard-{shard:06d}"


def plan_part_name(shard: int) -> str:
    """The plan file holding `shard`."""
    return f"part-{shard // SHARDS_PER_PART:05d}.parquet"


def open_output(
    url: str, storage_options: dict[str, Any] | None = None, endpoint_url: str | None = None
) -> OutputStore:
    """The output at `url` (a path, file://, s3://...); `endpoint_url` is the S3 endpoint shortcut."""
    return OutputStore(url, fsspec_options(storage_options, endpoint_url))


class OutputStore(Folder):
    """A job's output folder, by the layout above."""

    shard_name = staticmethod(shard_name)

    def shard_path(self, shard: int) -> str:
        return self.path(SHARD_DIR, f"{shard_name(shard)}.tar")

    def stats_path(self, shard: int) -> str:
        return self.path(STATS_DIR, f"{shard_name(shard)}.json")

    def read_manifest(self) -> dict:
        manifest = self.read_json(MANIFEST)
        if manifest is None:
            raise FileNotFoundError(f"{self.url}: no {MANIFEST}, so no job has been planned here")
        return manifest

    def committed_shards(self) -> list[int]:
        """Ids of the shards whose stats file exists, ascending, from one listing of the stats folder."""
        self.fs.invalidate_cache()
        try:
            names = self.fs.ls(self.path(STATS_DIR), detail=False)
        except FileNotFoundError:
            return []
        done = set()
        for name in names:
            base = name.rsplit("/", 1)[-1]
            if base.startswith("shard-") and base.endswith(".json"):
                done.add(int(base[len("shard-") : -len(".json")]))
        return sorted(done)

    def iter_stats(self, shards: list[int] | None = None, batch: int = 256) -> Iterator[tuple[int, dict]]:
        """(shard id, stats) of the committed shards in shard order, read `batch` files at a time.

        Streams: memory holds one batch of stats files, whatever the number of shards; on object stores
        each batch is fetched concurrently (fsspec `cat` of a list of paths).
        """
        wanted = self.committed_shards() if shards is None else sorted(shards)
        for start in range(0, len(wanted), batch):
            ids = wanted[start : start + batch]
            paths = [self.stats_path(s) for s in ids]
            bodies = self.fs.cat(paths)
            for shard, path in zip(ids, paths):
                yield shard, json.loads(bodies[path])

    def clear_tmp(self) -> None:
        """Removes what earlier attempts left in `_tmp/`. Locally, another writer may still go through it
        meanwhile (a worker the run gave up on, finishing its watch record; the driver holds the lease's own
        renewals while it clears: `Lease.renewals_held`): a file renamed away mid-clear is gone already, and
        one written since keeps the folder; neither is an error."""
        tmp = self.path(TMP_DIR)
        self.fs.invalidate_cache()
        if self.is_local():
            _remove_tree_as_it_is(tmp)
        elif self.fs.exists(tmp):
            self.fs.rm(tmp, recursive=True)
        self.fs.invalidate_cache()
        if not self.is_local() and self.fs.exists(tmp):
            # A filer-backed object store (SeaweedFS) lists the emptied folder until its marker key goes.
            self.fs.rm_file(tmp + "/")

    def remove_all(self, keep: Set[str] = frozenset()) -> None:
        """Delete the output, but for the top-level entries named in `keep` (the running job's lease)."""
        self.fs.invalidate_cache()
        if not self.fs.exists(self.root):
            return
        for path in self.fs.ls(self.root, detail=False):
            if path.rstrip("/").rsplit("/", 1)[-1] not in keep:
                self.fs.rm(path, recursive=True)


def _remove_tree_as_it_is(path: str) -> None:
    """A local folder and what it holds, bottom up, while another thread may add or rename files in it: a file
    or folder already gone, or a folder that holds a file written since, is left as it is."""

    def remove(remover, target: str) -> None:
        try:
            remover(target)
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.ENOTEMPTY):
                raise

    for root, dirs, files in os.walk(path, topdown=False):
        for name in files:
            remove(os.unlink, os.path.join(root, name))
        for name in dirs:
            remove(os.rmdir, os.path.join(root, name))
    remove(os.rmdir, path)
