import os
import sys
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import pytest

TESTS = Path(__file__).resolve().parent
SUPPORT = TESTS / "support"
sys.path.insert(0, str(SUPPORT))
# Ray workers unpickle what tests hand them (plug-in stages, readers defined in a test module) by module
# name, as pytest imported them: the support folder and every test folder are importable there too.
os.environ["PYTHONPATH"] = os.pathsep.join(
    filter(
        None,
        [
            str(SUPPORT),
            *sorted(str(d) for d in TESTS.iterdir() if d.is_dir() and any(d.glob("test_*.py"))),
            str(TESTS.parent),
            os.environ.get("PYTHONPATH"),
        ],
    )
)

# Under pytest-xdist (`make test` and `make test-fast` run the unit tier on every core and the tiers with
# Ray in two processes), each worker takes its share of the cores: with torch's default of a thread per
# core in every worker, the unit tier ran slower on 2 cores with 2 workers (108 s) than in one process
# (69 s); with a thread each, 44 s. Set before anything imports torch, which reads it once.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _workers > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _workers)))

import tiers  # noqa: E402  (needs the support folder on the path)

# Every local Ray the tests start (some thirty: the shared one, each `factory run` subprocess, the
# benchmark's) skips its metrics agent, a second of start-up each; only tests/engine/test_metrics.py reads
# them, from a Ray that turns collection back on.
os.environ.setdefault("RAY_enable_metrics_collection", "0")


def pytest_configure(config):
    tiers.install()


def pytest_collection_modifyitems(config, items):
    for item in items:
        item.add_marker(tiers.tier_of(item))
    tiers.order(items)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    with tiers.running(item):
        return (yield)


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory):
    """One node-local model cache for the whole session, so tiny models are built once."""
    path = tmp_path_factory.mktemp("model-cache")
    os.environ["FACTORY_MODEL_CACHE"] = str(path)
    return path


@contextmanager
def dashboard_agent_on_a_free_port():
    """`ray.init` gives a local Ray's dashboard agent the fixed port 52365 (it has no argument for it).
    While the shared Ray holds that port, every other local Ray the tests start (each `factory run`
    subprocess, the clusters' heads) has its agent retry the bind six times with backoff and give up:
    3.4 s of waiting at every start, measured. Ray's own parameters take None as "any free port" (what
    `ray.cluster_utils.Cluster` gives its worker nodes); the shared Ray is started with that."""
    from ray._private import parameter

    init = parameter.RayParams.__init__

    def free_agent_port(self, *args, **kwargs):
        kwargs.setdefault("dashboard_agent_listen_port", None)
        init(self, *args, **kwargs)

    with mock.patch.object(parameter.RayParams, "__init__", free_agent_port):
        yield


@pytest.fixture(scope="session")
def ray_local(model_cache):
    """A local Ray with 2 CPUs, shared by every test that runs pipelines in-process. Its workers' output
    stays in its session's log files (/tmp/ray/session_*/logs): streamed to this process, Ray prints it
    seconds late, into whichever test runs then (a test of an error's one line got a line of the module
    before)."""
    import ray

    with tiers.infrastructure("the shared local Ray"), dashboard_agent_on_a_free_port():
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": {"FACTORY_MODEL_CACHE": str(model_cache)}},
        )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 server (SeaweedFS) on loopback; yields (endpoint_url, storage_options) with a `test` bucket."""
    import seaweed

    ports = seaweed.free_ports()
    with tiers.infrastructure("the shared S3 server"):
        proc = seaweed.start(tmp_path_factory.mktemp("seaweedfs"), ports)
    yield seaweed.endpoint(ports), seaweed.options(ports)
    seaweed.stop(proc)
