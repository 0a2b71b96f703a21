"""Balanced pools: how to split N GPUs between a recipe's stages so that no stage starves another.

`factory plan-resources SPEC --gpus N` takes each GPU stage's rate on one whole GPU (output rows per
second, from a `bench/bench_gpu.py` JSON via `--rates`, or measured by a short calibration run of the
spec itself) and the spec's expansion factors, and prints the pool that balances the stages.

The arithmetic, per source sample of the dataset:
- stage s sees E_s rows per source (the product of the K of the stages before it) and makes E_s x K_s;
- on one GPU it makes r_s rows/s, so it costs g_s = E_s x K_s / r_s GPU-seconds per source;
- a pipeline of N GPUs in balance gives each stage the share g_s / sum(g) of them and runs
  N / sum(g) sources/s, that is N x rows_out / sum(g) output samples/s, rows_out = the product of all K;
- a stage's share f_s GPUs becomes ceil(f_s) actors of f_s / ceil(f_s) GPU each (Ray packs fractional
  actors of different stages onto the same cards), fractions rounded down to 0.01 so the pools fit.
Stages without a GPU (`prompt`, `keep`) are left out of the split. Rejections and failures are ignored:
the figures are for every row surviving, an upper bound on the work.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

from factory.engine.spec import JobSpec
from factory.schema import SpecError
from factory.stages import StageContext, resolve_stage


@dataclass(frozen=True)
class StagePlan:
    label: str
    kind: str
    rows_in: float  # rows per source entering the stage (E_s)
    k: int  # rows out per row in (K_s)
    rate: float | None  # output rows/s on one GPU; None for CPU stages
    gpu_seconds: float  # per source
    gpus: float = 0.0  # balanced share
    actors: int = 0
    gpus_per_actor: float = 0.0
    memory_gib: float | None = None  # peak GPU memory of one actor, when the rates say


@dataclass(frozen=True)
class ResourcePlan:
    gpus: int
    stages: list[StagePlan]
    sources_per_second: float
    samples_per_second: float
    rows_per_source: float
    sources: int | None
    hours: float | None

    def to_json(self) -> dict:
        return {
            "gpus": self.gpus,
            "sources_per_second": self.sources_per_second,
            "samples_per_second": self.samples_per_second,
            "rows_per_source": self.rows_per_source,
            "sources": self.sources,
            "hours": self.hours,
            "stages": [vars(s) for s in self.stages],
        }


def stage_shapes(spec: JobSpec, classes) -> list[tuple[str, str, int, bool]]:
    """(label, kind, K, is a model stage) of every stage, built without models. Model stages are balanced
    whatever GPUs the spec gives them now: the plan says what to give them."""
    out = []
    for st in spec.stages:
        cls = resolve_stage(st.kind)
        stage = cls(
            cls.Params.model_validate(st.params),
            cls.Model.model_validate(st.model),
            StageContext(label=st.label, job_seed=spec.seed, classes=classes, device="cpu"),
        )
        out.append((st.label, st.kind, stage.variants_per_input(), cls.uses_gpu))
    return out


def plan(
    shapes: list[tuple[str, str, int, bool]],
    rates: dict[str, float],
    gpus: int,
    sources: int | None = None,
    memory: dict[str, float] | None = None,
) -> ResourcePlan:
    """The balanced plan; `rates` maps a stage label (or kind) to output rows/s on one GPU."""
    if gpus < 1:
        raise ValueError("--gpus must be at least 1")
    memory = memory or {}
    rows, partial = 1.0, []
    for label, kind, k, on_gpu in shapes:
        rate = rates.get(label, rates.get(kind)) if on_gpu else None
        if on_gpu and (rate is None or rate <= 0):
            raise ValueError(f"no rate for GPU stage {label!r} (kind {kind}); known: {sorted(rates)}")
        cost = rows * k / rate if rate is not None else 0.0  # only GPU stages have a rate (checked above)
        partial.append((label, kind, rows, k, rate, cost, memory.get(label, memory.get(kind))))
        rows *= k
    total = sum(p[5] for p in partial)
    if total == 0:
        raise ValueError("the spec has no GPU stage to balance")
    stages = []
    for label, kind, rows_in, k, rate, cost, mem in partial:
        share = gpus * cost / total
        actors = max(1, math.ceil(share - 1e-9)) if rate is not None else 0
        per_actor = math.floor(share / actors * 100) / 100 if actors else 0.0
        stages.append(
            StagePlan(
                label,
                kind,
                rows_in,
                k,
                rate,
                round(cost, 6),
                round(share, 4),
                actors,
                max(per_actor, 0.01) if actors else 0.0,
                mem,
            )
        )
    per_second = gpus / total
    return ResourcePlan(
        gpus,
        stages,
        round(per_second, 6),
        round(per_second * rows, 6),
        rows,
        sources,
        round(sources / per_second / 3600, 3) if sources else None,
    )


# ---------------------------------------------------------------- rates


def rates_from_bench(path: str | Path) -> tuple[dict[str, float], dict[str, float]]:
    """(rows/s, peak GiB) per stage name and kind from a bench_gpu.py JSON (its `stages` list)."""
    data = json.loads(Path(path).read_text())
    rates: dict[str, float] = {}
    memory: dict[str, float] = {}
    for entry in data.get("stages", []):
        if entry.get("images_per_s"):
            for key in (entry["kind"], entry["name"]):
                rates.setdefault(key, entry["images_per_s"])
                if entry.get("peak_memory_gib") is not None:
                    memory.setdefault(key, entry["peak_memory_gib"])
    if not rates:
        raise ValueError(f"{path}: no stage rates (a bench/bench_gpu.py JSON has a `stages` list)")
    return rates, memory


def calibrate(spec: JobSpec, samples: int = 8) -> dict[str, float]:
    """Output rows/s of each model stage of the spec, run in this process on the first `samples` sources.

    Stages run one after another on the same rows, each through the engine's `StageRunner` (where the spec
    puts it: on a GPU with num_gpus > 0). The first batch of each stage is a warm-up that is not timed:
    model loading and compilation are left out.
    """
    import itertools

    from factory.engine.reader import ShardReader
    from factory.engine.records import ShardWork
    from factory.engine.runner import StageRunner
    from factory.sources import open_source

    source, engine = open_source(spec.source), spec.engine
    reader = ShardReader(spec.source.model_dump_json(), "", {}, engine.retries, engine.retry_backoff_s)
    ids = itertools.islice(source.list_ids(), samples)
    rows = [reader.load(source, 0, i, sample_id) for i, sample_id in enumerate(ids)]
    rates = {}
    for st in spec.stages:
        runner = StageRunner(
            st.model_dump(mode="json"), spec.seed, source.classes, engine.retries, engine.retry_backoff_s
        )
        size = st.resources.batch_size
        warm, timed = (runner.run(ShardWork(0, part, time.time())) for part in (rows[:size], rows[size:]))
        for work in (warm, timed):
            if work.failure is not None:
                raise RuntimeError(f"calibration: stage {st.label!r} failed: {work.failure.cause}")
        done = timed.stages[st.label].to_json()
        if runner.stage.uses_gpu:
            if not done["rows_out"]:
                raise SpecError(
                    f"calibration: stage {st.label!r} needs more than one batch of {size} live "
                    "samples to time; raise --samples"
                )
            rates[st.label] = done["rows_out"] / max(done["seconds"], 1e-9)
        rows = warm.samples + timed.samples
    return rates


def format_plan(p: ResourcePlan) -> str:
    lines = [
        f"{'stage':<16}{'kind':<14}{'rows in':>8}{'K':>4}{'rows/s/GPU':>12}{'GPU-s/src':>11}"
        f"{'GPUs':>7}{'actors':>8}{'GPU/actor':>10}"
    ]
    for s in p.stages:
        rate = f"{s.rate:.3f}" if s.rate is not None else "cpu"
        lines.append(
            f"{s.label:<16}{s.kind:<14}{s.rows_in:>8g}{s.k:>4}{rate:>12}{s.gpu_seconds:>11.4f}"
            f"{s.gpus:>7.2f}{s.actors:>8}{s.gpus_per_actor:>10.2f}"
        )
    lines.append(
        f"expected: {p.sources_per_second:.4f} sources/s, {p.samples_per_second:.4f} samples/s "
        f"({p.rows_per_source:g} rows per source) on {p.gpus} GPUs"
    )
    if p.hours is not None:
        lines.append(f"job: {p.sources} sources -> {p.hours:.2f} hours")
    return "\n".join(lines)


def main_plan_resources(
    spec: JobSpec, gpus: int, rates_file: str | None, sources: int | None, samples: int, as_json: bool
) -> int:
    from factory.sources import open_source

    source = open_source(spec.source)
    memory: dict[str, float] = {}
    if rates_file:
        rates, memory = rates_from_bench(rates_file)
    else:
        rates = calibrate(spec, samples)
    if sources is None:
        sources = sum(1 for _ in source.list_ids())
    result = plan(stage_shapes(spec, source.classes), rates, gpus, sources, memory)
    print(json.dumps(result.to_json(), indent=1) if as_json else format_plan(result))
    return 0
