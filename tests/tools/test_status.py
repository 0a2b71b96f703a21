"""`factory status` (factory/tools/status.py) tells which shards had batches split for memory: their batch
composition, and so possibly their pixels, differ from a run that did not split."""

import json

import pytest
from helpers import folder_spec, write_folder_source

from factory.engine.driver import run_job
from factory.engine.spec import parse_spec
from factory.output.layout import OutputStore
from factory.tools.status import format_status, job_status

pytestmark = pytest.mark.unit


def run(tmp_path, oom_over: int) -> OutputStore:
    src = tmp_path / "src"
    if not src.exists():
        write_folder_source(src, 6, size=16)
    stage = {
        "kind": "stages_for_tests:InvertStage",
        "name": "invert",
        "params": {"oom_over": oom_over},
        "resources": {"batch_size": 2},
    }
    data = folder_spec(src, tmp_path / f"out-{oom_over}", [stage], shard_size=2)
    data["engine"] = {"executor": "in_process"}
    spec = parse_spec(data)
    assert run_job(spec)["complete"]
    return OutputStore.at(spec.output)


def test_shards_split_for_memory_are_recorded_and_told(tmp_path):
    store = run(tmp_path, oom_over=1)  # every batch of two runs out of CUDA memory and is split in halves
    stats = [s for _, s in store.iter_stats()]
    assert [s["split_for_memory"] for s in stats] == [["invert"]] * 3
    assert all(s["stages"]["invert"]["oom_splits"] == 1 for s in stats)
    status = job_status(store)
    assert status["shards_split_for_memory"] == 3 and status["split_for_memory_first"] == [0, 1, 2]
    told = format_status(status)
    assert "split    3 shards had batches split after CUDA ran out of memory (shards 0, 1, 2)" in told
    json.dumps(status)  # `factory status --json` prints it


def test_a_job_that_never_split_says_nothing_of_it(tmp_path):
    store = run(tmp_path, oom_over=0)
    assert all(s["split_for_memory"] == [] for _, s in store.iter_stats())
    status = job_status(store)
    assert status["shards_split_for_memory"] == 0 and "split" not in format_status(status)
