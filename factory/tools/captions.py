"""`factory captions OUT`: each source sample's caption from a job's shards, as the JSON lines that
training specs read (`captions:` of `factory train`)."""

from __future__ import annotations

import json

from factory.output.layout import OutputStore
from factory.output.samples import iter_samples, only_json, sample_meta


def export_captions(store: OutputStore, out_path: str) -> int:
    """Write one {"id", "caption"} line per source sample that has a caption; returns how many."""
    written, last_shard = 0, None
    shard_seen: set[str] = set()
    with open(out_path, "w") as out:
        for shard, _, files in iter_samples(store, select_files=only_json):
            if shard != last_shard:  # every variant of a source lives in its source's shard
                shard_seen, last_shard = set(), shard
            meta = sample_meta(files)
            if meta.get("caption") and meta["source_id"] not in shard_seen:
                shard_seen.add(meta["source_id"])
                out.write(json.dumps({"id": meta["source_id"], "caption": meta["caption"]}) + "\n")
                written += 1
    return written
