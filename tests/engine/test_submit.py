"""`factory submit / logs / status` against a real Ray cluster that the test starts with `ray start --head`,
and what `factory submit` says when it cannot reach one.

The cluster is this test's own: its own ports, its own temp dir (so `ray.init()` elsewhere on the machine
never finds it through /tmp/ray/ray_current_cluster) and its own auth token. It is stopped by signalling
the `ray start --block` process the fixture started, never by `ray stop`, which would stop every Ray
on the machine. The CLI runs as a subprocess, the way a user runs it.
"""

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from helpers import folder_spec, write_folder_source

from factory import cli
from factory.engine.spec import parse_spec
from factory.engine.submit import submission_id

pytestmark = pytest.mark.timeout(600)

INVERT = "stages_for_tests:InvertStage"
# The test server checks no signatures: any secret is accepted, and this one is easy to search for.
NODE_SECRET = f"node-secret-{secrets.token_hex(8)}"
VENV_BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ports(n: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < n:
        p = _free_port()
        if p not in ports:
            ports.append(p)
    return ports


@pytest.fixture(scope="module")
def ray_cluster(model_cache):
    """(dashboard address, env for CLI calls, its temp dir) of a one-node cluster with 2 CPUs and token auth."""
    # Ray's unix socket paths live under the temp dir and must stay under ~107 bytes: keep it short.
    temp_dir = tempfile.mkdtemp(prefix="fray-", dir="/tmp")
    gcs, dashboard, client_server, agent = _ports(4)
    env = dict(os.environ)
    # Ray runs from the project's venv, which is not on PATH: a venv used without being activated. The job's
    # driver must still run on Ray's interpreter, not on whatever `python` PATH names (without `factory`).
    # Workers inherit the model cache and PYTHONPATH (conftest puts tests/support/ on it, for the plug-in stage).
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if Path(p) != VENV_BIN)
    env["FACTORY_MODEL_CACHE"] = str(model_cache)
    env["RAY_AUTH_MODE"] = "token"
    env["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    env.pop("RAY_ADDRESS", None)
    # The nodes' own credentials for the object store, as a Kubernetes Secret or `ray start`'s environment
    # gives them: a spec names them as env:FACTORY_TEST_S3_KEY / env:FACTORY_TEST_S3_SECRET.
    env["FACTORY_TEST_S3_KEY"] = "factory"
    env["FACTORY_TEST_S3_SECRET"] = NODE_SECRET
    log = open(Path(temp_dir) / "ray-start.log", "wb")
    proc = subprocess.Popen(
        [
            str(VENV_BIN / "ray"),
            "start",
            "--head",
            "--block",
            "--disable-usage-stats",
            f"--port={gcs}",
            f"--dashboard-port={dashboard}",
            "--dashboard-host=127.0.0.1",
            f"--ray-client-server-port={client_server}",
            f"--dashboard-agent-listen-port={agent}",
            "--num-cpus=2",
            "--num-gpus=0",
            "--include-dashboard=true",
            f"--temp-dir={temp_dir}",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.time() + 180
        # Ask through a subprocess: Ray caches the auth mode and token per process, and this pytest
        # process must stay free of them for the tests that start their own local Ray.
        while _list_jobs(address, env, check=False).returncode != 0:
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(
                    f"the Ray head did not come up: {(Path(temp_dir) / 'ray-start.log').read_text()[-3000:]}"
                )
            time.sleep(2)
        yield address, env, Path(temp_dir)
    finally:
        # `ray start --block` shuts down every process of its node on SIGTERM: within 2 s when idle, but
        # past 15 s once jobs have run here. After 2 s whatever is left in the process group it leads
        # (its own session, started above) is killed; the cluster's data is thrown away anyway.
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(2)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(10)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def factory(env: dict, *args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "factory.cli", *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def _list_jobs(address: str, env: dict, check: bool = True) -> subprocess.CompletedProcess:
    """The cluster's job records (entrypoint, runtime_env, metadata, status) as JSON, read as the CLI reads them."""
    return subprocess.run(
        [
            sys.executable,
            "-c",
            "import json, sys\nfrom ray.job_submission import JobSubmissionClient\n"
            "print(json.dumps([j.dict() for j in JobSubmissionClient(sys.argv[1]).list_jobs()], default=str))",
            address,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=check,
    )


def jobs_named(address: str, env: dict, prefix: str) -> dict[str, str]:
    """submission id -> status of the cluster's jobs whose id starts with `prefix`."""
    records = json.loads(_list_jobs(address, env).stdout)
    return {j["submission_id"]: j["status"] for j in records if (j["submission_id"] or "").startswith(prefix)}


@pytest.mark.e2e
def test_submit_once_follow_logs_and_resume(ray_cluster, tmp_path):
    address, env, _ = ray_cluster
    write_folder_source(tmp_path / "src", 6)
    # Relative paths, as a user writes them: submit resolves them against its working directory.
    spec_data = folder_spec(Path("src"), Path("out"), [{"kind": INVERT, "params": {"variants": 2}}], shard_size=4)
    spec_data["name"] = "cluster-e2e"
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec_data))
    expected = parse_spec(
        folder_spec(tmp_path / "src", tmp_path / "out", spec_data["stages"], shard_size=4) | {"name": "cluster-e2e"}
    )
    sid = submission_id(expected)
    assert sid.startswith(f"cluster-e2e-{expected.content_hash()}-")

    first = factory(env, "submit", "job.yaml", "--address", address, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert f"submitted {sid} " in first.stdout

    # A second submit while the first is pending or running starts nothing.
    second = factory(env, "submit", "job.yaml", "--address", address, cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert f"job {sid} is already" in second.stdout
    assert list(jobs_named(address, env, "cluster-e2e")) == [sid]

    # --follow streams until the job ends and exits with the job's outcome.
    logs = factory(env, "logs", sid, "--address", address, "--follow", cwd=tmp_path, timeout=400)
    assert logs.returncode == 0, logs.stdout + logs.stderr
    assert "job cluster-e2e: 6 samples in 2 shards, 0 already committed, 2 to do" in logs.stdout
    assert logs.stdout.rstrip().endswith("[SUCCEEDED]")
    plain = factory(env, "logs", sid, "--address", address, cwd=tmp_path)
    assert plain.returncode == 0 and "2/2 shards, 12 samples" in plain.stdout

    status = factory(env, "status", str(tmp_path / "out"), cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    assert "shards   2/2" in status.stdout and "samples  12 written from 6 planned sources" in status.stdout

    # After success the same spec is not run again unless asked; --again resumes and skips done shards.
    third = factory(env, "submit", "job.yaml", "--address", address, cwd=tmp_path)
    assert f"job {sid} already succeeded" in third.stdout
    assert list(jobs_named(address, env, "cluster-e2e")) == [sid]
    shard = tmp_path / "out" / "shards" / "shard-000000.tar"
    stamp = shard.stat().st_mtime_ns
    again = factory(env, "submit", "job.yaml", "--address", address, "--again", "--wait", cwd=tmp_path, timeout=400)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"job {sid}-retry1: SUCCEEDED" in again.stdout
    retry_logs = factory(env, "logs", f"{sid}-retry1", "--address", address, cwd=tmp_path)
    assert "2 already committed, 0 to do" in retry_logs.stdout
    assert shard.stat().st_mtime_ns == stamp
    assert jobs_named(address, env, "cluster-e2e") == {sid: "SUCCEEDED", f"{sid}-retry1": "SUCCEEDED"}


@pytest.mark.e2e
def test_unknown_job_logs_fail_clearly(ray_cluster, tmp_path):
    address, env, _ = ray_cluster
    out = factory(env, "logs", "no-such-job", "--address", address, cwd=tmp_path)
    assert out.returncode == 1 and "no-such-job" in out.stderr


def test_an_unreachable_cluster_gets_ray_advice(tmp_path, capsys):
    write_folder_source(tmp_path / "src", 1)
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(folder_spec(tmp_path / "src", tmp_path / "out", [])))
    address = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    for args in (["submit", str(tmp_path / "job.yaml")], ["logs", "some-job"]):
        assert cli.main([*args, "--address", address]) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        assert err.startswith(f"factory: cannot reach the Ray Jobs API at {address}: ")
        assert "port 8265 is reachable" in err and "object storage" not in err


@pytest.mark.e2e
def test_a_wrong_token_gets_token_advice(ray_cluster, tmp_path):
    address, env, _ = ray_cluster
    out = factory(env | {"RAY_AUTH_TOKEN": "0" * 64}, "logs", "some-job", "--address", address, cwd=tmp_path)
    assert out.returncode == 1
    assert out.stderr.startswith(f"factory: the Ray cluster at {address} refused the request: "), out.stderr
    assert "RAY_AUTH_TOKEN" in out.stderr and "object storage" not in out.stderr


@pytest.mark.e2e
def test_a_spec_with_inline_credentials_is_refused_before_the_cluster_is_contacted(tmp_path):
    spec_data = folder_spec(tmp_path / "src", "s3://test/out", [], shard_size=4)
    spec_data["output"]["storage_options"] = {"key": "AKIA-INLINE", "secret": "inline-secret"}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec_data))
    write_folder_source(tmp_path / "src", 2)
    done = factory(dict(os.environ), "submit", "job.yaml", "--address", "http://127.0.0.1:9", cwd=tmp_path)
    assert done.returncode == 1
    told = done.stderr.strip().splitlines()[-1]
    assert told.startswith("factory: the spec holds credentials inline (output.storage_options.key, ")
    assert "env:NAME" in told and "127.0.0.1:9" not in told  # refused before any address was tried


@pytest.mark.e2e
def test_a_failed_job_is_retried_under_the_next_id_and_no_file_holds_its_credentials(ray_cluster, s3_server, tmp_path):
    """The job's output credentials are named as env: (the nodes' own): neither its failed attempt nor the
    retry leaves them in a file of the cluster (logs, the job's unpacked package, spilled objects), in its
    job records or in the output."""
    import s3fs

    address, env, temp_dir = ray_cluster
    endpoint, options = s3_server
    # The source folder does not exist yet: the driver fails before any worker starts.
    spec_data = folder_spec(tmp_path / "src", "s3://test/env-secrets", [{"kind": INVERT}], shard_size=2)
    spec_data["name"] = "cluster-retry"
    spec_data["output"]["endpoint_url"] = endpoint
    spec_data["output"]["storage_options"] = {"key": "env:FACTORY_TEST_S3_KEY", "secret": "env:FACTORY_TEST_S3_SECRET"}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec_data))
    sid = submission_id(parse_spec(spec_data))

    failed = factory(env, "submit", "job.yaml", "--address", address, "--wait", cwd=tmp_path, timeout=300)
    assert failed.returncode == 1 and f"job {sid}: FAILED" in failed.stdout
    logs = factory(env, "logs", sid, "--address", address, cwd=tmp_path)
    assert str(tmp_path / "src") in logs.stdout and logs.stdout.rstrip().endswith("[FAILED]")

    # Fix the cause and submit the same spec: the failed attempt is kept, the new one gets `-retry1`.
    write_folder_source(tmp_path / "src", 4)
    retried = factory(env, "submit", "job.yaml", "--address", address, "--wait", cwd=tmp_path, timeout=400)
    assert retried.returncode == 0, retried.stdout + retried.stderr
    assert f"job {sid}-retry1: SUCCEEDED" in retried.stdout
    assert jobs_named(address, env, "cluster-retry") == {sid: "FAILED", f"{sid}-retry1": "SUCCEEDED"}
    fs = s3fs.S3FileSystem(**options)
    assert len(fs.find("test/env-secrets/shards")) == 2

    # Nothing the cluster wrote (logs, the job's unpacked package, spilled objects) nor its job record holds it.
    for path in temp_dir.rglob("*"):
        if path.is_file() and not path.is_symlink():
            assert NODE_SECRET.encode() not in path.read_bytes(), path
    # The job's records in the cluster's GCS.
    records = _list_jobs(address, env).stdout
    assert f'"{sid}-retry1"' in records and NODE_SECRET not in records
    for path in fs.find("test/env-secrets"):
        assert NODE_SECRET.encode() not in fs.cat(path), path
