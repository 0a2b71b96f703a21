"""The `rows` part of bench/bench_scale.py (bench/bench_cluster.py): a stage hop holds fewer copies of a
shard row with the out-of-band buffers the engine uses than with the pickled bytes it used before, and each
stage actor of a running job reports its peak memory per shard (a small job: its figures are in
docs/benchmarks.md from the full-size run)."""

import json
import os
import subprocess
import sys

import pytest
from helpers import REPO

pytestmark = pytest.mark.e2e


def test_a_hop_holds_a_row_fewer_times_with_out_of_band_buffers():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "bench"), str(REPO)])}
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "bench_cluster.py"), "rows", "2", "10", "64"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    # The stage's own new images (3/4 of a row) and the row it writes are in both; the bytes way adds a
    # copy of the row read and one of the pickle written.
    assert rows["rows_held_buffers"] < 2.6 and rows["rows_held_bytes"] - rows["rows_held_buffers"] > 0.8, rows
    job = rows["in_a_job"]
    for stage in ("expand", "pass"):
        assert job[f"peak_private_mib_{stage}"]["shards"] == 2 and job[f"peak_private_mib_{stage}"]["max"] > 0, job
