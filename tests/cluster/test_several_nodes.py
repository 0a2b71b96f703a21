"""Jobs on real multi-raylet Ray clusters on this machine (tests/support/several_nodes.py): each node its own
raylet and object store, GPU stages asking for a custom resource that stands in for a GPU."""

import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest
import yaml
from helpers import REPO, SUPPORT, folder_spec, write_folder_source

from factory.engine.driver import run_job
from factory.engine.spec import parse_spec

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

SHARDS = 12


def job(source: Path, out: Path, executor: str) -> dict:
    stage = {
        "kind": "stages_for_tests:InvertStage",
        "name": "invert",
        "params": {"variants": 2, "sleep": 0.15},
        # A GPU stage: on these clusters it may run only where the stand-in resource is.
        "resources": {"batch_size": 2, "num_gpus": 1, "num_cpus": 0.5, "concurrency": 2},
    }
    data = folder_spec(source, out, [stage], shard_size=2, shared_filesystem=True)
    data["engine"] = {"executor": executor, "retries": 2, "retry_backoff_s": 0.2}
    return data


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    src = tmp_path_factory.mktemp("nodes-src")
    write_folder_source(src, 2 * SHARDS, size=16)
    return src


def on_cluster(
    tmp_path: Path, data: dict, scenario: str, next_job: dict | None = None
) -> tuple[dict, dict[str, set[int]]]:
    """Run the scenario (and `next_job` on the same cluster after it, its report in tmp_path/next-report);
    returns its report and, per node id, the shards the jobs' stage work touched. Every worker saw its
    node's own model cache, not the driver's."""
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(data))
    nodes = tmp_path / "nodes"
    nodes.mkdir()
    after = []
    if next_job is not None:
        (tmp_path / "next.yaml").write_text(yaml.safe_dump(next_job))
        after = [str(tmp_path / "next.yaml"), str(tmp_path / "next-report")]
    # Its own Ray temp folder (short: socket paths have a length limit), removed after: the cluster's address
    # file must not outlive it where a later `ray.init()` would find it and connect to the dead cluster.
    # Token auth off, as the autoscaling head runs: the session's own `ray.init()` put RAY_AUTH_MODE=token
    # in this process's environment, and Ray reads the mode once, when a process first uses it.
    with tempfile.TemporaryDirectory(prefix="ray", ignore_cleanup_errors=True) as ray_tmp:
        proc = subprocess.run(
            [
                sys.executable,
                str(SUPPORT / "several_nodes.py"),
                str(spec),
                str(nodes),
                scenario,
                str(tmp_path / "report"),
                *after,
            ],
            capture_output=True,
            text=True,
            timeout=540,
            env={**os.environ, "PYTHONPATH": f"{SUPPORT}:{REPO}", "RAY_TMPDIR": ray_tmp, "RAY_AUTH_MODE": "disabled"},
        )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "report").read_text())
    work: dict[str, set[int]] = {}
    for mark in nodes.iterdir():
        assert mark.read_text() == "/models/of-the-nodes", "a worker was given the driver's model cache"
        node, shard = mark.name.rsplit(".", 1)
        work.setdefault(node, set()).add(int(shard))
    return report, work


def pixels(out: Path) -> dict[str, dict[str, bytes]]:
    """Each committed tar's members but the json (it holds the spec hash, and the specs differ in resources)."""
    found = {}
    for tar_path in sorted((out / "shards").glob("*.tar")):
        with tarfile.open(fileobj=io.BytesIO(tar_path.read_bytes())) as tar:
            found[tar_path.name] = {
                m.name: tar.extractfile(m).read() for m in tar.getmembers() if not m.name.endswith(".json")
            }
    return found


@pytest.fixture(scope="module")
def one_node(source, tmp_path_factory):
    """The same job in one process, with no cluster: what every shard must hold, byte for byte."""
    out = tmp_path_factory.mktemp("one-node") / "out"
    data = job(source, out, "in_process")
    del data["stages"][0]["resources"]["num_gpus"]
    assert run_job(parse_spec(data))["complete"]
    return pixels(out)


@pytest.fixture(scope="module")
def lost_node_then_poison(source, tmp_path_factory):
    """One cluster (a head and two stand-in GPU nodes) for two jobs: the first loses a worker node mid-job
    and gains a new one; then, on the cluster as that left it, a job with a poison and a hung shard."""
    tmp_path = tmp_path_factory.mktemp("lost-node")
    poisoned = job(source, tmp_path / "poisoned", "ray_data")
    poisoned["stages"][0]["params"].update(segfault_ids=["s-002"], hang_ids=["s-005"])  # shards 1 and 2
    poisoned["engine"].update(shard_timeout_s=5, retries=1)  # two tries each: the cause is told as with three
    report, work = on_cluster(tmp_path, job(source, tmp_path / "out", "ray_data"), "lose_and_gain", poisoned)
    return tmp_path, report, json.loads((tmp_path / "next-report").read_text()), work


def test_a_lost_node_and_a_joining_one_leave_every_shard_committed_once_as_on_one_node(lost_node_then_poison, one_node):
    tmp_path, report, _, work = lost_node_then_poison
    out = tmp_path / "out"
    assert report.get("index", {}).get("complete"), report
    assert report["index"]["committed"] == SHARDS and report["index"]["samples"] == 4 * SHARDS
    assert report["lost_shards"], "the lost node held no work when it was killed"
    assert work.get(report["added"]), "the node that joined took no work"
    assert report["head"] not in work, "a stage pinned to the stand-in GPU nodes ran on the head"
    # One committed tar per shard, byte-identical to one node's, and nothing partial left behind.
    assert pixels(out) == one_node
    assert not list(out.rglob("*.tar.*")) and not list((out / "_tmp").glob("*.tar"))


def test_a_node_that_joins_never_writes_a_node_local_output(source, one_node, tmp_path):
    # Ray tasks: scheduled shard by shard, they would take the new node (an actor pool, already placed, would not).
    executor = "ray_tasks"
    out = tmp_path / "out"
    data = job(source, out, executor)
    data["output"]["shared_filesystem"] = False
    del data["stages"][0]["resources"]["num_gpus"]
    report, work = on_cluster(tmp_path, data, "late_node")
    assert report.get("index", {}).get("complete"), report
    assert "added" in report and set(work) == {report["head"]}, (report, work)
    assert pixels(out) == one_node


def test_a_cluster_that_scales_from_zero_gpu_nodes_runs_the_job_on_the_nodes_it_adds(source, one_node, tmp_path):
    out = tmp_path / "out"
    data = job(source, out, "ray_data")
    data["engine"]["resource_wait_s"] = 240
    report, work = on_cluster(tmp_path, data, "from_zero")
    assert report["nodes_at_start"] == 1 and report["nodes_at_end"] > 1, report
    assert report.get("index", {}).get("complete"), report
    assert work and report["head"] not in work, (report, work)
    assert pixels(out) == one_node


def test_a_poison_and_a_hung_shard_fail_alone_naming_their_ray_node(lost_node_then_poison, one_node):
    tmp_path, report, poisoned, work = lost_node_then_poison
    told = poisoned.get("error", "")
    assert told.startswith(f"JobIncomplete: 2 of {SHARDS} shards failed and stay uncommitted"), poisoned
    assert "shard 1 at stage invert: the worker running step invert on node " in told and "Ray node " in told
    # The worker ran on another node than the driver's: its log is read through Ray's state API.
    assert "tries: Segmentation fault in ctypes/__init__.py:" in told and "stages_for_tests.py:" in told
    assert "timeout: step invert ran past 5s" in told
    assert report["head"] not in work  # neither job's stage work ran on the head
    expected = {k: v for k, v in one_node.items() if k not in ("shard-000001.tar", "shard-000002.tar")}
    assert pixels(tmp_path / "poisoned") == expected
