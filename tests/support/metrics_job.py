"""A job on a local Ray whose metrics agent exports on a port, then that port's /metrics scraped, for
tests/engine/test_metrics.py.

    python metrics_job.py SPEC.yaml REPORT.json

REPORT.json gets the job's index and, per factory series (name and its labels but Ray's per-process
ones), the value summed over the processes that recorded it, as a Prometheus `sum by` would.
"""

from __future__ import annotations

import json
import re
import socket
import sys
import time
import urllib.request
from pathlib import Path

import ray
import yaml
from ray.util.metrics import Gauge

from factory.engine.driver import run_job
from factory.engine.spec import parse_spec

# Labels Ray adds to every series of a process; a query sums over them.
RAY_LABELS = {"Component", "NodeAddress", "SessionName", "Version", "WorkerId"}
SERIES = re.compile(r"^(ray_factory_\w+)\{(.*)\} (\S+)$")
LABEL = re.compile(r'(\w+)="([^"]*)"')


def series(text: str) -> dict[str, float]:
    summed: dict[str, float] = {}
    for line in text.splitlines():
        match = SERIES.match(line)
        if match:
            name, labels, value = match.groups()
            kept = sorted((k, v) for k, v in LABEL.findall(labels) if k not in RAY_LABELS and not k.startswith("otel_"))
            key = name + "{" + ",".join(f"{k}={v}" for k, v in kept) + "}"
            summed[key] = summed.get(key, 0.0) + float(value)
    return summed


def main(spec_path: str, report: str) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Reported every half second instead of Ray's 10 s, so the test need not wait.
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        _metrics_export_port=port,
        _system_config={"metrics_report_interval_ms": 500},
    )
    spec = parse_spec(yaml.safe_load(Path(spec_path).read_text()))
    index = run_job(spec)
    # The driver sets its gauges (rows waiting) last, as the job ends; Ray exports a process's metrics
    # together, so a scrape that shows this one, set after the job returned, holds the driver's final values.
    Gauge("factory_test_job_returned", "set once run_job returned").set(1)
    found: dict[str, float] = {}
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            found = series(urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode())
        except OSError:  # the node's metrics agent may still be starting
            time.sleep(0.5)
            continue
        written = found.get(f"ray_factory_samples_total{{job={spec.name},outcome=written,stage=write}}", 0)
        if written == index["samples"] and "ray_factory_test_job_returned{}" in found:
            break
        time.sleep(0.5)
    Path(report).write_text(json.dumps({"index": index, "series": found}))
    ray.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
