"""A job without stages runs as plain Ray tasks (factory/engine/executors/ray_tasks.py): every shard once, a bounded
queue, and a shard whose worker keeps dying comes back as a failed row instead of ending the job."""

import os

import pytest

from factory.engine.executors.ray_tasks import _in_flight_limit, commit_shards
from factory.engine.records import ShardWork

pytestmark = pytest.mark.timeout(300)


class DyingReader:
    """Reads empty shards; the process reading shard `dies_on` exits, as an OOM-killed worker would."""

    def __init__(self, dies_on: int | None = None):
        self.dies_on = dies_on

    def read(self, shard: int) -> ShardWork:
        if shard == self.dies_on:
            os._exit(1)
        return ShardWork(shard=shard, samples=[], started=0.0)


class SummaryWriter:
    def commit(self, work: ShardWork) -> dict:
        return {"shard": work.shard, "status": "committed", "samples": 0, "failed": 0, "rejected": 0}


def test_every_shard_once_through_a_bounded_queue(ray_local):
    assert _in_flight_limit(1.0) == 4 and _in_flight_limit(0.5) == 8 and _in_flight_limit(0.0) == 4
    results = list(commit_shards(list(range(50)), DyingReader(), SummaryWriter(), num_cpus=1.0))
    assert sorted(r["shard"] for r in results) == list(range(50))
    assert {r["status"] for r in results} == {"committed"}


def test_a_worker_that_keeps_dying_fails_its_shard_alone(ray_local):
    results = {r["shard"]: r for r in commit_shards([0, 1, 2], DyingReader(dies_on=1), SummaryWriter(), 1.0)}
    assert results[0]["status"] == results[2]["status"] == "committed"
    assert results[1]["status"] == "failed" and results[1]["stage"] == "worker"
    assert results[1]["cause"].startswith("WorkerCrashedError") and "rerun" in results[1]["advice"]
