"""Samples/s of the quickstart pipeline on Ray against a plain in-process loop, measured in one run.

Both sides use the same tiny ControlNet, the same procedural scenes and the same spec parameters, and
both write the same WebDataset samples (the loop into one tar). Both timings run from job start to the
last sample written, model loading included; the start of the local Ray instance is reported apart.

    .venv/bin/python bench/bench_pipeline.py [--scenes 32] [--size 64] [--variants 2] [--steps 4]
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import tempfile
import time
from pathlib import Path

import ray
import torch
from webdataset import TarWriter

from factory.engine.driver import run_job
from factory.engine.reader import ShardReader
from factory.engine.spec import load_spec
from factory.engine.writer import encode_files
from factory.sources import open_source
from factory.sources.scenes import make_scenes
from factory.stages import StageContext, resolve_stage

REPO = Path(__file__).resolve().parents[1]


def plain_loop(spec, out: Path) -> tuple[int, float]:
    """What a user writes by hand: load the model once, then for each image generate, encode, write."""
    source = open_source(spec.source)
    st = spec.stages[0]
    cls = resolve_stage(st.kind)
    start = time.perf_counter()
    stage = cls(
        cls.Params(**st.params),
        cls.Model(**st.model),
        StageContext(label=st.label, job_seed=spec.seed, classes=source.classes, device="cpu"),
    )
    stage.setup()
    reader = ShardReader(spec.source.model_dump_json(), "", {}, retries=0, backoff=0.0)
    n = 0
    with open(out, "wb") as f, TarWriter(f) as tar:
        for index, sample_id in enumerate(source.list_ids()):
            for sample in stage.process([reader.load(source, 0, index, sample_id)]):
                files = encode_files(sample, spec.output.image_format, spec.output.jpeg_quality, {})
                tar.write({"__key__": sample.key, **files})
                n += 1
    return n, time.perf_counter() - start


def factory_pipeline(spec, actors: int) -> tuple[int, float]:
    r = spec.stages[0].resources
    r.concurrency, r.num_cpus = actors, round(1.5 / actors, 2)  # leave CPU for the read and write tasks
    start = time.perf_counter()
    index = run_job(spec)
    return index["samples"], time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--scenes", type=int, default=32)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--variants", type=int, default=2)
    p.add_argument("--steps", type=int, default=4)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_scenes(tmp / "scenes", count=args.scenes, size=args.size)
        stage = load_spec(REPO / "jobs" / "quickstart.yaml").stages[0].model_dump(mode="json")
        stage["params"].update(variants=args.variants, steps=args.steps, resolution=args.size)
        overrides = {"source.path": str(tmp / "scenes"), "stages": [stage]}

        def spec_for(out: str):
            return load_spec(REPO / "jobs" / "quickstart.yaml", {**overrides, "output.url": out})

        loop_n, loop_s = plain_loop(spec_for(str(tmp / "loop")), tmp / "loop.tar")
        t0 = time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        ray_start = time.perf_counter() - t0
        results = {
            "plain_loop": {"samples": loop_n, "seconds": round(loop_s, 2), "samples_per_s": round(loop_n / loop_s, 3)}
        }
        for actors in (1, 2):
            n, s = factory_pipeline(spec_for(str(tmp / f"ray-{actors}")), actors)
            results[f"factory_{actors}_actor"] = {
                "samples": n,
                "seconds": round(s, 2),
                "samples_per_s": round(n / s, 3),
                "ratio_vs_loop": round((n / s) / (loop_n / loop_s), 2),
            }
        ray.shutdown()

    results["setup"] = {
        "scenes": args.scenes,
        "size": args.size,
        "variants": args.variants,
        "steps": args.steps,
        "ray_start_s": round(ray_start, 2),
        "cpus": 2,
        "torch_threads_loop": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
    }
    print(json.dumps(results, indent=2))
    print("\n| run | samples | seconds | samples/s | ratio vs loop |\n|---|---|---|---|---|")
    for name, r in results.items():
        if name != "setup":
            print(
                f"| {name} | {r['samples']} | {r['seconds']} | {r['samples_per_s']} | {r.get('ratio_vs_loop', 1.0)} |"
            )


if __name__ == "__main__":
    main()
