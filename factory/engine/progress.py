"""Progress of a running job, from the work itself: rows in and out per stage as batches finish, samples
written, failed and rejected as shards commit, samples/s and an ETA.

Stage runners count the rows of each batch they finish in a small actor (integers per batch, never
samples), placed on the driver's node so it lives as long as the job whatever other node leaves. The
driver adds the shard results it receives, and a timer shows the state every `engine.progress_s`
seconds while shards are in flight, even when none commits for minutes: a live bar on a terminal, a log
line otherwise (a file, a Ray job's log).
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable

from factory.engine.records import ShardResult

log = logging.getLogger("factory")


class StageRows:
    """Rows in and out per stage, reported by the stage runners after every batch (a Ray actor's body)."""

    def __init__(self) -> None:
        self.rows: dict[str, list[int]] = {}

    def stage_rows(self, label: str, rows_in: int, rows_out: int) -> None:
        counts = self.rows.setdefault(label, [0, 0])
        counts[0] += rows_in
        counts[1] += rows_out

    def snapshot(self) -> dict[str, list[int]]:
        return {label: list(counts) for label, counts in self.rows.items()}


def start_counter():
    """The row counter as an actor on the driver's node: on a worker node it would die with the node, and
    the progress line would freeze."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(num_cpus=0)(StageRows).options(scheduling_strategy=here).remote()


def counter_snapshot(counter) -> Callable[[], dict[str, list[int]]]:
    """A callable that reads the counter actor (at most 2 s: progress never holds the job up)."""
    import ray

    return lambda: ray.get(counter.snapshot.remote(), timeout=2)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class Progress:
    """The job's progress, shown every `every` seconds by its own timer between `start()` and `stop()`."""

    def __init__(
        self,
        total_shards: int,
        done_before: int,
        stages: list[str],
        sources_to_do: int,
        snapshot: Callable[[], dict[str, list[int]]] | None = None,
        every: float = 5.0,
        stream=None,
        on_rows: Callable[[dict[str, list[int]]], None] | None = None,
    ):
        self.total_shards = total_shards
        self.done_before = done_before
        self.stages = stages
        self.sources_to_do = sources_to_do
        self.snapshot = snapshot
        self.on_rows = on_rows  # told each snapshot of the stages' rows (the metrics of rows waiting)
        self.every = every
        self.stream = stream if stream is not None else sys.stderr
        self.live = self.stream.isatty()
        self.committed = self.failed_shards = 0
        self.rows = {"samples": 0, "failed": 0, "rejected": 0}
        self.stage_rows: dict[str, list[int]] = {}
        self.start_time = time.time()
        self._stop = threading.Event()
        self._timer = threading.Thread(target=self._run, name="factory-progress", daemon=True)

    def start(self) -> None:
        self._timer.start()

    def stop(self) -> None:
        """End the timer and show the final state."""
        self._stop.set()
        if self._timer.is_alive():
            self._timer.join()
        self.show(final=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.show()

    def shard_done(self, result: ShardResult) -> None:
        if result.committed:
            self.committed += 1
            for k in self.rows:
                self.rows[k] += getattr(result, k)
        else:
            self.failed_shards += 1

    def show(self, final: bool = False) -> None:
        if self.snapshot is not None:
            try:
                self.stage_rows = self.snapshot()
                if self.on_rows is not None:
                    self.on_rows(self.stage_rows)
            except Exception:  # progress is best-effort: never let it stop the job
                log.debug("progress: the stage counter did not answer", exc_info=True)
        line = self.line()
        if self.live and not final:
            self.stream.write("\r\033[K" + line)
            self.stream.flush()
        else:
            if self.live:
                self.stream.write("\r\033[K")
            log.info(line)

    def line(self) -> str:
        elapsed = max(time.time() - self.start_time, 1e-9)
        done = self.done_before + self.committed
        width = 20
        filled = int(width * done / max(self.total_shards, 1))
        stages = "  ".join(self._stage(s, elapsed) for s in self.stages)
        failed = f", {self.failed_shards} failed" if self.failed_shards else ""
        return (
            f"[{'#' * filled}{'.' * (width - filled)}] shards {done}/{self.total_shards}{failed}  "
            f"samples {self.rows['samples']} (failed {self.rows['failed']}, rejected {self.rows['rejected']})  "
            f"{self.rows['samples'] / elapsed:.2f} samples/s  ETA {self._eta(elapsed)}"
            + (f"  | {stages}" if stages else "")
        )

    def _stage(self, label: str, elapsed: float) -> str:
        rows_in, rows_out = self.stage_rows.get(label, (0, 0))
        return f"{label} {rows_in} in / {rows_out} out ({rows_out / elapsed:.1f}/s)"

    def _eta(self, elapsed: float) -> str:
        """From the first stage's sources taken in, which moves with every batch; else from shards."""
        first = self.stage_rows.get(self.stages[0], (0, 0))[0] if self.stages else 0
        if first and self.sources_to_do:
            return _duration(elapsed / first * max(self.sources_to_do - first, 0))
        remaining = self.total_shards - self.done_before - self.committed - self.failed_shards
        return _duration(elapsed / self.committed * remaining) if self.committed else "?"
