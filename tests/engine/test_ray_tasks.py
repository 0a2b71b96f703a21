"""A job without stages runs as plain Ray tasks (factory/engine/executors/ray_tasks.py): every shard once,
a queue that stays bounded, and a shard whose worker keeps dying comes back as a failed row instead of
ending the job."""

import os
import time
from pathlib import Path

import pytest

from factory.engine.executors.ray_tasks import _in_flight_limit, commit_shards
from factory.engine.records import ShardResult, ShardWork

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


class MarkingReader:
    """Reads empty shards and leaves a file per shard read; the process reading shard `dies_on` exits, as
    an OOM-killed worker would."""

    def __init__(self, marks: Path, dies_on: int | None = None):
        self.marks = marks
        self.dies_on = dies_on

    def read(self, shard: int) -> ShardWork:
        if shard == self.dies_on:
            os._exit(1)
        (self.marks / str(shard)).touch()
        return ShardWork(shard=shard, samples=[], started=0.0)


class CountingWriter:
    def commit(self, work: ShardWork) -> ShardResult:
        return ShardResult(work.shard, "committed")


def test_the_queue_is_bounded_and_every_shard_runs_once(ray_local, tmp_path):
    limit = _in_flight_limit(1.0)
    assert limit < 50
    results = commit_shards(list(range(50)), MarkingReader(tmp_path), CountingWriter(), num_cpus=1.0)
    first = next(results)
    # The consumer stops reading: no task is submitted past the limit, however long it waits.
    time.sleep(3)
    assert len(list(tmp_path.iterdir())) <= limit + 1
    rest = list(results)
    assert sorted(r.shard for r in [first, *rest]) == list(range(50))
    assert all(r.committed for r in rest) and len(list(tmp_path.iterdir())) == 50


def test_a_worker_that_keeps_dying_fails_its_shard_alone(ray_local, tmp_path):
    results = {r.shard: r for r in commit_shards([0, 1, 2], MarkingReader(tmp_path, dies_on=1), CountingWriter(), 1.0)}
    assert results[0].committed and results[2].committed
    assert results[1].status == "failed" and results[1].failure.stage == "worker"
    assert results[1].failure.cause.startswith("WorkerCrashedError") and "rerun" in results[1].failure.advice
