"""Model weights in an object store are fetched once per node, not once per actor, and reused by later jobs.

The tiny ControlNet pipeline is uploaded to a real S3 server (SeaweedFS on loopback); a job whose stage
names it by `s3://` URL runs with two actors that load it at the same moment. Each fill of a cache entry
appends one line to `<entry>.log`, which is what the tests count.
"""

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import s3fs
from helpers import folder_spec, load_json, read_tar, write_folder_source

from factory.engine.driver import run_job
from factory.engine.spec import parse_spec
from factory.models.tiny_diffusion import tiny_controlnet_pipeline_dir

pytestmark = pytest.mark.timeout(600)


def upload_tiny_pipeline(options: dict) -> str:
    """Copy the tiny pipeline's files to a fresh prefix of the test bucket; returns its s3:// URL."""
    tiny = Path(tiny_controlnet_pipeline_dir())
    fs = s3fs.S3FileSystem(**options)
    prefix = f"test/models-{uuid.uuid4().hex[:8]}/sd-tiny"
    for f in tiny.rglob("*"):
        if f.is_file() and f.name != ".factory-complete":
            fs.put_file(str(f), f"{prefix}/{f.relative_to(tiny)}")
    return f"s3://{prefix}"


def cache_entries(cache: Path) -> set[str]:
    return {p.name for p in cache.iterdir() if p.is_dir() and p.name != "tiny"}


def fills(cache: Path, entry: str) -> list[str]:
    log = cache / f"{entry}.log"
    return log.read_text().splitlines() if log.exists() else []


@pytest.mark.e2e
def test_a_job_fetches_each_model_once_per_node_and_the_next_job_reuses_it(ray_local, s3_server, model_cache, tmp_path):
    _, options = s3_server
    url = upload_tiny_pipeline(options)
    write_folder_source(tmp_path / "src", 4)
    stage = {
        "kind": "controlnet",
        "model": {"profile": "pretrained", "base": url, "controlnet": f"{url}/controlnet", "storage_options": options},
        "params": {"variants": 1, "steps": 2, "resolution": 32},
        # Two actors on one node load the model at the same time: only one of them may fetch it.
        "resources": {"num_cpus": 0.5, "batch_size": 1, "concurrency": 2},
    }
    before = cache_entries(model_cache)

    first = run_job(parse_spec(folder_spec(tmp_path / "src", tmp_path / "out1", [stage], shard_size=2)))
    assert first["complete"] and first["samples"] == 4 and first["failed"] == 0
    new = cache_entries(model_cache) - before
    assert len(new) == 2  # one entry per URL: the base pipeline and the controlnet
    markers = {}
    for entry in new:
        assert len(fills(model_cache, entry)) == 1, f"{entry} was fetched more than once"
        marker = model_cache / entry / ".factory-complete"
        markers[entry] = marker.stat().st_mtime_ns
    stats = load_json(tmp_path / "out1" / "stats" / "shard-000000.json")
    assert stats["models"]["controlnet"] == {"base": url, "controlnet": f"{url}/controlnet"}

    # The weights in the bucket change; the node's copy is what the next job loads, untouched.
    fs = s3fs.S3FileSystem(**options)
    fs.pipe_file(f"{url[len('s3://') :]}/unrelated.txt", b"added after the first job")

    second = run_job(parse_spec(folder_spec(tmp_path / "src", tmp_path / "out2", [stage], shard_size=2)))
    assert second["complete"] and second["samples"] == 4
    assert cache_entries(model_cache) - before == new
    for entry in new:
        assert len(fills(model_cache, entry)) == 1
        assert (model_cache / entry / ".factory-complete").stat().st_mtime_ns == markers[entry]
        assert not (model_cache / entry / "unrelated.txt").exists()
    # Same weights, same seeds: the second job's images are the first's, byte for byte.
    assert read_tar(tmp_path / "out1" / "shards" / "shard-000001.tar") == read_tar(
        tmp_path / "out2" / "shards" / "shard-000001.tar"
    )


RESOLVE = """
import json, sys, time
from pathlib import Path
from factory.models.loading import resolve_model_path
ready, go, url, options = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4])
ready.touch()
while not go.exists():
    time.sleep(0.01)
print(resolve_model_path(url, options))
"""


@pytest.mark.e2e
def test_processes_racing_for_one_url_fetch_it_once(s3_server, model_cache, tmp_path):
    """The lock that makes it once per node is an fcntl lock between processes: Ray actors are processes."""
    _, options = s3_server
    url = upload_tiny_pipeline(options)
    cache = tmp_path / "node-cache"
    env = {**os.environ, "FACTORY_MODEL_CACHE": str(cache)}
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RESOLVE, str(tmp_path / f"ready-{i}"), str(go), url, json.dumps(options)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(3)
    ]
    # Release all three at once, after each has imported everything and is waiting.
    deadline = time.time() + 120
    while not all((tmp_path / f"ready-{i}").exists() for i in range(3)):
        assert time.time() < deadline and all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        time.sleep(0.05)
    go.touch()
    outputs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    paths = {out.strip() for out, _ in outputs}
    assert len(paths) == 1
    entry = Path(paths.pop())
    assert entry.parent == cache and len(fills(cache, entry.name)) == 1
    tiny = Path(tiny_controlnet_pipeline_dir())
    for f in tiny.rglob("*"):
        if f.is_file() and f.name != ".factory-complete":
            assert (entry / f.relative_to(tiny)).read_bytes() == f.read_bytes()
