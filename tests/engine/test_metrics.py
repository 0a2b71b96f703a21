"""The factory's metrics (factory/engine/metrics.py) as Prometheus scrapes them: a local Ray started with
its metrics export port runs a job (tests/support/metrics_job.py), and the real /metrics endpoint holds
each factory series with the job's own counts. The Grafana dashboard queries only series that exist."""

import json
import os
import re
import subprocess
import sys

import pytest
import yaml
from helpers import REPO, SUPPORT, folder_spec, write_folder_source

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

EXPORTED = {
    "ray_factory_samples_total",
    "ray_factory_failures_total",
    "ray_factory_shard_seconds",
    "ray_factory_batch_seconds",
    "ray_factory_rows_waiting",
    "ray_factory_gpu_memory_bytes",
}


def test_a_jobs_metrics_reach_prometheus_with_its_counts(tmp_path):
    write_folder_source(tmp_path / "src", 8, size=16)
    stage = {
        "kind": "stages_for_tests:InvertStage",
        "name": "invert",
        "params": {"variants": 2, "bad_ids": ["s-001"], "reject_ids": ["s-002"]},
        "resources": {"batch_size": 2},
    }
    spec = folder_spec(tmp_path / "src", tmp_path / "out", [stage], shard_size=4)
    spec["name"] = "metrics-e2e"
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    # The suite turns Ray's metrics collection off (tests/conftest.py); this Ray collects them.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SUPPORT), str(REPO)]), "RAY_enable_metrics_collection": "1"}
    done = subprocess.run(
        [sys.executable, str(SUPPORT / "metrics_job.py"), str(tmp_path / "job.yaml"), str(tmp_path / "report")],
        capture_output=True,
        text=True,
        env=env,
        timeout=280,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "report").read_text())
    index, series = report["index"], report["series"]
    assert (index["samples"], index["failed"], index["rejected"]) == (12, 2, 2)

    def value(name: str, **labels: str) -> float:
        key = name + "{" + ",".join(f"{k}={v}" for k, v in sorted({"job": "metrics-e2e", **labels}.items())) + "}"
        return series.get(key, 0.0)

    for outcome, n in (("written", 12), ("failed", 2), ("rejected", 2)):
        assert value("ray_factory_samples_total", stage="write", outcome=outcome) == n, series
    for outcome, n in (("kept", 12), ("failed", 2), ("rejected", 2)):
        assert value("ray_factory_samples_total", stage="invert", outcome=outcome) == n, series
    # s-001 fails (bad input) and s-002's variants are rejected, two rows each.
    assert value("ray_factory_failures_total", reason="invert:uninvertible") == 2
    assert value("ray_factory_failures_total", reason="invert:too_dark") == 2
    assert value("ray_factory_shard_seconds_count") == 2 and value("ray_factory_shard_seconds_sum") > 0
    assert value("ray_factory_batch_seconds_count", stage="invert") >= 4  # 8 sources in batches of 2
    assert value("ray_factory_rows_waiting", stage="invert") == 0  # every source taken in


def test_the_grafana_dashboard_queries_only_series_the_factory_exports():
    dashboard = json.loads((REPO / "cluster" / "grafana-factory.json").read_text())
    queries = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    assert queries
    used = {re.sub(r"_(bucket|count|sum)$", "", name) for q in queries for name in re.findall(r"ray_factory_\w+", q)}
    assert used == EXPORTED, used ^ EXPORTED
