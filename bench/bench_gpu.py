"""GPU throughput of every model stage, the SegGen training steps and whole recipes: one command, one JSON.

    python bench/bench_gpu.py                      # on a GPU: real sizes, random weights (profile: random)
    python bench/bench_gpu.py --tiny               # the same code with tiny models (default without a GPU)

Sections (`--sections` picks some), run in the order of their value: `stages` (each stage alone: images/s,
FLOPs counted on the warm-up call, TFLOP/s, MFU, memory; the stages that make each recipe's images first),
`fast_paths` (the ControlNet workload with each `model.speed` option on, compile first), `training` (one
`factory train mask2img` / `text2mask` step at 768 px, bf16, largest batch that fits) and `recipes`
(Diffusion Synthesis, SegGen ImgSyn and SENSE through `factory.engine.driver.run_job`, pools from
`factory.tools.pool_sizes` on the stage rates just measured, GPU busy fraction from NVML).

`--minutes` is a hard deadline: a workload starts only if its estimate (counted FLOPs at an assumed MFU,
plus building and compiling) fits the time left, else it is listed under `skipped`; at the deadline the
JSON is saved with the workload in flight named under `stopped` and the process ends. A workload that
fails is recorded in `errors` (section, name, the error's line) and the run goes on; the JSON is rewritten
after every workload. `--require-gpu` stops at once where torch sees no CUDA device; without it such a
machine runs the tiny sizes and says so (`fallback`). Only the recipes need Ray: where it is not installed
they are listed as skipped, and the other sections import neither Ray nor webdataset. Writes
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
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import date
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# Ray's workers (the recipes) import factory too: from this checkout, installed or not.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))

from gpu_workloads import (  # noqa: E402
    ASSUMED_MFU,
    CPU_FAST_PATHS,
    FAST_PATHS,
    RECIPE_ESTIMATE_S,
    TRAINING_ESTIMATE_S,
    VALUE,
    estimate_s,
    workloads,
)
from measure import Workload, device_info, measure_recipe, measure_stage, measure_training  # noqa: E402

from factory.tools.pool_sizes import plan  # noqa: E402

RECIPES = ("diffusion_synthesis", "seggen_imgsyn", "sense")
BASELINE = "controlnet-sd15-512"  # the workload each fast path is measured against


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
            f"ratio to the shared-GPU bound {fmt(r.get('ratio_to_shared_gpu_bound'), '.2f')}  "
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


@dataclass
class Item:
    """One workload of the run, in the order of value: started only if its estimate fits the time left."""

    section: str
    name: str
    measure: Callable[[], dict]
    estimate_s: float | None = None  # None: no estimate (tiny sizes, a GPU without a known peak)


def plan_items(args, tiny: bool, gpu: bool, device: str, peak: float | None, measured: dict) -> list[Item]:
    """Every workload of the chosen sections, by value: the stages that make each recipe's images (the
    goals) and the other stages, the fast paths (compile first), training, then the recipes (Ray)."""
    by_name = {w.name: w for w in workloads(tiny)}
    sections = args.sections.split(",")
    chosen = [w for w in workloads(tiny) if not args.only or w.name in args.only]
    peak_for_estimates = None if tiny else peak  # the estimates are for real sizes on a GPU whose peak is known
    items = []
    if "stages" in sections:
        for w in sorted(chosen, key=lambda w: VALUE.index(w.name)):
            items.append(
                Item("stages", w.name, partial(measure_stage, w, device, peak), estimate_s(w, peak_for_estimates))
            )
    if "fast_paths" in sections and BASELINE in {w.name for w in chosen}:
        base = by_name[BASELINE]
        for option in CPU_FAST_PATHS if not gpu else FAST_PATHS:
            over = FAST_PATHS[option]
            model = {**base.model, **over, "speed": {**base.model.get("speed", {}), **over.get("speed", {})}}
            variant = replace(base, name=f"controlnet+{option}", model=model, note=f"controlnet-sd15-512 with {option}")

            def fast_path(variant=variant):
                flops = measured[BASELINE]["tflop_per_image"]
                return measure_stage(variant, device, peak, count_flops=False, flops_per_image=flops and flops * 1e12)

            items.append(Item("fast_paths", variant.name, fast_path, estimate_s(variant, peak_for_estimates)))
    if "training" in sections:
        for kind in ("mask2img", "text2mask"):
            size, batches, steps = (32, [2], 1) if tiny else (768, [16, 8, 4, 2, 1], 3)
            run = partial(measure_training, kind, "tiny" if tiny else "random", size, batches, steps, device, peak)
            items.append(Item("training", kind, run, None if peak_for_estimates is None else TRAINING_ESTIMATE_S))
    return items


H100_PEAK = 989.0  # what --plan-only assumes where no GPU is visible: the H100 SXM's dense bf16 peak


def print_plan(items: list[Item], peak: float) -> dict:
    """The plan of a real-size run and the seconds estimated for each workload, measuring nothing."""
    total = 0.0
    for i in items:
        total += i.estimate_s or 0
        estimate = f"{i.estimate_s:7.0f} s" if i.estimate_s is not None else "      - "
        print(f"{i.section:<11}{i.name:<34}{estimate}{total:8.0f} s")
    print(f"{len(items)} workloads at {ASSUMED_MFU:.0%} of {peak:.0f} TFLOP/s: {total:.0f} s ({total / 60:.1f} min)")
    return {"plan": [{"section": i.section, "name": i.name, "estimate_s": i.estimate_s} for i in items]}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny models at test sizes (the default without a GPU)")
    p.add_argument("--sections", default="stages,fast_paths,training,recipes")
    p.add_argument("--only", action="append", help="stage workloads to run (names); default all")
    p.add_argument("--recipes", help=f"recipes to run, comma-separated (default all: {','.join(RECIPES)})")
    p.add_argument(
        "--minutes", type=float, default=8.0, help="hard deadline: the run saves what it measured and ends by then"
    )
    p.add_argument("--require-gpu", action="store_true", help="stop at once if no CUDA device is visible")
    p.add_argument("--out", default=str(REPO / "bench" / "results"))
    p.add_argument(
        "--plan-only",
        action="store_true",
        help=f"print the real-size plan and its estimates (for this GPU, or an H100 SXM at {H100_PEAK:.0f} TFLOP/s "
        "where none is visible) and measure nothing",
    )
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
    if args.plan_only:
        return print_plan(plan_items(args, False, True, "cuda", peak or H100_PEAK, {}), peak or H100_PEAK)
    started = time.perf_counter()
    deadline = started + args.minutes * 60
    result: dict = {
        "date": date.today().isoformat(),
        "gpu": info,
        "sizes": "tiny" if tiny else "real",
        "assumed_mfu_for_estimates": ASSUMED_MFU,
        "deadline_minutes": args.minutes,
        "plan": [],
        "stages": [],
        "training": [],
        "recipes": [],
        "fast_paths": [],
        "skipped": [],
        "errors": [],
        "stopped": None,
        "section_seconds": {},
    }
    if not gpu and not args.tiny:
        note = (
            f"no CUDA device visible (torch {torch.__version__}, CUDA build {torch.version.cuda}): tiny models on "
            "the CPU instead; --require-gpu makes this an error"
        )
        print(f"bench_gpu: {note}", file=sys.stderr, flush=True)
        result["fallback"] = note
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{slug(info['name'])}-{result['date']}.json"
    lock = threading.Lock()
    running: list[str] = []

    def save() -> None:
        """Rewritten after every workload: a run cut short leaves every figure measured so far."""
        result["seconds"] = round(time.perf_counter() - started, 1)
        path.write_text(json.dumps(result, indent=1) + "\n")

    def at_deadline() -> None:
        """The hard deadline: what was measured is saved, the workload in flight is named, the process ends."""
        with lock:
            result["stopped"] = f"deadline of {args.minutes} min reached during {' '.join(running) or 'the run'}"
            save()
            print(table(result), flush=True)
            print(f"bench_gpu: {result['stopped']}; results in {path}", flush=True)
        os._exit(0)

    timer = threading.Timer(max(deadline - time.perf_counter(), 0), at_deadline)
    timer.daemon = True
    timer.start()

    def attempt(item: Item) -> dict | None:
        """One workload if its estimate fits the time left: its figures appended to its section, or its error
        to `errors` and the run goes on; saved either way."""
        left = deadline - time.perf_counter()
        if item.estimate_s is not None and item.estimate_s > left:
            with lock:
                result["skipped"].append(
                    f"{item.section} {item.name} (estimated {item.estimate_s:.0f} s, {left:.0f} s left)"
                )
                save()
            return None
        running[:] = [item.section, item.name]
        try:
            figures, error = item.measure(), None
        except Exception as e:  # any failure of one workload (OOM, a missing kernel) must not lose the others
            logging.getLogger("bench").exception("%s %s failed", item.section, item.name)
            figures, error = None, {"section": item.section, "name": item.name, "error": f"{type(e).__name__}: {e}"}
        with lock:
            if error is None:
                result[item.section].append(figures)
            else:
                error["error"] = error["error"][:500]
                result["errors"].append(error)
            save()
        return figures

    measured: dict[str, dict] = {}
    items = plan_items(args, tiny, gpu, device, peak, measured)
    result["plan"] = [{"section": i.section, "name": i.name, "estimate_s": i.estimate_s} for i in items]
    estimated = sum(i.estimate_s or 0 for i in items)
    print(f"bench_gpu: {len(items)} workloads, {estimated:.0f} s estimated, deadline {args.minutes} min", flush=True)
    for item in items:
        if item.section == "fast_paths" and BASELINE not in measured:
            result["skipped"].append(f"fast_paths {item.name} (its baseline, {BASELINE}, was not measured)")
            continue
        mark = time.perf_counter()
        figures = attempt(item)
        if figures is not None and item.section == "stages":
            measured[item.name] = figures
            print(f"{item.name}: {figures['images_per_s']} images/s", flush=True)
        seconds = result["section_seconds"]
        seconds[item.section] = round(seconds.get(item.section, 0) + time.perf_counter() - mark, 1)
    sections = args.sections.split(",")
    if "recipes" in sections and not ray_installed():
        result["skipped"].append("recipes (Ray is not installed here: they run through the engine, on Ray)")
    elif "recipes" in sections:
        mark = time.perf_counter()
        by_name = {w.name: w for w in workloads(tiny)}
        with tempfile.TemporaryDirectory() as work:
            for name, parts in recipes(by_name).items():
                if name not in chosen_recipes:
                    continue
                if any(w is not None and w.name not in measured for w, _ in parts):
                    result["skipped"].append(f"recipe {name} (needs its stages measured alone)")
                    continue
                stages, alone = recipe_stages(parts, measured, tiny, gpu)
                count, size, shard = (4, 64, 1) if tiny else (8, 512, 2)
                run = partial(measure_recipe, name, stages, count, size, shard, work, alone)
                attempt(Item("recipes", name, run, None if tiny else RECIPE_ESTIMATE_S))
        result["section_seconds"]["recipes"] = round(time.perf_counter() - mark, 1)
    timer.cancel()
    with lock:
        save()
        print(table(result))
        print(
            f"{info['name']} ({f'peak {peak} TFLOP/s bf16' if peak else 'no MFU peak known'}), "
            f"{result['seconds']}s -> {path}"
        )
    return result


if __name__ == "__main__":
    main()
