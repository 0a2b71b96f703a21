"""The shard writer alone: commit order, idempotent rewrites, the failure ceiling, storage errors retried."""

import json
import threading

import numpy as np
import pytest
from helpers import read_tar

from factory.engine.records import Failure, JobInfo, ShardWork
from factory.engine.writer import WriteSettings, write_shard
from factory.output.layout import STATS_DIR, OutputStore
from factory.sample import Sample

pytestmark = pytest.mark.timeout(60)

SETTINGS = WriteSettings(
    image_format="png", quality=95, keep_rejected=False, max_failure_fraction=0.5, retries=2, backoff=0.0
)
JOB = JobInfo(job="t", spec_hash="abc", models={})


def shard_work(n: int, k: int = 2) -> ShardWork:
    rng = np.random.default_rng(0)
    samples = []
    for i in range(n):
        src = Sample(
            shard=3,
            index=i,
            source_id=f"s-{i}",
            image=rng.integers(0, 256, (8, 8, 3), dtype=np.uint8),
            mask=np.zeros((8, 8), np.uint8),
        )
        samples += src.expand(k)
    return ShardWork(shard=3, samples=samples, started=0.0)


def test_a_shard_commits_tar_failures_then_stats(tmp_path):
    store = OutputStore(str(tmp_path))
    work = shard_work(3)
    work.samples[1].fail("synth", "bad_output", "nan")
    work.samples[4].reject("select", "low_cosine")
    result = write_shard(work, store, SETTINGS, JOB)
    assert (result.status, result.samples, result.failed, result.rejected) == ("committed", 4, 1, 1)
    assert list(read_tar(tmp_path / "shards" / "shard-000003.tar")) == [
        "000003-000000-0",
        "000003-000001-0",
        "000003-000001-1",
        "000003-000002-1",
    ]
    stats = json.loads((tmp_path / "stats" / "shard-000003.json").read_text())
    assert stats["failures_by_reason"] == {"synth:bad_output": 1} and stats["rejected_by_reason"] == {
        "select:low_cosine": 1
    }
    lines = [json.loads(x) for x in (tmp_path / "failures" / "shard-000003.jsonl").read_text().splitlines()]
    assert [(r["key"], r["kind"], r["reason"]) for r in lines] == [
        ("000003-000000-1", "failed", "bad_output"),
        ("000003-000002-0", "rejected", "low_cosine"),
    ]
    first = (tmp_path / "shards" / "shard-000003.tar").read_bytes()
    # A repeated write of the same shard that was not committed (a crash between its tar and its stats)
    # gives the same bytes.
    (tmp_path / "stats" / "shard-000003.json").unlink()
    assert write_shard(shard_work_with_marks(), store, SETTINGS, JOB).committed
    assert (tmp_path / "shards" / "shard-000003.tar").read_bytes() == first


def shard_work_with_marks() -> ShardWork:
    work = shard_work(3)
    work.samples[1].fail("synth", "bad_output", "nan")
    work.samples[4].reject("select", "low_cosine")
    return work


def test_a_shard_over_the_failure_ceiling_writes_nothing(tmp_path):
    store = OutputStore(str(tmp_path))
    work = shard_work(2)
    for s in work.samples[:3]:
        s.fail("read", "corrupt_image")
    result = write_shard(work, store, SETTINGS, JOB)
    assert not result.committed and "3 of 4 rows failed (read:corrupt_image 3)" in result.failure.cause
    assert not (tmp_path / "shards").exists() and not (tmp_path / "stats").exists()


def test_a_failed_shard_passes_its_cause_on(tmp_path):
    work = shard_work(1)
    work.failure = Failure(stage="synth", cause="RuntimeError: boom", advice="rerun")
    result = write_shard(work, OutputStore(str(tmp_path)), SETTINGS, JOB)
    assert (result.status, result.failure) == ("failed", work.failure)
    assert result.to_row()["cause"] == "RuntimeError: boom" and type(result).from_row(result.to_row()) == result
    assert not (tmp_path / "stats").exists()


def test_storage_errors_are_retried_then_reported_without_a_commit(tmp_path, monkeypatch):
    store = OutputStore(str(tmp_path))
    calls = {"n": 0}
    real_write_json = store.write_json

    def flaky(data, *parts):
        calls["n"] += 1
        if calls["n"] <= 2:
            raise OSError(28, "No space left on device")
        real_write_json(data, *parts)

    monkeypatch.setattr(store, "write_json", flaky)
    assert write_shard(shard_work(1), store, SETTINGS, JOB).committed
    store = OutputStore(str(tmp_path / "another"))
    monkeypatch.setattr(store, "write_json", flaky)
    calls["n"] = -10  # now every attempt fails
    result = write_shard(shard_work(1), store, SETTINGS, JOB)
    assert result.status == "failed" and result.failure.stage == "write"
    assert "No space left" in result.failure.cause and "free space" in result.failure.advice


class StatsFailAfter(OutputStore):
    """A store whose stats write waits until `other_done` is set, then fails: the attempt of a shard that
    wrote its tar and lost its storage just as another attempt of the same shard committed it."""

    def __init__(self, url: str, at_stats: threading.Event, other_done: threading.Event):
        super().__init__(url)
        self.at_stats, self.other_done = at_stats, other_done

    def write_json(self, data, *parts):
        if parts[0] == STATS_DIR:
            self.at_stats.set()
            assert self.other_done.wait(30)
            raise OSError(5, "Input/output error")
        super().write_json(data, *parts)


def test_an_attempt_that_fails_never_undoes_another_attempts_commit(tmp_path):
    at_stats, other_done = threading.Event(), threading.Event()
    results = {}
    once = WriteSettings(**{**SETTINGS.__dict__, "retries": 0})
    first = threading.Thread(
        target=lambda: results.update(
            first=write_shard(shard_work(3), StatsFailAfter(str(tmp_path), at_stats, other_done), once, JOB)
        )
    )
    first.start()
    assert at_stats.wait(30)  # the first attempt's tar is in place; its stats write is about to fail
    results["second"] = write_shard(shard_work(3), OutputStore(str(tmp_path)), SETTINGS, JOB)
    other_done.set()
    first.join(30)
    assert results["second"].committed and results["first"].status == "failed"
    tar, stats = tmp_path / "shards" / "shard-000003.tar", tmp_path / "stats" / "shard-000003.json"
    assert len(read_tar(tar)) == 6 and json.loads(stats.read_text())["samples"] == 6
    committed = tar.read_bytes()
    # A late third attempt, with other rows (say, its batches were split for memory), finds the shard
    # committed and writes nothing.
    late = shard_work(1)
    late.shard = 3
    assert write_shard(late, OutputStore(str(tmp_path)), SETTINGS, JOB).committed
    assert tar.read_bytes() == committed and json.loads(stats.read_text())["samples"] == 6
