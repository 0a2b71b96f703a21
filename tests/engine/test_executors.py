"""The executor contract (factory/engine/executors/base.py), the same for every executor: each shard once,
shards byte-identical whichever executor made them, a poison shard (its worker dies on every try) and a
hung one (past `engine.shard_timeout_s`) fail alone with their stage and cause while the job goes on.

The in-process executor has no worker to lose: a poison sample ends its process, which is the user's, so
it is left out of that case (its deadline raises in the main thread instead of ending a worker).
"""

import io
import logging
import re
import tarfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import folder_spec, write_folder_source

from factory.engine.driver import run_job
from factory.engine.errors import JobIncomplete, StageSetupFailed, advice, one_line
from factory.engine.executors.base import ROW_COPIES_IN_A_WORKER, WORKER_BASE_MEMORY, ShardJob, worker_memory
from factory.engine.executors.ray_data import RayDataExecutor
from factory.engine.executors.ray_tasks import RayTasksExecutor, _in_flight_limit
from factory.engine.records import ShardResult, ShardWork
from factory.engine.spec import parse_spec
from factory.engine.watch import Watch
from factory.output.layout import OutputStore
from factory.schema import SpecError
from factory.sources.classes import ClassSet

pytestmark = pytest.mark.timeout(300)

EXECUTORS = ["ray_data", "ray_tasks", "in_process"]
SHARDS = 4


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    src = tmp_path_factory.mktemp("executor-src")
    write_folder_source(src, 2 * SHARDS, size=16)
    return src


def spec(source: Path, out: Path, executor: str, **invert) -> dict:
    stage = {
        "kind": "stages_for_tests:InvertStage",
        "name": "invert",
        "params": {"variants": 2, **invert},
        "resources": {"batch_size": 2},
    }
    data = folder_spec(source, out, [stage], shard_size=2)
    data["engine"] = {"executor": executor, "retries": 1, "retry_backoff_s": 0.1}
    return data


def tars(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "shards").glob("*.tar"))}


def pixels(shards: dict[str, bytes]) -> dict[str, dict[str, bytes]]:
    """Each tar's members but the json, which holds the spec hash: what a job with another spec (one that
    plants a poison sample) must still write identically for the shards it commits."""
    out = {}
    for name, data in shards.items():
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            out[name] = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if not m.name.endswith(".json")}
    return out


@pytest.fixture(scope="module")
def reference(source, tmp_path_factory, ray_local):
    out = tmp_path_factory.mktemp("executor-ref") / "out"
    assert run_job(parse_spec(spec(source, out, "ray_data")))["complete"]
    return tars(out)


@pytest.mark.integration
@pytest.mark.parametrize("executor", EXECUTORS)
def test_every_executor_writes_the_same_bytes(executor, source, reference, tmp_path, ray_local):
    if executor == "ray_data":
        return  # the reference itself
    out = tmp_path / "out"
    index = run_job(parse_spec(spec(source, out, executor)))
    assert index["complete"] and index["samples"] == 4 * SHARDS
    assert tars(out) == reference


# What the worker's faulthandler wrote before it died: the signal, the innermost frame and its caller.
SEGFAULT = (
    r": Segmentation fault in ctypes/__init__\.py:\d+ string_at, called from support/stages_for_tests\.py:\d+ process"
)


# Faults that kill and replace workers, as the fault matrix's: the e2e tier, out of the edit loop.
@pytest.mark.e2e
@pytest.mark.parametrize(
    "executor, poison, told, hang",
    [
        ("ray_data", "segfault_ids", SEGFAULT, True),
        ("ray_tasks", "segfault_ids", SEGFAULT, True),
        ("ray_data", "crash_ids", r": its log shows no fatal error: a SIGKILL \(as the OOM killer sends\)", False),
    ],
)
def test_a_poison_and_a_hung_shard_fail_alone_with_their_stage_node_and_cause(
    executor, poison, told, hang, source, reference, tmp_path, ray_local
):
    """A sample that kills its worker every time: the shard fails alone, named with the step, node and pid,
    and with what the worker's faulthandler wrote to its Ray log (the signal, the frame), or that it wrote
    nothing. In the same job a sample that hangs: its shard fails past the deadline, its worker is replaced
    and the other shards go on.

    The next job on the same Ray runs, and then no worker of either holds a CPU: Ray restarts the actor a
    poison shard killed, and when the pool ends Ray Data drops its handles, one of them in a reference
    cycle; that actor used to live on with its CPUs until Python's collector happened to run, and a later
    job could wait for them for ever."""
    out = tmp_path / "out"
    data = spec(source, out, executor, **{poison: ["s-002"]}, **({"hang_ids": ["s-005"]} if hang else {}))
    data["engine"]["shard_timeout_s"] = 3
    failing = ["shard-000001.tar", "shard-000002.tar"] if hang else ["shard-000001.tar"]
    with pytest.raises(JobIncomplete) as raised:
        run_job(parse_spec(data))
    message = str(raised.value)
    assert message.startswith(f"{len(failing)} of 4 shards failed and stay uncommitted: shard"), message
    assert "shard 1 at stage invert" in message and "died on each of 2 tries" in message
    assert "node " in message and "pid " in message and "Ray logs" in message
    assert re.search(told, message), message
    if hang:
        assert "shard 2 at stage invert: timeout: step invert ran past 3s" in message, message
        assert "engine.shard_timeout_s" in message
    assert pixels(tars(out)) == pixels({k: v for k, v in reference.items() if k not in failing})

    # This test's log records (pytest keeps them) hold Ray Data's traceback of the failed task, and with
    # it the actor's handle; a driver outside pytest keeps no such thing.
    for handler in logging.getLogger().handlers:
        getattr(handler, "records", []).clear()
    assert run_job(parse_spec(spec(source, tmp_path / "next", executor)))["complete"]
    assert tars(tmp_path / "next") == reference
    deadline = time.monotonic() + 30  # a dropped actor gives its CPU back a moment later
    while (free := ray_local.available_resources().get("CPU", 0)) < ray_local.cluster_resources()["CPU"]:
        assert time.monotonic() < deadline, f"{free} of {ray_local.cluster_resources()['CPU']} CPUs free"
        time.sleep(0.2)


@pytest.mark.integration
def test_a_hung_shard_times_out_alone_in_process(source, reference, tmp_path):
    """The in-process executor has no worker to replace: the deadline raises in the main thread (the Ray
    executors' case is in the poison job above)."""
    out = tmp_path / "out"
    data = spec(source, out, "in_process", hang_ids=["s-005"])  # shard 2
    data["engine"]["shard_timeout_s"] = 3
    with pytest.raises(JobIncomplete) as raised:
        run_job(parse_spec(data))
    message = str(raised.value)
    assert "shard 2 at stage invert: timeout: step invert ran past 3s" in message, message
    assert "engine.shard_timeout_s" in message
    assert pixels(tars(out)) == pixels({k: v for k, v in reference.items() if k != "shard-000002.tar"})


@pytest.mark.integration
@pytest.mark.parametrize("executor", EXECUTORS)
def test_a_stage_that_cannot_start_is_told_with_its_stage_node_and_cause(executor, source, tmp_path, ray_local):
    """Not Ray's `SystemException` of a dead actor: the stage, where it ran and what its set-up raised."""
    out = tmp_path / "out"
    with pytest.raises(Exception) as raised:
        run_job(parse_spec(spec(source, out, executor, setup_error="CUDA error: no CUDA-capable device is detected")))
    told = one_line(raised.value, limit=1000)
    assert "stage invert could not start on node " in told and "pid " in told, told
    assert "RuntimeError: CUDA error: no CUDA-capable device is detected" in told, told
    assert StageSetupFailed.advice in str(raised.value) + advice(raised.value)
    assert not list(out.glob("shards/*.tar"))


class MarkingReader:
    """Reads empty shards and leaves a file per shard read; the process reading shard `dies_on` exits, as
    an OOM-killed worker would."""

    plan_url = "marks"

    def __init__(self, marks: Path, dies_on: int | None = None):
        self.marks = marks
        self.dies_on = dies_on

    def read(self, shard: int) -> ShardWork:
        if shard == self.dies_on:
            import os

            os._exit(1)
        (self.marks / str(shard)).touch()
        return ShardWork(shard=shard, samples=[], started=0.0)


class CountingWriter:
    def commit(self, work: ShardWork) -> ShardResult:
        return ShardResult(work.shard, "committed")


def marking_executor(tmp_path: Path, dies_on: int | None = None) -> RayTasksExecutor:
    marks = tmp_path / "marks"
    marks.mkdir()
    job_spec = parse_spec(folder_spec(tmp_path, tmp_path / "out", [], shard_size=1))
    job = ShardJob(
        reader=MarkingReader(marks, dies_on),  # type: ignore[arg-type]
        writer=CountingWriter(),  # type: ignore[arg-type]
        stages=(),
        job_seed=0,
        classes=ClassSet("none", ()),
        retries=1,
        backoff=0.0,
        shard_size=1,
        watch=Watch(str(tmp_path / "out"), {}, None, end_process=True),
    )
    return RayTasksExecutor(job_spec, job, OutputStore(str(tmp_path / "out")))


@pytest.mark.integration
def test_the_task_queue_is_bounded_and_every_shard_runs_once(ray_local, tmp_path):
    limit = _in_flight_limit(0.5)  # a task asks for engine.read_cpus (0.5), its most demanding step
    assert limit < 50
    results = marking_executor(tmp_path).run(list(range(50)))
    first = next(results)
    # The consumer stops reading: no task is submitted past the limit, however long it waits.
    time.sleep(3)
    assert len(list((tmp_path / "marks").iterdir())) <= limit + 1
    rest = list(results)
    assert sorted(r.shard for r in [first, *rest]) == list(range(50))
    assert all(r.committed for r in rest) and len(list((tmp_path / "marks").iterdir())) == 50


@pytest.mark.integration
def test_workers_declare_the_memory_of_their_shard_rows_and_their_stage(source, tmp_path):
    data = spec(source, tmp_path / "out", "ray_data")
    data["output"]["shared_filesystem"] = True
    job_spec = parse_spec(data)
    executor = RayDataExecutor(job_spec, SimpleNamespace(gpu_stand_in=None), OutputStore.at(job_spec.output), 10**8)
    assert executor.remote_options(1.0, 0.0, memory_gb=2.0) == {
        "num_cpus": 1.0,
        "num_gpus": 0.0,
        "memory": worker_memory(10**8, 2.0),
    }
    assert worker_memory(10**8, 2.0) == WORKER_BASE_MEMORY + ROW_COPIES_IN_A_WORKER * 10**8 + 2 * 2**30
    unmeasured = RayDataExecutor(job_spec, SimpleNamespace(gpu_stand_in=None), OutputStore.at(job_spec.output))
    assert "memory" not in unmeasured.remote_options(1.0, 0.0, memory_gb=2.0)


@pytest.mark.integration
def test_a_stage_whose_worker_fits_no_nodes_memory_is_refused_before_it_starts(source, tmp_path, ray_local):
    data = spec(source, tmp_path / "out", "ray_data")
    data["stages"][0]["resources"]["memory_gb"] = 10**5
    with pytest.raises(SpecError, match=r"^stages\[0\].resources.memory_gb: a worker of stage 'invert' needs "):
        run_job(parse_spec(data))
    assert not (tmp_path / "out" / "shards").exists()
