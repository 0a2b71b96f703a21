"""The fault matrix: each fault hits a real `factory run` (a subprocess with its own local Ray), and after it
(and a rerun where the job stopped) every shard is committed exactly once, no partial tar exists, and
the shards are byte-identical to those of an uninterrupted run (run in this process, on the shared Ray:
the same spec gives the same bytes wherever it runs). The faults that hit the shards' work run under each
executor that runs them on Ray (`EXECUTORS`): the executor is not part of the spec's hash, so every
executor must give the reference's bytes.

Storage faults that no real device gives on demand are
injected by tests/support/faults/sitecustomize.py at fsspec's local file layer, in every process of the run.
"""

from __future__ import annotations

import io
import logging
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import psutil
import pytest
import seaweed
import yaml
from helpers import REPO, SUPPORT, folder_spec, write_folder_source

from factory.engine.driver import run_job
from factory.engine.lease import LeaseError
from factory.engine.spec import parse_spec
from factory.output.layout import OutputStore
from factory.tools.status import format_status, job_status

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

FACTORY = [sys.executable, "-m", "factory.cli"]
SHARDS = 8
FAST = {"retries": 2, "retry_backoff_s": 0.2}
# The executors a shard's work can be hit in: Ray Data (read tasks, an actor pool per stage, write tasks)
# and plain Ray tasks (one task per shard, read to commit). Not in_process: it has no worker to kill or
# replace (a worker's death is the job's, by design), and the storage faults it meets are the driver's own.
EXECUTORS = ["ray_data", "ray_tasks"]


def job_spec(src: Path, out, executor: str = "auto", **output) -> dict:
    """The job every fault hits: the same spec (its hash is in every sample) as the reference run. Where a
    fault must land mid-job, the run is started with a gate (support/stages_for_tests.py): every shard but
    the first waits while the gate file exists, however fast the machine."""
    stage = {"kind": "stages_for_tests:InvertStage", "params": {"variants": 2}, "resources": {"batch_size": 2}}
    spec = folder_spec(src, out, [stage], shard_size=2, **output)
    spec["engine"] = {**FAST, "executor": executor}
    return spec


def write_spec(path: Path, spec: dict) -> Path:
    path.write_text(yaml.safe_dump(spec))
    return path


def env_with(fault: str | None = None, pids: Path | None = None, gate: Path | None = None) -> dict:
    env = dict(os.environ)
    if pids is not None:
        env["FACTORY_TEST_PIDS"] = str(pids)
    if gate is not None:
        gate.touch()
        env["FACTORY_TEST_GATE"] = str(gate)
    paths = [str(SUPPORT / "faults")] if fault else []
    env["PYTHONPATH"] = os.pathsep.join([*paths, str(SUPPORT), str(REPO), env.get("PYTHONPATH", "")])
    if fault:
        env["FACTORY_TEST_FAULT"] = fault
    return env


def run_cli(*args, fault: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*FACTORY, *args], capture_output=True, text=True, timeout=timeout, env=env_with(fault))


def start_cli(*args, fault: str | None = None, pids: Path | None = None, gate: Path | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [*FACTORY, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env_with(fault, pids, gate)
    )


def tars_in(shards: dict[str, bytes]) -> dict[str, bytes]:
    for data in shards.values():
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:  # a partial tar does not open
            tar.getmembers()
    return shards


def local_tars(out: Path) -> dict[str, bytes]:
    return tars_in({p.name: p.read_bytes() for p in sorted((out / "shards").glob("*.tar"))})


def assert_exactly_once(out: Path, reference: dict[str, bytes]) -> None:
    assert local_tars(out) == reference
    assert sorted(p.name for p in (out / "stats").glob("*.json")) == [f"shard-{s:06d}.json" for s in range(SHARDS)]
    assert not (out / "_tmp").exists() or not any((out / "_tmp").iterdir())


def last_line(stderr: str) -> str:
    return stderr.strip().splitlines()[-1]


def wait_for(predicate, what: str, proc: subprocess.Popen | None = None, timeout: float = 240):
    deadline = time.time() + timeout
    while not (found := predicate()):
        assert time.time() < deadline, f"timed out waiting for {what}"
        assert proc is None or proc.poll() is None, f"the run ended before {what}: {proc.communicate()[1][-2000:]}"
        time.sleep(0.1)
    return found


def committed(out: Path) -> int:
    return len(list((out / "stats").glob("*.json"))) if (out / "stats").exists() else 0


def recorded_process(folder: Path, role: str) -> psutil.Process | None:
    """A live process that recorded itself as `role` in `folder` (FACTORY_TEST_PIDS: a stage worker when it
    is set up, a process when it starts writing a tar; see support/stages_for_tests.py and faults/)."""
    for marker in sorted(folder.glob(f"{role}-*")):
        try:
            return psutil.Process(int(marker.name.rsplit("-", 1)[1]))
        except psutil.NoSuchProcess:
            continue
    return None


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    src = tmp_path_factory.mktemp("fault-src")
    write_folder_source(src, 2 * SHARDS)
    return src


def uninterrupted(spec: dict) -> dict[str, bytes]:
    """Run `spec` to the end without a fault (resuming what its output holds), in this process on the
    shared Ray; returns its shards."""
    assert run_job(parse_spec(spec))["complete"]
    return local_tars(Path(spec["output"]["url"]))


@pytest.fixture(scope="module")
def reference(source, tmp_path_factory, ray_local):
    return uninterrupted(job_spec(source, tmp_path_factory.mktemp("fault-ref") / "out"))


def test_the_driver_killed_mid_run_then_rerun_gives_every_shard_exactly_once(
    source, reference, tmp_path, ray_local, caplog
):
    """Also: while the run holds the output, a second run of the same spec there is refused."""
    out = tmp_path / "out"
    spec_data = job_spec(source, out)
    spec = write_spec(tmp_path / "job.yaml", spec_data)
    gate = tmp_path / "gate"  # shard 0 commits, the others wait: the kill always lands mid-job
    proc = start_cli("run", str(spec), gate=gate)
    wait_for(lambda: committed(out) >= 1, "a first commit", proc)
    # While it runs, a second run of the same spec on the same output is refused (the lease) and writes nothing.
    with pytest.raises(LeaseError, match="is being written by another run"):
        run_job(parse_spec(spec_data))
    started = psutil.Process(proc.pid).children(recursive=True)  # the local Ray and its workers
    assert started, "the driver started no process"
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    # Nothing the killed driver started outlives it (a local Ray's agents used to).
    gone, alive = psutil.wait_procs(started, timeout=30)
    assert not alive, [p.cmdline() for p in alive]
    assert committed(out) == 1
    gate.unlink()
    local_tars(out)  # whatever sits under a final name after the kill is a whole tar, never a partial one

    with caplog.at_level(logging.INFO, logger="factory"):
        uninterrupted(spec_data)  # the rerun, in this process: the first run's own Ray is gone, as it should be
    assert "1 already committed" in caplog.text
    assert_exactly_once(out, reference)
    status = format_status(job_status(OutputStore.at(parse_spec(spec_data).output)))
    assert f"shards   {SHARDS}/{SHARDS}" in status and f"samples  {4 * SHARDS} written" in status

    # The same output with another spec: refused on the command line, naming the way out.
    spec_data["seed"] = 99
    write_spec(spec, spec_data)
    again = run_cli("run", str(spec))
    assert again.returncode == 1
    assert "already holds job 'e2e'" in again.stderr and "--output" in again.stderr


@pytest.mark.parametrize("executor", EXECUTORS)
def test_the_process_running_a_stage_killed_mid_shard_is_replaced_and_its_shard_redone(
    executor, source, reference, tmp_path, ray_local
):
    """The process that set the stage up (the test stage records it) dies while it holds a shard at the
    gate: under ray_data a stage actor (restarted, its task retried), under ray_tasks the task worker that
    runs the shard from read to commit (replaced, the task retried)."""
    out = tmp_path / "out"
    spec_data = job_spec(source, out, executor)
    spec = write_spec(tmp_path / "job.yaml", spec_data)
    pids, gate = tmp_path / "pids", tmp_path / "gate"
    pids.mkdir()
    proc = start_cli("run", str(spec), pids=pids, gate=gate)
    wait_for(lambda: committed(out) >= 1, "a first commit", proc)
    worker = wait_for(lambda: recorded_process(pids, "stage"), "a process running the stage", proc)
    worker.send_signal(signal.SIGKILL)  # it holds a shard, waiting at the gate
    gate.unlink()
    code, err = finish(proc)
    if code != 0:  # a clean stop is allowed; the rerun must then finish the job
        assert last_line(err).startswith("factory:"), err[-2000:]
        uninterrupted(spec_data)
    assert_exactly_once(out, reference)


def stageless_spec(src: Path, out: Path) -> dict:
    """A job without stages: `auto` runs it on plain Ray tasks, one per shard, read to commit."""
    data = folder_spec(src, out, [], shard_size=2)
    data["engine"] = FAST
    return data


@pytest.fixture(scope="module")
def stageless_reference(source, tmp_path_factory, ray_local):
    return uninterrupted(stageless_spec(source, tmp_path_factory.mktemp("fault-ref-stageless") / "out"))


@pytest.mark.parametrize("executor", EXECUTORS)
def test_a_process_killed_mid_write_and_a_transient_storage_error_are_retried(executor, source, request, tmp_path):
    """Two faults of one run: the first process writing a tar is killed while it writes (every write is
    slowed to catch it), and the first write that gets past that fails once with EIO. Both are retried,
    nothing is recorded as failed. Under ray_data a write task dies (the job has a stage); under ray_tasks
    the shard's task, redone from its read, in a job without stages (the plain-task path `auto` takes; a
    ray_tasks worker dying with a stage is the test above)."""
    out = tmp_path / "out"
    if executor == "ray_data":
        data, reference = job_spec(source, out, executor), request.getfixturevalue("reference")
    else:
        data, reference = stageless_spec(source, out), request.getfixturevalue("stageless_reference")
    spec = write_spec(tmp_path / "job.yaml", data)
    pids, markers = tmp_path / "pids", tmp_path / "markers"
    pids.mkdir()
    markers.mkdir()
    proc = start_cli("run", str(spec), fault=f"slow:0.5|fail-once:{markers}", pids=pids)
    writer = wait_for(lambda: recorded_process(pids, "writer"), "a write task", proc)
    writer.send_signal(signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    assert (markers / "failed-once").exists()  # the EIO did fire
    assert "injected I/O error" in stderr and "retry 1 of 2" in stderr
    assert ", 0 failed" in stdout and not (out / "failures").exists()
    assert_exactly_once(out, reference)


@pytest.fixture
def small_disk(tmp_path):
    """A 160 KiB filesystem (tmpfs) for the output: the plan and a few shards fit, the job does not."""
    mount = tmp_path / "small"
    mount.mkdir()
    mounted = (
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160k", "tmpfs", str(mount)], capture_output=True).returncode
        == 0
    )
    yield mount, mounted
    if mounted:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.parametrize("executor", EXECUTORS)
def test_a_full_disk_ends_with_one_line_no_partial_tar_and_a_rerun_finishes_once(
    executor, source, reference, tmp_path, small_disk, ray_local, caplog
):
    """A shard is committed when its stats exist (written last, atomically). A shard whose stats write hit
    the full disk may keep its whole tar without stats (a commit never deletes a tar: another attempt may
    have committed it): it is not counted, and the rerun writes it again."""
    mount, mounted = small_disk
    out = mount / "out"
    spec_data = job_spec(source, out, executor)
    spec = write_spec(tmp_path / "job.yaml", spec_data)
    # A real full disk where this machine lets the test mount one; else every write fails with ENOSPC.
    result = run_cli("run", str(spec), fault=None if mounted else "enospc")
    assert result.returncode == 1
    line = last_line(result.stderr)
    assert line.startswith("factory: ") and "No space left on device" in line and "free space" in line, line
    assert "Traceback" not in result.stderr
    tars = local_tars(out) if (out / "shards").exists() else {}  # every file under a final tar name is whole
    stats = sorted(p.stem for p in (out / "stats").glob("*.json")) if (out / "stats").exists() else []
    assert all(f"{name}.tar" in tars for name in stats)  # the stats, written last, always follow their tar
    store = OutputStore.at(parse_spec(spec_data).output)
    assert [store.shard_name(s) for s in store.committed_shards()] == stats  # committed = has stats, no other
    assert f"shards   {len(stats)}/{SHARDS}" in format_status(job_status(store))
    if mounted:
        subprocess.run(["mount", "-o", "remount,size=16m", str(mount)], check=True)
    with caplog.at_level(logging.INFO, logger="factory"):
        uninterrupted(spec_data)  # the rerun, once there is space, resumes and finishes
    assert f"{len(stats)} already committed, {SHARDS - len(stats)} to do" in caplog.text
    assert_exactly_once(out, reference)


def test_an_unwritable_output_ends_with_one_line(source, tmp_path):
    """One executor: the driver refuses the output before Ray or any executor starts, so the run takes the
    same path whichever executor the spec names."""
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(readonly)]).returncode != 0:
        readonly = tmp_path / "a-file"  # where a mount is not allowed: a path under a regular file
        readonly.write_text("not a folder")
    try:
        spec = write_spec(tmp_path / "job.yaml", job_spec(source, readonly / "out"))
        result = run_cli("run", str(spec))
    finally:
        subprocess.run(["umount", "-l", str(readonly)], check=False, capture_output=True)
    assert result.returncode == 1
    assert last_line(result.stderr).startswith("factory: ") and "Traceback" not in result.stderr
    assert "not writable" in last_line(result.stderr) or "Not a directory" in last_line(result.stderr)
    assert "Started a local Ray" not in result.stderr


def s3_tars(fs, prefix: str) -> dict[str, bytes]:
    fs.invalidate_cache()
    return tars_in({p.rsplit("/", 1)[-1]: fs.cat(p) for p in sorted(fs.ls(f"{prefix}/shards"))})


# The test server checks no signatures: any secret is accepted, and this one is easy to grep for.
SECRET = "factory-secret-7f3a9c"


def assert_no_secret_anywhere(texts: list[str], fs, prefix: str, since: float) -> None:
    """Not in what the run printed, not in any object of its output, not in any Ray log written since
    `since` (other tests' Rays may run beside it: every session is read)."""
    assert not any(SECRET in text for text in texts)
    fs.invalidate_cache()
    assert fs.find(f"{prefix}/shards")
    for path in fs.find(prefix):
        assert SECRET.encode() not in fs.cat(path), path
    for log in Path("/tmp/ray").glob("session_*/logs/**/*"):
        if log.is_file() and not log.is_symlink() and log.stat().st_mtime >= since:
            assert SECRET.encode() not in log.read_bytes(), log


@pytest.mark.parametrize("executor", EXECUTORS)
def test_the_s3_server_killed_and_restarted_mid_run(executor, source, reference, tmp_path, ray_local, caplog):
    """Also: the credentials of the output (and of the source, which a local source ignores and the spec
    keeps) reach no file and no log, through the errors of the outage and the rerun after it."""
    import s3fs

    ports = seaweed.free_ports()
    data = tmp_path / "weed"
    server = seaweed.start(data, ports)
    options = seaweed.options(ports)
    fs = s3fs.S3FileSystem(**options)
    spec = job_spec(
        source,
        "s3://test/faults",
        executor,
        endpoint_url=seaweed.endpoint(ports),
        storage_options={"key": seaweed.KEY, "secret": SECRET},
    )
    spec["source"]["storage_options"] = {"token": SECRET}
    spec_path = write_spec(tmp_path / "job.yaml", spec)
    gate = tmp_path / "gate"
    started = time.time()
    proc = start_cli("run", str(spec_path), gate=gate)
    try:

        def s3_committed():
            fs.invalidate_cache()
            return fs.exists("test/faults/stats") and len(fs.ls("test/faults/stats")) >= 1

        wait_for(s3_committed, "a first commit on S3", proc)
        server.send_signal(signal.SIGKILL)
        server.wait()
        gate.unlink()  # the other shards now read, write and commit into the outage (weed takes seconds to start)
        server = seaweed.start(data, ports)
        out, err = proc.communicate(timeout=400)  # it rides the outage out or stops cleanly; it never hangs
        if proc.returncode != 0:
            assert last_line(err).startswith("factory:") and "Traceback" not in err, err[-3000:]
            with caplog.at_level(logging.INFO, logger="factory"):
                assert run_job(parse_spec(spec))["complete"]  # the rerun resumes and finishes
        assert s3_tars(fs, "test/faults") == reference
        fs.invalidate_cache()
        assert len(fs.ls("test/faults/stats")) == SHARDS
        assert_no_secret_anywhere([out, err, caplog.text], fs, "test/faults", started)
    finally:
        if proc.poll() is None:
            proc.kill()
        seaweed.stop(server)
