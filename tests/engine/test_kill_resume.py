"""Kill the driver with SIGKILL mid-run, rerun the same command, and get exactly the uninterrupted result;
run another spec on that output, and be refused."""

import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import psutil
import pytest
import yaml
from helpers import folder_spec, read_tar, write_folder_source

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

FACTORY = [sys.executable, "-m", "factory.cli"]


def run_cli(*args, **kwargs):
    return subprocess.run([*FACTORY, *args], capture_output=True, text=True, timeout=300, **kwargs)


def tars(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "shards").glob("*.tar"))}


def test_sigkill_then_rerun_gives_every_shard_exactly_once(tmp_path, model_cache):
    write_folder_source(tmp_path / "src", 16)
    stage = {"kind": "stages_for_tests:InvertStage", "params": {"variants": 2}, "resources": {"batch_size": 2}}
    spec = folder_spec(tmp_path / "src", tmp_path / "killed", [stage], shard_size=2)
    spec_path = tmp_path / "job.yaml"
    spec_path.write_text(yaml.safe_dump(spec))

    reference = run_cli("run", str(spec_path), "--output", str(tmp_path / "reference"))
    assert reference.returncode == 0, reference.stderr[-3000:]

    # Shard 0 commits; every other shard waits at its first batch while the gate exists, so the kill
    # always lands mid-job, however fast the machine.
    gate = tmp_path / "gate"
    gate.touch()
    proc = subprocess.Popen([*FACTORY, "run", str(spec_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "FACTORY_TEST_GATE": str(gate)})
    stats = tmp_path / "killed" / "stats"
    deadline = time.time() + 240
    while not (stats.exists() and len(list(stats.glob("*.json"))) >= 1):
        assert time.time() < deadline and proc.poll() is None, "the job never committed a shard"
        time.sleep(0.2)
    started = psutil.Process(proc.pid).children(recursive=True)  # the local Ray and its workers
    assert started, "the driver started no process"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    # Nothing the killed driver started outlives it (a local Ray's agents used to).
    gone, alive = psutil.wait_procs(started, timeout=30)
    assert not alive, [p.cmdline() for p in alive]
    assert len(list(stats.glob("*.json"))) == 1
    gate.unlink()
    # Whatever sits under a final name after the kill is a whole tar, never a partial one.
    for path in (tmp_path / "killed" / "shards").glob("*.tar"):
        with tarfile.open(path) as tar:
            tar.getmembers()

    resumed = run_cli("run", str(spec_path))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "1 already committed" in resumed.stderr

    assert tars(tmp_path / "killed") == tars(tmp_path / "reference")
    keys = [k for data in tars(tmp_path / "killed").values() for k in read_tar_bytes(data)]
    assert len(keys) == len(set(keys)) == 32
    assert not (tmp_path / "killed" / "_tmp").exists() or not any((tmp_path / "killed" / "_tmp").iterdir())

    status = run_cli("status", str(tmp_path / "killed"))
    assert "shards   8/8" in status.stdout and "samples  32 written" in status.stdout

    # The same output with another spec: refused on the command line, naming the way out.
    spec["seed"] = 99
    spec_path.write_text(yaml.safe_dump(spec))
    again = run_cli("run", str(spec_path))
    assert again.returncode == 1
    assert "already holds job 'e2e'" in again.stderr and "--output" in again.stderr


def read_tar_bytes(data: bytes):
    import io

    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {m.name.partition(".")[0] for m in tar.getmembers()}
