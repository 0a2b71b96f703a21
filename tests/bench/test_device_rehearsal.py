"""The device run script (bench/device/run.sh) rehearsed on the CPU, with the GPU machine's libraries.

The lent GPU machine runs Python 3.12 with its own torch, transformers and huggingface-hub and no Ray or
webdataset. This machine has Python 3.11: the rehearsal runs the script with this project's interpreter,
the machine's transformers 5.17 and huggingface-hub 1.33 ahead of the project's (installed by
`make .device-rehearsal/.installed`, versions in bench/device/machine-packages.txt), and Ray and
webdataset made unimportable. torch stays the project's, and the carried cp312 wheels are not installed
(the script says so for another Python). It runs in `--cpu` mode: tiny models, the same workloads.
"""

import json
import os
import subprocess
import sys

import pytest
from helpers import REPO

REHEARSAL = REPO / ".device-rehearsal"

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]


def test_the_device_run_script_leaves_every_workload_s_result_in_at_most_eight_files(tmp_path, model_cache):
    assert (REHEARSAL / ".installed").is_file(), "run `make .device-rehearsal/.installed` first (make test does)"
    absent = tmp_path / "absent"
    for name in ("ray", "webdataset"):
        (absent / name).mkdir(parents=True)
        (absent / name / "__init__.py").write_text("raise ImportError('not installed on the GPU machine')\n")
    out = tmp_path / "out"
    env = {
        **os.environ,
        "OUT": str(out),
        "PYTHON": sys.executable,
        "PYTHONPATH": os.pathsep.join([str(absent), str(REHEARSAL)]),
        "FACTORY_MODEL_CACHE": str(model_cache),
    }
    run = subprocess.run(
        ["bash", "bench/device/run.sh", "--cpu"], cwd=REPO, env=env, capture_output=True, text=True, timeout=840
    )
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]

    # What a device call brings back: at most 8 plain files, none in a folder.
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and all((out / f).is_file() for f in files), files
    [name] = [f for f in files if f.endswith(".json")]
    assert {"bench.log", "env.txt"} <= set(files)
    result = json.loads((out / name).read_text())
    assert result["gpu"]["transformers"] == "5.17.0"
    assert "huggingface_hub" in (out / "env.txt").read_text() and "1.33.0" in (out / "env.txt").read_text()

    # Every planned workload left a result (none failed, none was cut by the deadline), the recipes were
    # skipped for want of Ray, and the JSON is the one the run ended with.
    assert result["stopped"] is None and result["errors"] == [] and result["sizes"] == "tiny"
    done = {("stages", s["name"]) for s in result["stages"]}
    done |= {("fast_paths", s["name"]) for s in result["fast_paths"]}
    done |= {("training", t["kind"]) for t in result["training"]}
    planned = {(p["section"], p["name"]) for p in result["plan"]}
    assert planned == done and len(planned) == 9 + 2 + 2
    assert result["skipped"] == ["recipes (Ray is not installed here: they run through the engine, on Ray)"]
    assert all(s["images_per_s"] > 0 and s["failed_rows"] == 0 for s in result["stages"])
    assert result["seconds"] > 0 and name.startswith("cpu-")
