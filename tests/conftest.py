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


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 server (SeaweedFS) on loopback; yields (endpoint_url, storage_options) with a `test` bucket."""
    import seaweed

    ports = seaweed.free_ports()
    proc = seaweed.start(tmp_path_factory.mktemp("seaweedfs"), ports)
    yield seaweed.endpoint(ports), seaweed.options(ports)
    seaweed.stop(proc)
