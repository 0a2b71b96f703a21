"""Jobs on real multi-raylet Ray clusters on this machine (tests/support/several_nodes.py): each node its own
raylet and object store, GPU stages asking for a custom resource that stands in for a GPU."""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml
from helpers import REPO, SUPPORT, folder_spec, write_folder_source

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


def on_cluster(tmp_path: Path, data: dict, scenario: str) -> tuple[dict, dict[str, set[int]]]:
    """Run the scenario; returns its report and, per node id, the shards its stage work touched."""
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(data))
    nodes = tmp_path / "nodes"
    nodes.mkdir()
    proc = subprocess.run(
        [sys.executable, str(SUPPORT / "several_nodes.py"), str(spec), str(nodes), scenario, str(tmp_path / "report")],
        capture_output=True,
        text=True,
        timeout=540,
        # Its own Ray temp folder (short: socket paths have a length limit): the cluster's address file
        # must not outlive it where a later `ray.init()` would find it and connect to the dead cluster.
        env={**os.environ, "PYTHONPATH": f"{SUPPORT}:{REPO}", "RAY_TMPDIR": tempfile.mkdtemp(prefix="ray")},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "report").read_text())
    work: dict[str, set[int]] = {}
    for mark in nodes.iterdir():
        node, shard = mark.name.rsplit(".", 1)
        work.setdefault(node, set()).add(int(shard))
    return report, work


def test_a_gpu_stage_on_a_cluster_without_gpu_nodes_is_refused_before_it_starts(source, tmp_path):
    out = tmp_path / "out"
    report, work = on_cluster(tmp_path, job(source, out, "ray_data"), "no_gpu_node")
    assert "stages[0].resources.num_gpus" in report["error"] and "GPU" in report["error"], report
    assert not work and not (out / "shards").exists()
