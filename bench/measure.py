"""Measuring helpers for `bench/bench_gpu.py`: a stage alone, a training step, a whole recipe through the engine.

Every figure is measured by the code here, on the machine it runs on: rates are timed calls after a
warm-up call, FLOPs are counted by `torch.utils.flop_counter.FlopCounterMode` on the warm-up call, MFU is
achieved FLOP/s over the GPU's dense bf16 peak, memory is `torch.cuda.max_memory_allocated`, and the GPU
busy fraction is NVML's utilisation sampled while a recipe runs. On a CPU the same code runs (tiny models)
and the GPU-only figures are null.
"""

from __future__ import annotations

import gc
import importlib.util
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from factory.sample import Sample
from factory.sources.classes import class_set
from factory.sources.scenes import render_scene

# Dense bf16 tensor-core peak, TFLOP/s (NVIDIA's data sheets), by a part of the name torch reports: the
# first match wins, so each variant comes before its family's name (the SXM H100 reports "H100 80GB HBM3").
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("GH200", 989.0),
    ("H200", 989.0),
    ("H100", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
)


def peak_bf16_tflops(name: str) -> float | None:
    return next((peak for part, peak in PEAK_BF16_TFLOPS if part in name), None)


def device_info() -> dict:
    import diffusers
    import torch
    import transformers

    info = {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__}
    if not torch.cuda.is_available():
        return {**info, "device": "cpu", "name": "cpu", "peak_bf16_tflops": None, "memory_gib": None}
    name = torch.cuda.get_device_name(0)
    peak = peak_bf16_tflops(name)
    memory = torch.cuda.get_device_properties(0).total_memory / 2**30
    return {**info, "device": "cuda", "name": name, "peak_bf16_tflops": peak, "memory_gib": round(memory, 1)}


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def reset_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def memory_gib(peak: bool = True) -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    return round((torch.cuda.max_memory_allocated() if peak else torch.cuda.memory_allocated()) / 2**30, 2)


def _torch_modules(stage, depth: int = 3) -> list:
    """The torch modules a stage holds: in its attributes, their attributes and pipelines' components,
    `depth` levels down (an embedder object holding a model, a pipeline holding a UNet)."""
    import torch

    found: dict[int, Any] = {}
    level = [stage]
    for _ in range(depth):
        below = []
        for holder in level:
            values = list(vars(holder).values()) if hasattr(holder, "__dict__") else []
            if isinstance(getattr(holder, "components", None), dict):
                values += list(holder.components.values())
            for value in values:
                if isinstance(value, torch.nn.Module):
                    found[id(value)] = value
                elif hasattr(value, "__dict__") and not isinstance(value, type):
                    below.append(value)
        level = below
    return list(found.values())


def counted(fn) -> tuple[Any, int]:
    """(fn(), FLOPs it ran), counted by torch's FlopCounterMode (matmuls, convolutions, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        result = fn()
    return result, counter.get_total_flops()


class BusySampler:
    """Mean NVML GPU utilisation over a `with` block, sampled every `every` s; None without NVML or a GPU."""

    def __init__(self, every: float = 0.2):
        self.every, self.samples, self.fraction = every, [], None
        self._stop = threading.Event()
        self._handle = None
        if importlib.util.find_spec("pynvml") is None:
            return
        import torch

        if not torch.cuda.is_available():
            return
        import pynvml

        pynvml.nvmlInit()
        self._handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())

    def _run(self) -> None:
        import pynvml

        while not self._stop.wait(self.every):
            self.samples.append(pynvml.nvmlDeviceGetUtilizationRates(self._handle).gpu)

    def __enter__(self):
        if self._handle is not None:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self._handle is not None:
            self._stop.set()
            self._thread.join()
            if self.samples:
                self.fraction = round(float(np.mean(self.samples)) / 100, 3)


def significant(x: float | None, digits: int = 4) -> float | None:
    return None if x is None else float(f"{x:.{digits}g}")


def throughput(flops: int | None, seconds: float, peak: float | None) -> dict:
    tflops = flops / seconds / 1e12 if flops else None
    return {
        "achieved_tflops": significant(tflops),
        "mfu": None if tflops is None or peak is None else round(tflops / peak, 4),
    }


# ---------------------------------------------------------------- a stage alone


@dataclass
class Workload:
    """One stage measured alone: `batch` source samples per `process()` call, `calls` timed calls."""

    name: str
    kind: str
    model: dict
    params: dict
    batch: int
    calls: int = 2
    size: int = 512  # side of the procedural source images and masks
    meta: dict = field(default_factory=dict)  # put in every source sample (a prompt, a caption)
    synthetic: bool = False  # samples carry a synthetic image beside the real one (select, score)
    note: str = ""


def sources(w: Workload, call: int) -> list[Sample]:
    """The samples of one call: procedural ADE150 scenes, a new set per call."""
    out = []
    for i in range(w.batch):
        image, mask = render_scene(w.size, seed=call, index=i)
        sample = Sample(shard=call, index=i, source_id=f"bench-{call}-{i}", image=image, mask=mask, meta=dict(w.meta))
        if w.synthetic:
            sample.source_image = render_scene(w.size, seed=call + 1000, index=i)[0]
        out.append(sample)
    return out


def build_stage(kind: str, model: dict, params: dict, device: str, label: str | None = None):
    from factory.stages import StageContext, resolve_stage

    cls = resolve_stage(kind)
    return cls(
        cls.Params.model_validate(params),
        cls.Model.model_validate(model),
        StageContext(label=label or kind, job_seed=0, classes=class_set("ade150"), device=device),
    )


def measure_stage(
    w: Workload, device: str, peak: float | None, count_flops: bool = True, flops_per_image: float | None = None
) -> dict:
    """images/s (output rows/s), FLOPs per image, TFLOP/s, MFU, memory and set-up times of one stage alone."""
    reset_memory()
    stage = build_stage(w.kind, w.model, w.params, device)
    started = time.perf_counter()
    stage.setup()
    sync()
    load_s = time.perf_counter() - started
    weights = memory_gib(peak=False)
    if weights is None:  # no CUDA: the weights as planned from the modules themselves
        from factory.models.random_weights import weight_bytes

        weights = significant(sum(weight_bytes(m) for m in _torch_modules(stage)) / 2**30)
    k = stage.variants_per_input()
    warm = sources(w, 0)
    started = time.perf_counter()
    if count_flops:
        out, flops = counted(lambda: stage.process(warm))
        flops_per_image = flops / len(out) if out else None
    else:
        out = stage.process(warm)
    sync()
    first_s = time.perf_counter() - started
    inputs = [sources(w, c + 1) for c in range(w.calls)]
    started = time.perf_counter()
    rows = failed = 0
    for batch in inputs:
        made = stage.process(batch)
        rows += len(made)
        failed += sum(s.error is not None for s in made)
    sync()
    seconds = time.perf_counter() - started
    per_call = seconds / w.calls
    result = {
        "name": w.name,
        "kind": w.kind,
        "rows_per_source": k,
        "batch_sources": w.batch,
        "images_per_call": rows // w.calls,
        "timed_calls": w.calls,
        "failed_rows": failed,
        "images_per_s": round(rows / seconds, 4),
        "sources_per_s": round(rows / k / seconds, 4),
        "seconds_per_call": round(per_call, 3),
        "tflop_per_image": significant(flops_per_image and flops_per_image / 1e12),
        **throughput(flops_per_image * rows if flops_per_image else None, seconds, peak),
        "weights_gib": weights,
        "peak_memory_gib": memory_gib(),
        "load_s": round(load_s, 2),
        "first_call_s": round(first_s, 2),
        # With torch.compile the first call compiles: its excess over a steady call is the compile time.
        "compile_s": round(first_s - per_call, 2)
        if getattr(getattr(stage.model, "speed", None), "compile", None)
        else None,
        "model": w.model,
        "params": w.params,
        "note": w.note,
    }
    del stage
    reset_memory()
    return result


# ---------------------------------------------------------------- a training step


def training_batch(kind: str, size: int, resolution: int) -> dict:
    """What `PairStream.batch` yields, with random pixels: the step's cost does not depend on them."""
    import torch

    g = torch.Generator().manual_seed(0)
    batch = {
        "prompt": ["a photo of a living room with a sofa and a lamp"] * size,
        "colour": torch.rand(size, 3, resolution, resolution, generator=g),
        "time_ids": torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]] * size, dtype=torch.float32),
    }
    if kind == "mask2img":
        batch["image"] = torch.rand(size, 3, resolution, resolution, generator=g)
    return batch


def measure_training(
    kind: str,
    profile: str,
    resolution: int,
    batch_sizes: list[int],
    steps: int,
    device: str,
    peak: float | None,
    mixed_precision: str = "bf16",
) -> dict:
    """samples/s, FLOPs and memory of `factory train KIND` steps (AdamW, autocast), at the largest batch of
    `batch_sizes` that fits (tried largest first; a CUDA out-of-memory moves on to the next)."""
    import torch

    from factory.seggen.models import TrainingModels
    from factory.seggen.spec import TrainModel

    tried = []
    for size in sorted(batch_sizes, reverse=True):
        reset_memory()
        try:
            models = TrainingModels(kind, TrainModel(profile=profile), mixed_precision, torch.device(device), None)
            optimizer = torch.optim.AdamW(models.trainable.parameters(), lr=1e-5)
            batch = training_batch(kind, size, resolution)

            def step(n: int):
                loss = models.loss(models.trainable, batch, torch.Generator().manual_seed(n))
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            _, flops = counted(lambda: step(0))
            sync()
            started = time.perf_counter()
            for n in range(steps):
                step(n + 1)
            sync()
            seconds = time.perf_counter() - started
        except torch.cuda.OutOfMemoryError:
            tried.append(size)
            models = optimizer = batch = None
            continue
        result = {
            "kind": kind,
            "resolution": resolution,
            "batch": size,
            "out_of_memory_at": tried,
            "mixed_precision": mixed_precision if device == "cuda" else "no",
            "timed_steps": steps,
            "samples_per_s": round(size * steps / seconds, 4),
            "seconds_per_step": round(seconds / steps, 3),
            "tflop_per_step": significant(flops / 1e12),
            **throughput(flops * steps, seconds, peak),
            "trainable_params_m": round(sum(p.numel() for p in models.trainable.parameters()) / 1e6, 1),
            "peak_memory_gib": memory_gib(),
        }
        del models, optimizer, batch
        reset_memory()
        return result
    return {"kind": kind, "resolution": resolution, "batch": None, "out_of_memory_at": tried}


# ---------------------------------------------------------------- a whole recipe through the engine


def measure_recipe(
    name: str, stages: list[dict], count: int, size: int, shard_size: int, work_dir, stage_rates: dict[str, float]
) -> dict:
    """A recipe run by `factory.engine.driver.run_job` on procedural scenes: wall and steady samples/s, the ratio of
    its sources/s to the slowest stage alone (`stage_rates`: sources/s per stage label), GPU busy fraction.

    Steady rate: the rows of every shard but the first over the time from the first commit to the last,
    which leaves actor start-up, model loading and the pipeline's fill out, as the stage-alone rates do.
    It needs shards that commit one after another (compute-bound runs); when they all commit at once, as
    tiny CPU runs do, it is null.
    """
    from pathlib import Path

    from factory.engine.driver import run_job
    from factory.engine.spec import parse_spec
    from factory.output.layout import OutputStore
    from factory.sources.scenes import make_scenes

    work_dir = Path(work_dir)
    make_scenes(work_dir / f"{name}-scenes", count=count, size=size)
    spec = parse_spec(
        {
            "name": f"bench-{name}",
            "seed": 0,
            "source": {
                "kind": "folder",
                "path": str(work_dir / f"{name}-scenes"),
                "classes": "ade150",
                "image_suffix": "_image.png",
                "mask_suffix": "_mask.png",
            },
            "stages": stages,
            "output": {"url": str(work_dir / f"{name}-out"), "shard_size": shard_size, "image_format": "jpg"},
        }
    )
    with BusySampler() as busy:
        started = time.perf_counter()
        index = run_job(spec, overwrite=True)
        seconds = time.perf_counter() - started
    stats = sorted((s for _, s in OutputStore.at(spec.output).iter_stats()), key=lambda s: s["finished"])
    rows = sum(s["samples"] + s["rejected"] for s in stats)
    span = stats[-1]["finished"] - stats[0]["finished"]
    later = stats[1:]
    steady = sum(s["samples"] + s["rejected"] for s in later) / span if span > 0.05 else None
    steady_sources = sum(s["sources"] for s in later) / span if span > 0.05 else None
    slowest = min(stage_rates.items(), key=lambda kv: kv[1]) if stage_rates else None
    return {
        "name": name,
        "stages": [s.get("name") or s["kind"] for s in stages],
        "sources": count,
        "size": size,
        "shards": len(stats),
        "complete": index["complete"],
        "samples": index["samples"],
        "rejected": index["rejected"],
        "failed": index["failed"],
        "seconds": round(seconds, 2),
        "samples_per_s_wall": round(rows / seconds, 4),
        "samples_per_s_steady": significant(steady),
        "sources_per_s_steady": significant(steady_sources),
        "slowest_stage": slowest and slowest[0],
        "ratio_to_slowest_stage": round(steady_sources / slowest[1], 3) if slowest and steady_sources else None,
        "gpu_busy_fraction": busy.fraction,
        "resources": {s.get("name") or s["kind"]: s.get("resources", {}) for s in stages},
    }
