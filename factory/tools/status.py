"""`factory status OUT`: how far a job's output is, summed from its shards' stats as they stream."""

from __future__ import annotations

import json
from collections import Counter

from factory.output.layout import OutputStore

SPLIT_NAMED = 10


def job_status(store: OutputStore) -> dict:
    """Shards done, samples, failures by reason, rate and size, summed over the stats as they stream."""
    manifest = store.read_manifest()
    reasons: Counter = Counter()
    totals = {"samples": 0, "failed": 0, "rejected": 0, "bytes": 0}
    shards, started, finished = 0, None, None
    split, split_first = 0, list[int]()  # shards whose batches were split for memory (the first few named)
    for _, s in store.iter_stats():
        shards += 1
        if s.get("split_for_memory"):
            split += 1
            split_first = sorted([*split_first, s["shard"]])[:SPLIT_NAMED]
        reasons.update(s["failures_by_reason"])
        reasons.update(s["rejected_by_reason"])
        for k in totals:
            totals[k] += s[k]
        started = s["started"] if started is None else min(started, s["started"])
        finished = s["finished"] if finished is None else max(finished, s["finished"])
    span = finished - started if started is not None and finished is not None else 0
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
        "shards_split_for_memory": split,
        "split_for_memory_first": split_first,
    }


def format_status(status: dict) -> str:
    lines = [
        f"job {status['job']} (spec {status['spec_hash']})",
        f"shards   {status['shards_done']}/{status['shards_total']}",
        f"samples  {status['samples']} written from {status['sources_planned']} planned sources",
        f"failed   {status['failed']}   rejected {status['rejected']}",
    ]
    lines += [f"  {reason}: {n}" for reason, n in sorted(status["by_reason"].items())]
    if status["shards_split_for_memory"]:
        named = ", ".join(map(str, status["split_for_memory_first"]))
        more = " ..." if status["shards_split_for_memory"] > len(status["split_for_memory_first"]) else ""
        lines.append(
            f"split    {status['shards_split_for_memory']} shards had batches split after CUDA ran out of memory "
            f"(shards {named}{more}): their pixels may differ from a rerun's"
        )
    rate = status["samples_per_second"]
    lines.append(f"rate     {rate if rate is not None else '-'} samples/s   size {status['bytes'] / 1e6:.1f} MB")
    return "\n".join(lines)


def main_status(store: OutputStore, as_json: bool = False) -> int:
    status = job_status(store)
    print(json.dumps(status, indent=2) if as_json else format_status(status))
    return 0
