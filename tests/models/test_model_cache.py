"""Model weights in an object store are pinned by their ETags, fetched once per node (not once per actor),
reused by later jobs with the same weights, and a resume with other weights is refused.

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
from factory.engine.errors import ResumeError
from factory.engine.spec import parse_spec
from factory.models.loading import resolve_model_path
from factory.models.tiny_diffusion import tiny_controlnet_pipeline_dir
from factory.models.weights import WeightsChanged, WeightsPin, loading_pinned

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
    return {p.name for p in cache.iterdir() if p.is_dir() and p.name not in ("tiny", "sha256")}


def fills(cache: Path, entry: str) -> list[str]:
    log = cache / f"{entry}.log"
    return log.read_text().splitlines() if log.exists() else []


@pytest.mark.e2e
def test_a_job_pins_its_weights_fetches_them_once_per_node_and_refuses_other_weights(
    ray_local, s3_server, model_cache, tmp_path
):
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
    spec = parse_spec(folder_spec(tmp_path / "src", tmp_path / "out1", [stage], shard_size=2))

    first = run_job(spec)
    assert first["complete"] and first["samples"] == 4 and first["failed"] == 0
    new = cache_entries(model_cache) - before
    assert len(new) == 2  # one entry per model: the base pipeline and the controlnet
    markers = {}
    for entry in new:
        assert len(fills(model_cache, entry)) == 1, f"{entry} was fetched more than once"
        markers[entry] = (model_cache / entry / ".factory-complete").stat().st_mtime_ns

    # Pinned by the store's ETags: every object in the manifest, the weight files in stats and samples.
    fs = s3fs.S3FileSystem(**options)
    prefix = url[len("s3://") :]
    etags = {p[len(prefix) + 1 :]: f"etag:{i['ETag'].strip(chr(34))}" for p, i in fs.find(prefix, detail=True).items()}
    pins = load_json(tmp_path / "out1" / "manifest.json")["weights"]["controlnet"]
    assert pins["base"]["files"] == etags and pins["base"]["revision"] is None
    weights = {f: e for f, e in etags.items() if f.startswith("controlnet/") and f.endswith(".safetensors")}
    assert len(weights) == 1
    stats = load_json(tmp_path / "out1" / "stats" / "shard-000000.json")
    assert stats["models"]["controlnet"] == {"base": url, "controlnet": f"{url}/controlnet"}
    assert stats["weights"]["controlnet"]["controlnet"]["files"] == {
        f[len("controlnet/") :]: e for f, e in weights.items()
    }
    for files in read_tar(tmp_path / "out1" / "shards" / "shard-000000.tar").values():
        assert json.loads(files["json"])["weights"] == stats["weights"]

    # The next job with the same weights loads the node's copies, untouched.
    second = run_job(parse_spec(folder_spec(tmp_path / "src", tmp_path / "out2", [stage], shard_size=2)))
    assert second["complete"] and second["samples"] == 4
    assert cache_entries(model_cache) - before == new
    for entry in new:
        assert len(fills(model_cache, entry)) == 1
        assert (model_cache / entry / ".factory-complete").stat().st_mtime_ns == markers[entry]
    # Same weights, same seeds: the second job's images are the first's, byte for byte.
    assert read_tar(tmp_path / "out1" / "shards" / "shard-000001.tar") == read_tar(
        tmp_path / "out2" / "shards" / "shard-000001.tar"
    )

    # The controlnet's weights change in the bucket: the resume is refused, naming the first model that holds
    # them (the base pipeline's folder holds the controlnet's) and the file,
    (weights_file,) = weights
    fs.pipe_file(f"{prefix}/{weights_file}", fs.cat_file(f"{prefix}/{weights_file}") + b"fine-tuned")
    with pytest.raises(ResumeError, match=rf"model base of stage controlnet .*: {weights_file}: pinned etag"):
        run_job(spec)
    # and a node without a copy cannot fetch the old pin: the object's MD5 is not the pinned ETag.
    pinned = WeightsPin.from_json(pins["controlnet"])
    os.environ["FACTORY_MODEL_CACHE"] = str(tmp_path / "fresh-node")
    try:
        with loading_pinned([pinned]), pytest.raises(WeightsChanged, match="changed since the job was planned"):
            resolve_model_path(f"{url}/controlnet", options)
    finally:
        os.environ["FACTORY_MODEL_CACHE"] = str(model_cache)


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
