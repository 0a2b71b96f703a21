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
    assert result["seconds"] > 0 and name.startswith("cpu-")
    kinds = ("controlnet", "mask2img", "text2mask", "caption", "dense_caption", "select", "maskgen", "t2i", "score")
    assert sorted(s["kind"] for s in result["stages"]) == sorted(kinds)
    for s in result["stages"]:
        assert s["images_per_s"] > 0 and s["failed_rows"] == 0, s["name"]
        assert s["tflop_per_image"] > 0, s["name"]  # counted by FlopCounterMode, never typed in
        assert s["mfu"] is None and s["peak_memory_gib"] is None  # no GPU: no peak to divide by, no CUDA memory
        assert s["weights_gib"] > 0, s["name"]  # planned from the modules: parameters and buffers
    controlnet = next(s for s in result["stages"] if s["kind"] == "controlnet")
    assert controlnet["images_per_call"] == controlnet["batch_sources"] * controlnet["rows_per_source"]
    assert [f["name"] for f in result["fast_paths"]] == ["controlnet+channels_last", "controlnet+vae_batch_2"]
    assert all(f["tflop_per_image"] == controlnet["tflop_per_image"] for f in result["fast_paths"])
    assert {t["kind"] for t in result["training"]} == {"mask2img", "text2mask"}
    assert all(t["samples_per_s"] > 0 and t["tflop_per_step"] > 0 for t in result["training"])
    assert "controlnet-sd15-512" in (out / "bench.log").read_text()
