"""Factory outputs built by hand, in the writer's layout, for the reading, selection and loader tests.

A built output has what a job writes (manifest.json, shards/, stats/, failures/) with contents the test
chose: known keys, source ids, variants, scores, masks. The engine's own output is used where a test is
about reading what the engine writes (test_mix_e2e, test_report).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field

import numpy as np
from webdataset import TarWriter

from factory.engine.writer import encode_image, encode_mask
from factory.output.layout import OutputStore
from factory.sources.classes import class_set


@dataclass
class Item:
    key: str
    source_id: str
    image: np.ndarray | None = None
    mask: np.ndarray | None = None
    meta: dict = field(default_factory=dict)


def build_output(
    store: OutputStore,
    shards: dict[int, list[Item]],
    classes: list[str] | None = None,
    failures: dict[int, list[dict]] | None = None,
    image_format: str = "png",
    name: str = "handmade",
    source: dict | None = None,
) -> OutputStore:
    """Write `shards` (shard id -> items, in tar order) as a committed output; returns the store."""
    classes = classes if classes is not None else list(class_set("ade150").names)
    ignore = 255 if len(classes) < 255 else 65535
    store.ensure_root()
    for shard, items in shards.items():
        buf = io.BytesIO()
        tar = TarWriter(buf, mtime=0.0)
        for item in items:
            files = {"json": json.dumps({"key": item.key, "source_id": item.source_id, **item.meta}).encode()}
            if item.image is not None:
                files[image_format] = encode_image(item.image, image_format, 95)
            if item.mask is not None:
                files["seg.png"] = encode_mask(item.mask)
            tar.write({"__key__": item.key, **files})
        tar.close()
        store.fs.makedirs(store.path("shards"), exist_ok=True)
        store.fs.pipe_file(store.shard_path(shard), buf.getvalue())
        shard_failures = (failures or {}).get(shard, [])
        if shard_failures:
            store.fs.makedirs(store.path("failures"), exist_ok=True)
            store.fs.pipe_file(
                store.path("failures", f"{store.shard_name(shard)}.jsonl"),
                "".join(json.dumps(f) + "\n" for f in shard_failures).encode(),
            )
        store.write_json(
            {
                "shard": shard,
                "url": store.shard_path(shard),
                "sources": len({i.source_id for i in items}),
                "samples": len(items),
                "failed": len(shard_failures),
                "rejected": 0,
                "failures_by_reason": _by_reason(shard_failures),
                "rejected_by_reason": {},
                "bytes": len(buf.getvalue()),
                "started": 1000.0 + shard,
                "finished": 1002.0 + shard,
                "seconds": 2.0,
                "job": name,
                "spec_hash": "0" * 16,
                "models": {},
            },
            "stats",
            f"{store.shard_name(shard)}.json",
        )
    store.write_json(
        {
            "name": name,
            "spec_hash": "0" * 16,
            "classes": classes,
            "ignore_index": ignore,
            "plan": {"num_shards": max(shards, default=-1) + 1, "num_samples": sum(len(v) for v in shards.values())},
            "spec": {"source": source or {"kind": "folder", "path": "/nowhere", "classes": "ade150"}, "stages": []},
        },
        "manifest.json",
    )
    return store


def _by_reason(records: list[dict]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in records:
        out[f"{r['stage']}:{r['reason']}"] = out.get(f"{r['stage']}:{r['reason']}", 0) + 1
    return out


def scored_items(shard: int, values: list[float | None], score: str = "density.instances") -> list[Item]:
    """Json-only samples whose `score` has the given values (None: null), one source each."""
    group, name = score.split(".")
    return [
        Item(f"{shard:06d}-{i:06d}", f"s{shard}-{i}", meta={"scores": {group: {name: v}}}) for i, v in enumerate(values)
    ]
