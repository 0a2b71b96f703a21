"""bench/bench_gpu.py at tiny sizes on the CPU: the same code a GPU runs, every section, one JSON."""

import json
import os
import subprocess
import sys

import pytest
from helpers import REPO


pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]


def test_tiny_benchmark_writes_every_section(tmp_path, model_cache):
    env = {**os.environ, "FACTORY_MODEL_CACHE": str(model_cache), "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    run = subprocess.run([sys.executable, str(REPO / "bench" / "bench_gpu.py"), "--tiny", "--out", str(tmp_path)],
                         env=env, capture_output=True, text=True, timeout=540)
    assert run.returncode == 0, run.stderr[-3000:]
    [path] = tmp_path.glob("*.json")
    result = json.loads(path.read_text())
    assert path.name == f"{result['gpu']['name'].lower()}-{result['date']}.json"
    assert result["sizes"] == "tiny" and result["skipped"] == []
    kinds = {s["kind"] for s in result["stages"]}
    assert kinds == {"controlnet", "mask2img", "text2mask", "caption", "dense_caption", "select", "maskgen", "t2i",
                     "score"}
    for s in result["stages"]:
        assert s["images_per_s"] > 0 and s["failed_rows"] == 0, s["name"]
        assert s["tflop_per_image"] > 0, s["name"]  # counted by FlopCounterMode, never typed in
        if result["gpu"]["device"] == "cpu":
            assert s["mfu"] is None and s["peak_memory_gib"] is None
    controlnet = next(s for s in result["stages"] if s["kind"] == "controlnet")
    assert controlnet["images_per_call"] == controlnet["batch_sources"] * controlnet["rows_per_source"]
    assert {t["kind"] for t in result["training"]} == {"mask2img", "text2mask"}
    assert all(t["samples_per_s"] > 0 and t["tflop_per_step"] > 0 for t in result["training"])
    assert [r["name"] for r in result["recipes"]] == ["diffusion_synthesis", "seggen_imgsyn", "sense"]
    for r in result["recipes"]:
        assert r["complete"] and r["failed"] == 0 and r["samples"] + r["rejected"] > 0 and r["shards"] == 4
        assert r["samples_per_s_wall"] > 0 and r["slowest_stage"] in r["stages"]
        # Tiny CPU runs can commit every shard at once: then there is no steady rate, and no ratio.
        assert (r["ratio_to_slowest_stage"] is None) == (r["sources_per_s_steady"] is None)
    assert [f["name"] for f in result["fast_paths"]] == ["controlnet+channels_last", "controlnet+vae_batch_2"]
    assert all(f["tflop_per_image"] == controlnet["tflop_per_image"] for f in result["fast_paths"])
    assert "recipe sense" in run.stdout and "controlnet-sd15-512" in run.stdout
