"""How failures are told (factory/engine/errors.py): the root cause through Ray's wrappers, by type."""

import os
import pickle
import subprocess
import sys

import pytest
import yaml
from helpers import REPO, SUPPORT, folder_spec, write_folder_source

from factory.engine.driver import _failure_message, run_job
from factory.engine.errors import RERUN, StageSetupFailed, advice, one_line, root_cause
from factory.engine.records import Failure, ShardResult
from factory.engine.spec import parse_spec


class Wrapper(Exception):
    """Stands in for Ray's RayTaskError: the task's exception as `.cause`."""

    def __init__(self, cause: BaseException):
        super().__init__("ray::task() (pid=1, ip=10.0.0.1)")
        self.cause = cause


def setup_failed() -> StageSetupFailed:
    return StageSetupFailed("caption", "node 10.0.0.7 (pid 42)", "RuntimeError: CUDA error: no device")


@pytest.mark.unit
def test_the_root_cause_is_found_through_wrappers_carried_errors_and_causes():
    died = RuntimeError(Wrapper(setup_failed()))  # as Ray's ActorDiedError carries its creation task's error
    try:
        raise ValueError("outer") from died
    except ValueError as e:
        root = root_cause(e)
    assert isinstance(root, StageSetupFailed)
    assert one_line(root) == (
        "StageSetupFailed: stage caption could not start on node 10.0.0.7 (pid 42): RuntimeError: CUDA error: no device"
    )
    assert advice(died) == StageSetupFailed.advice and StageSetupFailed.advice.endswith(RERUN)


@pytest.mark.unit
def test_a_path_that_cannot_be_used_is_not_told_to_rerun():
    """A rerun meets the same path: the advice names the path's fix, by the error's type."""
    for error in (
        NotADirectoryError(20, "Not a directory", "/data/a-file/out"),
        FileNotFoundError(2, "No such file or directory", "/proc/nothing"),
        Wrapper(FileNotFoundError("The specified bucket does not exist")),
    ):
        told = advice(error)
        assert "fix it, or pass --output elsewhere" in told and RERUN not in told, told


@pytest.mark.unit
def test_an_output_that_cannot_be_written_is_refused_before_ray_starts(tmp_path):
    """A unit test: had the job started a Ray (it names ray_data), the tier check would fail it. The
    read-only mount, which needs `mount`, is in test_faults.py."""
    src = tmp_path / "src"
    write_folder_source(src, 2, size=8)
    (tmp_path / "a-file").write_text("not a folder")
    data = folder_spec(src, tmp_path / "a-file" / "out" / "job", [], shard_size=2)
    data["engine"] = {"executor": "ray_data"}
    with pytest.raises(NotADirectoryError) as raised:
        run_job(parse_spec(data))
    assert RERUN not in advice(raised.value) and "--output elsewhere" in advice(raised.value)


@pytest.mark.unit
def test_a_stage_setup_failure_survives_the_trip_to_the_driver():
    back = pickle.loads(pickle.dumps(setup_failed()))
    assert str(back) == str(setup_failed()) and back.stage == "caption"


@pytest.mark.e2e
def test_the_cli_tells_a_factory_error_with_its_advice_once(tmp_path):
    src = tmp_path / "src"
    write_folder_source(src, 2, size=8)
    stage = {"kind": "stages_for_tests:InvertStage", "name": "invert", "params": {"setup_error": "no device"}}
    data = folder_spec(src, tmp_path / "out", [stage], shard_size=2)
    data["engine"] = {"executor": "in_process"}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(data))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SUPPORT), str(REPO)])}
    done = subprocess.run(
        [sys.executable, "-m", "factory.cli", "run", str(tmp_path / "job.yaml")],
        capture_output=True,
        text=True,
        env=env,
    )
    told = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 1 and told.startswith("factory: stage invert could not start on node "), told
    assert told.count(RERUN) == 1 and told.endswith(f"RuntimeError: no device; {StageSetupFailed.advice}"), told


@pytest.mark.unit
def test_a_job_that_ends_incomplete_names_each_distinct_cause_with_its_shards():
    def failed(shard: int, cause: str) -> ShardResult:
        return ShardResult.failed_at(shard, Failure(stage="invert", cause=cause, advice="do this"))

    told = _failure_message([failed(1, "died"), failed(2, "timeout"), failed(3, "died")], attempted=12, causes=1)
    assert told == (
        "3 of 12 shards failed and stay uncommitted: shards 1, 3 at stage invert: died; do this"
        " | and 1 other causes (the log has each)"
    )
