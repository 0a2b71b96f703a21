"""Progress of a running job: shards committed, samples, rates per stage, ETA.

Stage runners count the rows they process in a small actor (integers per batch, never samples); the
driver adds the shard results it receives and prints every `every` seconds: a live bar on a terminal,
a log line otherwise (a file, a Ray job's log).
"""

from __future__ import annotations

import logging
import sys
import time

import ray

from factory.engine.records import ShardResult

log = logging.getLogger("factory")


@ray.remote(num_cpus=0)
class StageCounter:
    """Rows processed per stage, reported by the stage runners after every batch."""

    def __init__(self) -> None:
        self.rows: dict[str, int] = {}

    def stage_rows(self, label: str, n: int) -> None:
        self.rows[label] = self.rows.get(label, 0) + n

    def snapshot(self) -> dict[str, int]:
        return dict(self.rows)


def start_counter():
    """The row counter, placed on the driver's node: it lives as long as the job's driver, whichever other
    nodes leave (on a worker node it died with the node, and the progress line froze)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return StageCounter.options(scheduling_strategy=here).remote()


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class Progress:
    def __init__(
        self, total_shards: int, done_before: int, stages: list[str], counter=None, every: float = 5.0, stream=None
    ):
        self.total_shards = total_shards
        self.done_before = done_before
        self.stages = stages
        self.counter = counter
        self.every = every
        self.stream = stream if stream is not None else sys.stderr
        self.live = self.stream.isatty()
        self.committed = self.failed_shards = 0
        self.rows = {"samples": 0, "failed": 0, "rejected": 0}
        self.stage_rows: dict[str, int] = {}
        self.start = self.last = time.time()

    def shard_done(self, result: ShardResult) -> None:
        if result.committed:
            self.committed += 1
            for k in self.rows:
                self.rows[k] += getattr(result, k)
        else:
            self.failed_shards += 1
        self.tick()

    def tick(self) -> None:
        now = time.time()
        if now - self.last >= self.every:
            self.last = now
            self.show()

    def show(self, final: bool = False) -> None:
        if self.counter is not None:
            try:
                self.stage_rows = ray.get(self.counter.snapshot.remote(), timeout=2)
            except Exception:  # progress is best-effort: never let it stop the job
                pass
        line = self.line()
        if self.live and not final:
            self.stream.write("\r\033[K" + line)
            self.stream.flush()
        else:
            if self.live:
                self.stream.write("\r\033[K")
            log.info(line)

    def line(self) -> str:
        elapsed = max(time.time() - self.start, 1e-9)
        done = self.done_before + self.committed
        remaining = self.total_shards - done - self.failed_shards
        eta = _duration(elapsed / self.committed * remaining) if self.committed else "?"
        width = 20
        filled = int(width * done / max(self.total_shards, 1))
        stages = "  ".join(
            f"{s} {self.stage_rows.get(s, 0)} in ({self.stage_rows.get(s, 0) / elapsed:.1f}/s)" for s in self.stages
        )
        failed = f", {self.failed_shards} failed" if self.failed_shards else ""
        return (
            f"[{'#' * filled}{'.' * (width - filled)}] shards {done}/{self.total_shards}{failed}  "
            f"samples {self.rows['samples']} (failed {self.rows['failed']}, rejected {self.rows['rejected']})  "
            f"{self.rows['samples'] / elapsed:.2f} samples/s  ETA {eta}" + (f"  | {stages}" if stages else "")
        )
