"""GPU throughput of every model stage, the SegGen training steps and whole recipes: one command, one JSON.

    python bench/bench_gpu.py                      # on a GPU: real sizes, random weights (profile: random)
    python bench/bench_gpu.py --tiny               # the same code with tiny models (default without a GPU)

Sections, in order (`--sections` picks some): `stages` (each stage alone: images/s, FLOPs counted on the
warm-up call, TFLOP/s, MFU, memory), `training` (one `factory train mask2img` / `text2mask` step at 768 px,
bf16, largest batch that fits), `recipes` (Diffusion Synthesis, SegGen ImgSyn and SENSE through
`factory.engine.driver.run_job`, pools from `factory.tools.pool_sizes` on the stage rates just measured, GPU busy
fraction from NVML) and `fast_paths` (the ControlNet workload with each `model.speed` option on).
`--minutes` is the time budget: a section that would start after it is recorded as skipped, never
estimated. A workload that fails is recorded in `errors` (section, name, the error's line) and the run
goes on; the JSON is rewritten after every workload, so a run cut short keeps what it measured.
`--require-gpu` stops at once where torch sees no CUDA device. Only the recipes need Ray: where it is not
installed they are listed as skipped, and the other sections import neither Ray nor webdataset. Writes
`bench/results/<gpu>-<date>.json` (or `--out DIR`) and prints a table. docs/gpu.md explains every figure.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# Ray's workers (the recipes) import factory too: from this checkout, installed or not.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))

from measure import Workload, device_info, measure_recipe, measure_stage, measure_training  # noqa: E402

from factory.tools.pool_sizes import plan  # noqa: E402

ADE_SUBSET = [
    "wall",
    "building",
    "sky",
    "floor",
    "tree",
    "ceiling",
    "road",
    "bed",
    "grass",
    "cabinet",
    "sidewalk",
    "person",
    "earth",
    "door",
    "table",
    "mountain",
    "plant",
    "curtain",
    "chair",
    "car",
]
PROMPT = {"prompt": "a photo of a living room with a grey sofa, a wooden table, a lamp and a window"}


def workloads(tiny: bool) -> list[Workload]:
    """Real sizes (the issue's workloads) on a GPU; the same stages at test sizes with `tiny`."""
    if tiny:
        t = {"profile": "tiny"}
        return [
            Workload("controlnet-sd15-512", "controlnet", t, {"variants": 2, "steps": 2, "resolution": 64}, 2, 1, 64),
            Workload("mask2img-sdxl-1024", "mask2img", t, {"images": 1, "steps": 2, "resolution": 32}, 2, 1, 64),
            Workload("text2mask-sdxl-768", "text2mask", t, {"maps": 2, "steps": 2, "resolution": 32}, 1, 1, 64),
            Workload("caption-blip-large", "caption", t, {"max_new_tokens": 8}, 4, 1, 64),
            Workload("dense-caption-gemma3-4b", "dense_caption", t, {"max_new_tokens": 8}, 2, 1, 64),
            Workload("embed-clip-vit-l14", "select", t, {"check_miou": False, "eps": -1}, 4, 1, 64, synthetic=True),
            Workload("label-gdino-b-sam-h", "maskgen", t, {"mode": "replace", "classes": ADE_SUBSET[:4]}, 2, 1, 64),
            Workload(
                "t2i-flux-dev-1024",
                "t2i",
                t,
                {"generators": [{"name": "flux", "family": "flux", "steps": 2, "resolution": 32}]},
                2,
                1,
                64,
                PROMPT,
            ),
            Workload("score-clip-vit-l14", "score", t, {}, 4, 1, 64, PROMPT, synthetic=True),
        ]
    r = {"profile": "random"}
    return [
        Workload(
            "controlnet-sd15-512",
            "controlnet",
            {**r, "dtype": "fp16"},
            {"variants": 5, "steps": 50, "guidance": 7.5, "resolution": 512},
            2,
            2,
            512,
            note="Diffusion Synthesis defaults: K=5, 50 steps, guidance 7.5; 10 images per call",
        ),
        Workload(
            "mask2img-sdxl-1024",
            "mask2img",
            {**r, "dtype": "bf16"},
            {"images": 1, "steps": 40, "resolution": 1024},
            4,
            2,
            1024,
            note="SDXL ControlNet, 40 steps",
        ),
        Workload(
            "text2mask-sdxl-768",
            "text2mask",
            {**r, "dtype": "bf16"},
            {"maps": 2, "steps": 200, "resolution": 768},
            1,
            1,
            512,
            note="SDXL, 200 steps",
        ),
        Workload(
            "caption-blip-large",
            "caption",
            {**r, "family": "blip", "dtype": "fp16"},
            {"max_new_tokens": 30},
            32,
            2,
            512,
            note="BLIP-large, greedy, up to 30 tokens",
        ),
        Workload(
            "dense-caption-gemma3-4b",
            "dense_caption",
            r,
            {"max_new_tokens": 200},
            16,
            1,
            512,
            note="Gemma-3-4B-it, bf16, up to 200 new tokens",
        ),
        Workload(
            "embed-clip-vit-l14",
            "select",
            {**r, "dtype": "fp16"},
            {"check_miou": False, "eps": -1},
            64,
            2,
            512,
            synthetic=True,
            note="select's cosine check: real + synthetic image embedded",
        ),
        Workload(
            "label-gdino-b-sam-h",
            "maskgen",
            {**r, "dtype": "bf16"},
            {"mode": "replace", "classes": ADE_SUBSET},
            8,
            2,
            512,
            note="GroundingDINO-B (900 queries, 256 text tokens) + SAM ViT-H, 20 class names",
        ),
        Workload(
            "t2i-flux-dev-1024",
            "t2i",
            r,
            {"generators": [{"name": "flux", "family": "flux"}]},
            2,
            1,
            512,
            PROMPT,
            note="FLUX.1-dev, 28 steps, guidance 3.5, 1024 px, T5 512 tokens",
        ),
        Workload(
            "score-clip-vit-l14",
            "score",
            {**r, "dtype": "fp16"},
            {},
            64,
            2,
            512,
            PROMPT,
            synthetic=True,
            note="CLIP score + density",
        ),
    ]


# The fast paths, each on alone over the ControlNet workload's fp16 baseline (model.speed, model.dtype).
FAST_PATHS = {
    "bf16": {"dtype": "bf16"},
    "sdpa_flash": {"speed": {"sdpa": "flash"}},
    "channels_last": {"speed": {"channels_last": True}},
    "vae_batch_2": {"speed": {"vae_batch": 2}},
    "compile": {"speed": {"compile": ["unet", "controlnet", "vae"]}},
    "compile_cuda_graphs": {"speed": {"compile": ["unet", "controlnet", "vae"], "cuda_graphs": True}},
}
# On a CPU: CUDA graphs need a GPU, and torch.compile is left to the GPU run to keep the tiny run short.
CPU_FAST_PATHS = ("channels_last", "vae_batch_2")


RECIPES = ("diffusion_synthesis", "seggen_imgsyn", "sense")


def recipes(by_name: dict[str, Workload]) -> dict[str, list[tuple[Workload | None, dict]]]:
    """Recipe stages as (workload measured alone, stage spec overrides); None: a CPU stage."""
    prompt = {"kind": "prompt", "params": {"mode": "caption_classes", "template": "{caption}; {classes}"}}
    return {
        "diffusion_synthesis": [
            (by_name["caption-blip-large"], {}),
            (None, prompt),
            (by_name["controlnet-sd15-512"], {}),
            (by_name["embed-clip-vit-l14"], {}),
        ],
        "seggen_imgsyn": [(by_name["caption-blip-large"], {}), (by_name["mask2img-sdxl-1024"], {})],
        "sense": [
            (by_name["dense-caption-gemma3-4b"], {}),
            (by_name["t2i-flux-dev-1024"], {}),
            (by_name["score-clip-vit-l14"], {}),
        ],
    }


def recipe_stages(parts, stage_results: dict[str, dict], tiny: bool, gpu: bool) -> tuple[list[dict], dict]:
    """Stage specs with pools balanced for one GPU by plan_resources, and each stage's sources/s alone."""
    shapes, rates = [], {}
    for w, spec in parts:
        if w is None:
            shapes.append((spec["kind"], spec["kind"], 1, False))
        else:
            shapes.append((w.name, w.kind, stage_results[w.name]["rows_per_source"], True))
            rates[w.name] = stage_results[w.name]["images_per_s"]
    balanced = {s.label: s for s in plan(shapes, rates, gpus=1).stages}
    stages, alone = [], {}
    for w, spec in parts:
        label = w.name if w is not None else spec["kind"]
        p = balanced[label]
        resources = {
            "num_cpus": 0.25 if tiny else 2,
            "num_gpus": p.gpus_per_actor if gpu and w else 0,
            "concurrency": 1,
            "batch_size": int(p.rows_in * (w.batch if w else 4)),
        }
        if w is None:
            stages.append({**spec, "resources": resources})
            continue
        stages.append({"kind": w.kind, "name": w.name, "model": w.model, "params": w.params, "resources": resources})
        alone[w.name] = p.rate / (p.rows_in * p.k)
    return stages, alone


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def table(result: dict) -> str:
    rows = [
        f"{'stage':<26}{'img/s':>9}{'TFLOP/img':>10}{'TFLOP/s':>9}{'MFU':>7}{'peak GiB':>9}{'load s':>8}{'1st s':>7}"
    ]

    def fmt(v, spec):
        return format(v, spec) if v is not None else "-"

    for s in result["stages"] + result["fast_paths"]:
        rows.append(
            f"{s['name']:<26}{fmt(s.get('images_per_s'), '.3f'):>9}{fmt(s.get('tflop_per_image'), '.2f'):>10}"
            f"{fmt(s.get('achieved_tflops'), '.1f'):>9}{fmt(s.get('mfu'), '.1%'):>7}"
            f"{fmt(s.get('peak_memory_gib'), '.1f'):>9}{fmt(s.get('load_s'), '.1f'):>8}"
            f"{fmt(s.get('first_call_s'), '.1f'):>7}"
        )
    for t in result["training"]:
        rows.append(
            f"train {t['kind']:<20}{fmt(t.get('samples_per_s'), '.3f'):>9}"
            f"{fmt(t.get('tflop_per_step'), '.2f'):>10}{fmt(t.get('achieved_tflops'), '.1f'):>9}"
            f"{fmt(t.get('mfu'), '.1%'):>7}{fmt(t.get('peak_memory_gib'), '.1f'):>9}  batch {t.get('batch')}"
        )
    for r in result["recipes"]:
        rows.append(
            f"recipe {r['name']:<19}{fmt(r.get('samples_per_s_steady'), '.3f'):>9}  "
            f"ratio to slowest alone {fmt(r.get('ratio_to_slowest_stage'), '.2f')}  "
            f"GPU busy {fmt(r.get('gpu_busy_fraction'), '.0%')}  wall {r['seconds']}s"
        )
    rows += [f"skipped: {s}" for s in result["skipped"]]
    rows += [f"failed: {e['section']} {e['name']}: {e['error']}" for e in result["errors"]]
    return "\n".join(rows)


def ray_installed() -> bool:
    """The recipes need Ray; the other sections import neither Ray nor webdataset (a GPU machine may lack both)."""
    try:
        import ray  # noqa: F401
    except ImportError:
        return False
    return True


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny models at test sizes (the default without a GPU)")
    p.add_argument("--sections", default="stages,training,recipes,fast_paths")
    p.add_argument("--only", action="append", help="stage workloads to run (names); default all")
    p.add_argument("--recipes", help=f"recipes to run, comma-separated (default all: {','.join(RECIPES)})")
    p.add_argument("--minutes", type=float, default=7.5, help="time budget; later sections are skipped")
    p.add_argument("--require-gpu", action="store_true", help="stop at once if no CUDA device is visible")
    p.add_argument("--out", default=str(REPO / "bench" / "results"))
    args = p.parse_args(argv)
    chosen_recipes = args.recipes.split(",") if args.recipes else list(RECIPES)
    unknown = set(chosen_recipes) - set(RECIPES)
    if unknown:
        p.error(f"--recipes: unknown {', '.join(sorted(unknown))}; choose from {', '.join(RECIPES)}")
    import torch

    logging.basicConfig(level=logging.WARNING)
    gpu = torch.cuda.is_available()
    if args.require_gpu and not gpu:
        p.error(
            f"--require-gpu: torch sees no CUDA device (torch {torch.__version__}, CUDA build "
            f"{torch.version.cuda}); nothing was measured"
        )
    tiny = args.tiny or not gpu
    device = "cuda" if gpu else "cpu"
    info = device_info()
    peak = info["peak_bf16_tflops"]
    sections = args.sections.split(",")
    started = time.perf_counter()
    result = {
        "date": date.today().isoformat(),
        "gpu": info,
        "sizes": "tiny" if tiny else "real",
        "stages": [],
        "training": [],
        "recipes": [],
        "fast_paths": [],
        "skipped": [],
        "errors": [],
        "section_seconds": {},
    }
    mark = [started]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{slug(info['name'])}-{result['date']}.json"

    def save() -> None:
        """Rewritten after every workload: a run cut short leaves every figure measured so far."""
        result["seconds"] = round(time.perf_counter() - started, 1)
        path.write_text(json.dumps(result, indent=1) + "\n")

    def guarded(section: str, name: str, measure) -> dict | None:
        """One workload: its figures appended to `result[section]`, or its error to `errors` and the run goes
        on; saved either way."""
        try:
            figures = measure()
            result[section].append(figures)
        except Exception as e:  # any failure of one workload (OOM, a missing kernel) must not lose the others
            logging.getLogger("bench").exception("%s %s failed", section, name)
            result["errors"].append({"section": section, "name": name, "error": f"{type(e).__name__}: {e}"[:500]})
            figures = None
        save()
        return figures

    def section_done(section: str) -> None:
        result["section_seconds"][section] = round(time.perf_counter() - mark[0], 1)
        mark[0] = time.perf_counter()
        save()

    def budget_left(section: str) -> bool:
        if time.perf_counter() - started < args.minutes * 60:
            return True
        result["skipped"].append(f"{section} (time budget of {args.minutes} min spent)")
        return False

    chosen = [w for w in workloads(tiny) if not args.only or w.name in args.only]
    by_name = {w.name: w for w in workloads(tiny)}
    if "stages" in sections:
        for w in chosen:
            if budget_left(w.name) and (figures := guarded("stages", w.name, lambda: measure_stage(w, device, peak))):
                print(f"{w.name}: {figures['images_per_s']} images/s", flush=True)
        section_done("stages")
    if "training" in sections:
        for kind in ("mask2img", "text2mask"):
            if budget_left(f"training {kind}"):
                guarded(
                    "training",
                    kind,
                    lambda: measure_training(
                        kind,
                        "tiny" if tiny else "random",
                        32 if tiny else 768,
                        [2] if tiny else [16, 8, 4, 2, 1],
                        1 if tiny else 3,
                        device,
                        peak,
                    ),
                )
        section_done("training")
    measured = {s["name"]: s for s in result["stages"]}
    if "recipes" in sections and not ray_installed():
        result["skipped"].append("recipes (Ray is not installed here: they run through the engine, on Ray)")
    elif "recipes" in sections:
        with tempfile.TemporaryDirectory() as work:
            for name, parts in recipes(by_name).items():
                if name not in chosen_recipes:
                    continue
                if any(w is not None and w.name not in measured for w, _ in parts):
                    result["skipped"].append(f"recipe {name} (needs its stages measured alone)")
                    continue
                if budget_left(f"recipe {name}"):
                    stages, alone = recipe_stages(parts, measured, tiny, gpu)
                    count, size, shard = (4, 64, 1) if tiny else (8, 512, 2)
                    guarded("recipes", name, lambda: measure_recipe(name, stages, count, size, shard, work, alone))
        section_done("recipes")
    if "fast_paths" in sections and "controlnet-sd15-512" in measured:
        base = by_name["controlnet-sd15-512"]
        for option in CPU_FAST_PATHS if not gpu else FAST_PATHS:
            if budget_left(f"fast path {option}"):
                over = FAST_PATHS[option]
                model = {**base.model, **over, "speed": {**base.model.get("speed", {}), **over.get("speed", {})}}
                variant = Workload(
                    f"controlnet+{option}",
                    base.kind,
                    model,
                    base.params,
                    base.batch,
                    base.calls,
                    base.size,
                    note=f"controlnet-sd15-512 with {option}",
                )
                flops = measured["controlnet-sd15-512"]["tflop_per_image"]
                guarded(
                    "fast_paths",
                    variant.name,
                    lambda: measure_stage(
                        variant, device, peak, count_flops=False, flops_per_image=flops and flops * 1e12
                    ),
                )
        section_done("fast_paths")
    save()
    print(table(result))
    print(
        f"{info['name']} ({f'peak {peak} TFLOP/s bf16' if peak else 'no MFU peak known'}), "
        f"{result['seconds']}s -> {path}"
    )
    return result


if __name__ == "__main__":
    main()
