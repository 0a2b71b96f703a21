import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
sys.path.insert(0, str(REPO / "tests"))
# Ray workers import the test stages by module name: make the tests folder importable for them too.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "tests"), str(REPO), os.environ.get("PYTHONPATH")]))


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory):
    """One node-local model cache for the whole session, so tiny models are built once."""
    path = tmp_path_factory.mktemp("model-cache")
    os.environ["FACTORY_MODEL_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def ray_local(model_cache):
    """A local Ray with 2 CPUs, shared by the tests that run pipelines in-process."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"FACTORY_MODEL_CACHE": str(model_cache)}})
    yield ray
    ray.shutdown()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 server (SeaweedFS) on loopback; yields (endpoint_url, storage_options) with a `test` bucket."""
    import shutil
    import subprocess
    import time

    import s3fs

    weed = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    data = tmp_path_factory.mktemp("seaweedfs")
    # weed derives gRPC ports as port + 10000: keep every port below 55535.
    ports = {}
    while len(set(ports.values())) < 4 or max(ports.values()) >= 55535:
        ports = {name: _free_port() for name in ("master", "volume", "filer", "s3")}
    proc = subprocess.Popen(
        [
            weed, "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={ports['master']}", f"-volume.port={ports['volume']}",
            f"-filer.port={ports['filer']}", "-s3", f"-s3.port={ports['s3']}",
        ],
        stdout=open(data / "weed.log", "wb"),
        stderr=subprocess.STDOUT,
    )
    endpoint = f"http://127.0.0.1:{ports['s3']}"
    options = {"key": "factory", "secret": "factory", "client_kwargs": {"endpoint_url": endpoint}}
    fs = s3fs.S3FileSystem(**options)
    deadline = time.time() + 60
    while True:
        try:
            fs.mkdir("test")
            break
        except Exception:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError(f"SeaweedFS did not start; see {data / 'weed.log'}")
            time.sleep(0.5)
    yield endpoint, options
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
