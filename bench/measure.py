"""Measuring helpers for `bench/bench_gpu.py`: a stage alone, a training step, a whole recipe through the engine.

Every figure is measured by the code here, on the machine it runs on: rates are timed calls after a
warm-up call, FLOPs are counted by `torch.utils.flop_counter.FlopCounterMode` on the warm-up call (null,
with the reason, where the counter cannot trace a call), MFU is achieved FLOP/s over the GPU's dense bf16
peak, memory is the peak of the tensors, of the allocator's reserved pool, and what an actor needs (that
pool plus the CUDA context), and the GPU busy fraction is NVML's utilisation sampled while a recipe's
shards commit. On a CPU the same code runs (tiny models) and the GPU-only figures are null.
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


def peak_memory() -> dict:
    """Since the last `reset_memory`: the tensors' peak, the allocator's reserved pool at its peak, and what
    an actor of this workload needs on its GPU: that pool plus the CUDA context and its libraries (the
    device's use beyond this process's pool, as the driver reports it; other processes count too)."""
    import torch

    if not torch.cuda.is_available():
        return {"peak_memory_gib": None, "peak_reserved_gib": None, "actor_memory_gib": None}
    free, total = torch.cuda.mem_get_info()
    context = total - free - torch.cuda.memory_reserved()
    reserved = torch.cuda.max_memory_reserved()
    return {
        "peak_memory_gib": memory_gib(),
        "peak_reserved_gib": round(reserved / 2**30, 2),
        "actor_memory_gib": round((reserved + context) / 2**30, 2),
    }


def out_of_memory(exc: BaseException) -> bool:
    """CUDA ran out of memory: torch's own error, or a cuBLAS/cuDNN workspace allocation that failed, which
    torch raises as a plain RuntimeError named only by its message."""
    import torch

    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(
        code in text for code in ("CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED", "out of memory")
    )


def _torch_modules(stage, depth: int = 3) -> list:
    """The torch modules a stage holds: in its attributes, their attributes and pipelines' components,
    `depth` levels down (an embedder object holding a model, a pipeline holding a UNet), and in the dicts,
    lists and tuples among them (the t2i stage keeps one pipeline per generator in a dict). A module held
    twice (a pipeline also named as the current one) is counted once."""
    import torch

    found: dict[int, Any] = {}
    opened: set[int] = set()  # containers already looked into (one may hold another, or itself)
    level = [stage]
    for _ in range(depth):
        below = []
        for holder in level:
            values = list(vars(holder).values()) if hasattr(holder, "__dict__") else []
            if isinstance(getattr(holder, "components", None), dict):
                values += list(holder.components.values())
            while values:
                value = values.pop()
                if isinstance(value, torch.nn.Module):
                    found[id(value)] = value
                elif isinstance(value, dict | list | tuple):
                    if id(value) not in opened:
                        opened.add(id(value))
                        values += list(value.values()) if isinstance(value, dict) else list(value)
                elif hasattr(value, "__dict__") and not isinstance(value, type):
                    below.append(value)
        level = below
    return list(found.values())


def counted(fn) -> tuple[Any, int | None, str | None]:
    """(fn(), FLOPs it ran, None), counted by torch's FlopCounterMode (matmuls, convolutions, attention); or
    (fn(), None, why) where the counter cannot trace the call (an operator it does not know on this torch,
    e.g. SDPA with `enable_gqa`): the call runs again uncounted, and its figures stay without FLOPs."""
    from torch.utils.flop_counter import FlopCounterMode

    try:
        with FlopCounterMode(display=False) as counter:
            result = fn()
        return result, counter.get_total_flops(), None
    except Exception as e:
        if out_of_memory(e):
            raise
        return fn(), None, f"FLOPs not counted: {type(e).__name__}: {e}"[:300]


class BusySampler:
    """NVML GPU utilisation sampled every `every` s over a `with` block, as (time.time(), percent) pairs;
    `fraction(start, end)` is their mean inside a window. Empty without NVML or a GPU."""

    def __init__(self, every: float = 0.2):
        self.every, self.samples = every, []
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
            self.samples.append((time.time(), pynvml.nvmlDeviceGetUtilizationRates(self._handle).gpu))

    def __enter__(self):
        if self._handle is not None:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self._handle is not None:
            self._stop.set()
            self._thread.join()

    def fraction(self, start: float, end: float) -> float | None:
        inside = [busy for t, busy in self.samples if start <= t <= end]
        return round(float(np.mean(inside)) / 100, 3) if inside else None


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
    # What the run's plan estimates from (bench_gpu.estimate_s), at real sizes; never reported as measured.
    est_tflop_per_call: float | None = None  # FLOPs of one process() call, from counted per-model FLOPs
    est_weights_gib: float = 0.0  # the weights built and moved to the GPU before the first call
    est_min_call_s: float = 0.0  # a floor per call where decoding token by token bounds it, not FLOPs


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
    uncounted = None
    if count_flops:
        out, flops, uncounted = counted(lambda: stage.process(warm))
        flops_per_image = flops / len(out) if out and flops is not None else None
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
        **peak_memory(),
        "load_s": round(load_s, 2),
        "first_call_s": round(first_s, 2),
        # With torch.compile the first call compiles: its excess over a steady call is the compile time.
        "compile_s": round(first_s - per_call, 2)
        if getattr(getattr(stage.model, "speed", None), "compile", None)
        else None,
        "model": w.model,
        "params": w.params,
        "note": w.note,
        "flops_note": uncounted,
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
    `batch_sizes` that fits: the models are built once, then batches are tried largest first, and one that
    runs out of memory (torch's error, or a cuBLAS/cuDNN allocation) frees its gradients and optimizer
    state and moves on to the next."""
    import torch

    from factory.seggen.models import TrainingModels
    from factory.seggen.spec import TrainModel

    reset_memory()
    models = TrainingModels(kind, TrainModel(profile=profile), mixed_precision, torch.device(device), None)
    trainable = sum(p.numel() for p in models.trainable.parameters())
    tried = []
    for size in sorted(batch_sizes, reverse=True):
        optimizer = torch.optim.AdamW(models.trainable.parameters(), lr=1e-5)
        batch = training_batch(kind, size, resolution)

        def step(n: int):
            loss = models.loss(models.trainable, batch, torch.Generator().manual_seed(n))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        try:
            _, flops, uncounted = counted(lambda: step(0))
            sync()
            started = time.perf_counter()
            for n in range(steps):
                step(n + 1)
            sync()
            seconds = time.perf_counter() - started
        except Exception as e:
            if not out_of_memory(e):
                raise
            tried.append(size)
            optimizer.zero_grad(set_to_none=True)
            optimizer = batch = None
            reset_memory()
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
            "tflop_per_step": significant(flops / 1e12) if flops is not None else None,
            **throughput(flops * steps if flops is not None else None, seconds, peak),
            "trainable_params_m": round(trainable / 1e6, 1),
            **peak_memory(),
            "flops_note": uncounted,
        }
        del models, optimizer, batch
        reset_memory()
        return result
    del models
    reset_memory()
    return {"kind": kind, "resolution": resolution, "batch": None, "out_of_memory_at": tried}


# ---------------------------------------------------------------- a whole recipe through the engine


def measure_recipe(
    name: str, stages: list[dict], count: int, size: int, shard_size: int, work_dir, stage_rates: dict[str, float]
) -> dict:
    """A recipe run by `factory.engine.driver.run_job` on procedural scenes: wall and steady samples/s, the ratio of
    its sources/s to what its stages allow on one shared GPU (`stage_rates`: each GPU stage's sources/s alone
    on the whole GPU), GPU busy fraction while shards commit.

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
    # The stages share one GPU: a source costs each of them 1/rate seconds of the whole GPU, so the most the
    # recipe can reach is one over their sum (and less than the slowest stage alone).
    bound = 1 / sum(1 / rate for rate in stage_rates.values()) if stage_rates else None
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
        "shared_gpu_bound_sources_per_s": significant(bound),
        "ratio_to_shared_gpu_bound": round(steady_sources / bound, 3) if bound and steady_sources else None,
        # Between the first and the last commit: actor start-up and model loading left out, as above.
        "gpu_busy_fraction": busy.fraction(stats[0]["finished"], stats[-1]["finished"]),
        "resources": {s.get("name") or s["kind"]: s.get("resources", {}) for s in stages},
    }
