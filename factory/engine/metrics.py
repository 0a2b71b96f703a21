"""The job's metrics through Ray's own (`ray.util.metrics`): each node's Ray metrics agent exports them to
Prometheus with Ray's, on its metrics export port, under the names below with Ray's `ray_` prefix.
`cluster/grafana-factory.json` is a dashboard of them (docs/cluster.md).

    factory_samples_total{job, stage, outcome}   rows out of each stage (kept, failed, rejected) and of the
                                                 write step (written, failed, rejected) of committed shards
    factory_failures_total{job, reason}          failed and rejected rows of committed shards by stage:reason
    factory_shard_seconds{job}                   a committed shard's seconds from its read to its commit
    factory_batch_seconds{job, stage}            one `process()` call of a stage, retries included
    factory_rows_waiting{job, stage}             rows made upstream that a stage has not taken in yet
    factory_gpu_memory_bytes{job, stage}         CUDA memory a stage worker holds (allocated and reserved)

Recorded where the work happens (stage workers, write tasks; the waiting rows by the driver), never
through one process. Without Ray (`factory stage`, the in-process executor) nothing is recorded.
"""

from __future__ import annotations

import sys
from collections import Counter
from typing import Any

_BATCH_BOUNDS = [0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0]
_SHARD_BOUNDS = [1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0, 7200.0]
_made: dict[str, Any] = {}


def _metric(kind: str, name: str, description: str, tags: tuple[str, ...], bounds: list[float] | None = None):
    """The process's one metric object of that name, or None where Ray is not running."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return None
    if name not in _made:
        from ray.util import metrics

        if kind == "histogram":
            _made[name] = metrics.Histogram(name, description, boundaries=bounds, tag_keys=tags)
        else:
            _made[name] = getattr(metrics, kind.capitalize())(name, description, tag_keys=tags)
    return _made[name]


def stage_batch(job: str, stage: str, seconds: float, rows: list) -> None:
    """A stage's finished batch: its latency, its rows by outcome, and the GPU memory its worker holds."""
    latency = _metric(
        "histogram", "factory_batch_seconds", "seconds of one batch of a stage", ("job", "stage"), _BATCH_BOUNDS
    )
    if latency is None:
        return
    latency.observe(seconds, tags={"job": job, "stage": stage})
    kept = sum(r.ok for r in rows)
    failed = sum(r.error is not None for r in rows)
    _count_samples(job, stage, {"kept": kept, "failed": failed, "rejected": len(rows) - kept - failed})
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        gpu = _metric("gauge", "factory_gpu_memory_bytes", "CUDA memory a stage worker holds", ("job", "stage", "kind"))
        for kind, value in (("allocated", torch.cuda.memory_allocated()), ("reserved", torch.cuda.memory_reserved())):
            gpu.set(value, tags={"job": job, "stage": stage, "kind": kind})


def shard_committed(job: str, result, samples: list, seconds: float) -> None:
    """A committed shard (its ShardResult and rows): rows by outcome, failures by stage:reason, seconds."""
    shard_s = _metric(
        "histogram", "factory_shard_seconds", "seconds of a shard from read to commit", ("job",), _SHARD_BOUNDS
    )
    if shard_s is None:
        return
    shard_s.observe(seconds, tags={"job": job})
    _count_samples(job, "write", {"written": result.samples, "failed": result.failed, "rejected": result.rejected})
    reasons = Counter(f"{why['stage']}:{why['reason']}" for s in samples if (why := s.error or s.rejected) is not None)
    failures = _metric(
        "counter", "factory_failures_total", "failed and rejected rows by stage:reason", ("job", "reason")
    )
    for reason, n in reasons.items():
        failures.inc(n, tags={"job": job, "reason": reason})


def rows_waiting(job: str, stages: list[str], stage_rows: dict[str, list[int]], sources_to_do: int) -> None:
    """Rows each stage has yet to take in: what the stage before it kept (the sources, for the first)."""
    waiting = _metric("gauge", "factory_rows_waiting", "rows made upstream a stage has not taken in", ("job", "stage"))
    if waiting is None:
        return
    made = sources_to_do
    for stage in stages:
        taken, kept = stage_rows.get(stage, (0, 0))
        waiting.set(max(made - taken, 0), tags={"job": job, "stage": stage})
        made = kept


def _count_samples(job: str, stage: str, outcomes: dict[str, int]) -> None:
    samples = _metric("counter", "factory_samples_total", "rows by stage and outcome", ("job", "stage", "outcome"))
    for outcome, n in outcomes.items():
        if n:
            samples.inc(n, tags={"job": job, "stage": stage, "outcome": outcome})
