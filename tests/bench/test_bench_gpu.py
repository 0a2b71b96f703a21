"""bench/bench_gpu.py at tiny sizes on the CPU: the same code a GPU runs, every section, one JSON.

The tiny run measures one recipe (the recipes themselves run end to end in tests/recipes/); every recipe's
stage specs, as the benchmark builds them at either size, are checked against the job spec schema.
"""

import json
import subprocess
import sys

import pytest
from helpers import REPO

sys.path.insert(0, str(REPO / "bench"))
import bench_gpu  # noqa: E402  (a script beside its library, not a package)

from factory.engine.spec import parse_spec  # noqa: E402


@pytest.mark.parametrize("tiny", [True, False], ids=["tiny", "real"])
def test_every_recipe_s_stages_are_a_valid_job(tiny, tmp_path):
    by_name = {w.name: w for w in bench_gpu.workloads(tiny)}
    measured = {name: {"rows_per_source": 2, "images_per_s": 1.0} for name in by_name}
    recipes = bench_gpu.recipes(by_name)
    assert tuple(recipes) == bench_gpu.RECIPES
    for name, parts in recipes.items():
        stages, alone = bench_gpu.recipe_stages(parts, measured, tiny, gpu=not tiny)
        spec = parse_spec(
            {
                "name": name,
                "source": {"kind": "folder", "path": str(tmp_path), "classes": "ade150"},
                "stages": stages,
                "output": {"url": str(tmp_path / "out")},
            }
        )
        assert [st.kind for st in spec.stages] == [w.kind if w else extra["kind"] for w, extra in parts]
        assert set(alone) == {w.name for w, _ in parts if w is not None}


def test_an_unknown_recipe_is_refused(capsys):
    with pytest.raises(SystemExit):
        bench_gpu.main(["--tiny", "--recipes", "seggen_imgsyn,segen"])
    assert "--recipes: unknown segen" in capsys.readouterr().err


def test_a_failing_workload_is_recorded_and_the_others_are_measured(tmp_path, monkeypatch):
    """Each workload is guarded and the JSON rewritten after it: here the first stage workload fails, the
    second is measured, and both are in the file (read while the run goes on, at the second workload)."""
    seen_on_disk = []

    def measure_stage(w, device, peak, **_):
        if w.name == "controlnet-sd15-512":
            raise RuntimeError("No available kernel.  Aborting execution.")
        seen_on_disk.append(json.loads(next(tmp_path.glob("*.json")).read_text()))
        return {"name": w.name, "kind": w.kind, "images_per_s": 1.5}

    monkeypatch.setattr(bench_gpu, "measure_stage", measure_stage)
    result = bench_gpu.main(
        [
            "--tiny",
            "--sections",
            "stages",
            "--only",
            "controlnet-sd15-512",
            "--only",
            "caption-blip-large",
            "--out",
            str(tmp_path),
        ]
    )
    error = {
        "section": "stages",
        "name": "controlnet-sd15-512",
        "error": "RuntimeError: No available kernel.  Aborting execution.",
    }
    assert seen_on_disk[0]["errors"] == [error] and seen_on_disk[0]["stages"] == []
    assert result["errors"] == [error] and [s["name"] for s in result["stages"]] == ["caption-blip-large"]
    assert json.loads(next(tmp_path.glob("*.json")).read_text()) == result


def test_a_workload_whose_estimate_does_not_fit_the_time_left_is_skipped(tmp_path, monkeypatch):
    def plan(*_):
        return [
            bench_gpu.Item("stages", "slow", lambda: {"name": "slow"}, estimate_s=10_000.0),
            bench_gpu.Item("stages", "quick", lambda: {"name": "quick", "images_per_s": 2.0}, estimate_s=1.0),
            bench_gpu.Item("training", "unestimated", lambda: {"kind": "unestimated"}),
        ]

    monkeypatch.setattr(bench_gpu, "plan_items", plan)
    result = bench_gpu.main(["--tiny", "--sections", "stages,training", "--minutes", "5", "--out", str(tmp_path)])
    assert [s["name"] for s in result["stages"]] == ["quick"] and result["training"] == [{"kind": "unestimated"}]
    [skipped] = result["skipped"]
    assert skipped.startswith("stages slow (estimated 10000 s, ") and skipped.endswith(" s left)")
    assert [p["estimate_s"] for p in result["plan"]] == [10_000.0, 1.0, None] and result["stopped"] is None


def test_the_real_plan_puts_the_goals_first_and_compile_before_the_plain_fast_paths(capsys):
    plan = bench_gpu.main(["--plan-only"])["plan"]
    names = [p["name"] for p in plan]
    assert names[:3] == ["controlnet-sd15-512", "mask2img-sdxl-1024", "t2i-flux-dev-1024"]
    fast = [n for n in names if n.startswith("controlnet+")]
    assert fast[:2] == ["controlnet+compile", "controlnet+compile_cuda_graphs"] and len(fast) == 6
    assert all(p["estimate_s"] > 0 for p in plan)
    assert "workloads at 35% of" in capsys.readouterr().out


def test_a_call_the_flop_counter_cannot_trace_runs_uncounted_and_says_why():
    import torch
    from measure import counted, out_of_memory

    calls = []

    def attention():
        calls.append(1)
        if len(calls) == 1:  # as the counter's dispatch would fail on an operator it does not know
            raise NotImplementedError("aten::_scaled_dot_product_attention with enable_gqa")
        return "images"

    assert counted(attention) == (
        "images",
        None,
        "FLOPs not counted: NotImplementedError: aten::_scaled_dot_product_attention with enable_gqa",
    )
    assert counted(lambda: torch.ones(4, 4) @ torch.ones(4, 4))[1:] == (2 * 4**3, None)

    def out_of_memory_call():
        raise RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`")

    with pytest.raises(RuntimeError, match="CUBLAS_STATUS_ALLOC_FAILED"):
        counted(out_of_memory_call)  # out of memory is the workload's failure, not the counter's
    assert out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert not out_of_memory(ValueError("out of memory")) and not out_of_memory(RuntimeError("shape mismatch"))


DEADLINE_RUN = """
import sys, time
sys.path.insert(0, sys.argv[1])
import bench_gpu
bench_gpu.plan_items = lambda *_: [
    bench_gpu.Item("stages", "quick", lambda: {"name": "quick", "images_per_s": 2.0}),
    bench_gpu.Item("stages", "hangs", lambda: time.sleep(600)),
    bench_gpu.Item("stages", "never", lambda: {"name": "never"}),
]
bench_gpu.main(sys.argv[2:])
"""


@pytest.mark.e2e
def test_the_deadline_saves_what_was_measured_names_the_workload_in_flight_and_ends_the_run(tmp_path):
    command = [sys.executable, "-c", DEADLINE_RUN, str(REPO / "bench"), "--tiny", "--sections", "stages"]
    # The hung workload sleeps 600 s: the run ends within the subprocess timeout only by its deadline.
    run = subprocess.run(
        [*command, "--minutes", "0.05", "--out", str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert [s["name"] for s in result["stages"]] == ["quick"] and result["errors"] == []
    assert result["stopped"] == "deadline of 0.05 min reached during stages hangs"
    assert "deadline of 0.05 min reached during stages hangs" in run.stdout


def test_require_gpu_stops_before_measuring_anything(tmp_path, monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        bench_gpu.main(["--require-gpu", "--out", str(tmp_path)])
    assert "--require-gpu: torch sees no CUDA device" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "name, peak",
    [
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H100 NVL", 835.0),
        ("NVIDIA H200", 989.0),
        ("NVIDIA GH200 480GB", 989.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("Tesla T4", None),
    ],
)
def test_the_mfu_peak_is_the_variant_s_own(name, peak):
    from measure import peak_bf16_tflops

    assert peak_bf16_tflops(name) == peak


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_a_recipe_runs_through_the_engine_on_ray(tmp_path, ray_local, capsys):
    """The script's `main`, in this process: its recipe runs on the shared local Ray. (The other sections,
    which need no Ray, run in tests/bench/test_device_rehearsal.py with the GPU machine's libraries.)"""
    stages = ["--only", "caption-blip-large", "--only", "mask2img-sdxl-1024"]  # the recipe's, measured alone first
    bench_gpu.main(
        ["--tiny", "--sections", "stages,recipes", *stages, "--recipes", "seggen_imgsyn", "--out", str(tmp_path)]
    )
    stdout = capsys.readouterr().out
    [path] = tmp_path.glob("*.json")
    result = json.loads(path.read_text())
    assert path.name == f"{result['gpu']['name'].lower()}-{result['date']}.json"
    assert result["sizes"] == "tiny" and result["skipped"] == [] and result["errors"] == []
    assert [r["name"] for r in result["recipes"]] == ["seggen_imgsyn"]
    for r in result["recipes"]:
        assert r["complete"] and r["failed"] == 0 and r["samples"] + r["rejected"] > 0 and r["shards"] == 4
        assert r["samples_per_s_wall"] > 0 and r["shared_gpu_bound_sources_per_s"] > 0
        # Tiny CPU runs can commit every shard at once: then there is no steady rate, and no ratio.
        assert (r["ratio_to_shared_gpu_bound"] is None) == (r["sources_per_s_steady"] is None)
    assert [s["name"] for s in result["stages"]] == ["mask2img-sdxl-1024", "caption-blip-large"]
    assert "recipe seggen_imgsyn" in stdout


def test_the_planned_weights_count_every_module_a_stage_holds_once():
    """A stage's weights off the GPU are planned from the modules it holds: the t2i stage keeps one pipeline
    per generator in a dict (SENSE's two: 57.3 GiB, of which the current pipeline alone is 31.4)."""
    import measure
    from torch import nn

    class Pipeline:
        def __init__(self, *modules):
            self.components = {f"m{i}": m for i, m in enumerate(modules)}

    class Holder:
        def __init__(self, module):
            self.model = module

    shared, a, b, c, d = (nn.Linear(2, 2) for _ in range(5))
    flux, sd3 = Pipeline(a, shared), Pipeline(b, shared)
    stage = Holder(c)
    loop: dict = {"d": d}
    loop["self"] = loop
    stage.pipes, stage.pipe, stage.extra, stage.loop = {"flux": flux, "sd3": sd3}, flux, [(Holder(c),)], loop
    assert sorted(map(id, measure._torch_modules(stage))) == sorted(map(id, (shared, a, b, c, d)))
