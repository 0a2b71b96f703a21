"""Balanced pools: how to split N GPUs between a recipe's stages so that no stage starves another.

`factory plan-resources SPEC --gpus N` takes each GPU stage's rate on one whole GPU (output rows per
second, from a `bench/bench_gpu.py` JSON via `--rates`, or measured by a short calibration run of the
spec itself) and the spec's expansion factors, and prints the pool that balances the stages.

The arithmetic, per source sample of the dataset:
- stage s sees E_s rows per source (the product of the K of the stages before it) and makes E_s x K_s;
- on one GPU it makes r_s rows/s, so it costs g_s = E_s x K_s / r_s GPU-seconds per source;
- a pipeline of N GPUs in balance gives each stage the share g_s / sum(g) of them and runs
  N / sum(g) sources/s, that is N x rows_out / sum(g) output samples/s, rows_out = the product of all K;
- a stage's share f_s GPUs becomes ceil(f_s) actors (no more model copies than it needs) of
  f_s / ceil(f_s) GPU each, rounded up to 0.01, so every stage gets at least its share;
- Ray places an actor asking for a fraction of a GPU on one GPU, never split across two, so fractions
  that sum under N need not fit on N whole GPUs (1 x 0.07, 7 x 0.94 and 2 x 0.66 on 8 GPUs place 9 of
  the 10 actors): the actors are packed onto the N GPUs first-fit decreasing, and while some actor finds
  no room every share is scaled down by 1% and the pools are rebuilt. The plan reports the packing it
  found and the sources/s its pools reach (the slowest stage's), below the balanced rate when shrunk.
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


# One GPU's actors: (stage label, GPU fraction) each.
Card = list[tuple[str, float]]


@dataclass(frozen=True)
class ResourcePlan:
    gpus: int
    stages: list[StagePlan]
    sources_per_second: float  # what the packed pools reach: the slowest stage's rate
    samples_per_second: float
    rows_per_source: float
    sources: int | None
    hours: float | None
    scale: float  # the share of each balanced GPU share the pools got so that every actor packs (1 = all)
    packing: list[Card]  # per GPU, the actors placed on it

    def to_json(self) -> dict:
        return {
            "gpus": self.gpus,
            "sources_per_second": self.sources_per_second,
            "samples_per_second": self.samples_per_second,
            "rows_per_source": self.rows_per_source,
            "sources": self.sources,
            "hours": self.hours,
            "scale": self.scale,
            "stages": [vars(s) for s in self.stages],
            "packing": [[{"stage": label, "gpus": share} for label, share in card] for card in self.packing],
        }


def pack(actors: list[tuple[str, float]], gpus: int) -> tuple[list[Card], list[tuple[str, float]]]:
    """(per GPU, unplaced): each (label, GPU fraction) actor, largest first, on the first of `gpus` whole
    GPUs with room left for it: one actor stays on one GPU, as Ray places it."""
    cards: list[Card] = [[] for _ in range(gpus)]
    free = [1.0] * gpus
    unplaced = []
    for actor in sorted(actors, key=lambda a: -a[1]):
        i = next((i for i, room in enumerate(free) if actor[1] <= room + 1e-9), None)
        if i is None:
            unplaced.append(actor)
            continue
        cards[i].append(actor)
        free[i] -= actor[1]
    return cards, unplaced


def _pools(shares: dict[str, float], scale: float) -> dict[str, tuple[int, float]]:
    """(actors, GPU per actor) of each stage given `scale` x its share: ceil(share) actors, so none asks
    for more than one GPU, each fraction rounded up to 0.01 (the packing, not the rounding, makes them fit)."""
    pools = {}
    for label, share in shares.items():
        want = scale * share
        actors = max(1, math.ceil(want - 1e-9))
        pools[label] = (actors, math.ceil(want / actors * 100 - 1e-9) / 100)
    return pools


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
    shares = {p[0]: gpus * p[5] / total for p in partial if p[4] is not None}
    for step in range(100, 0, -1):
        pools = _pools(shares, step / 100)
        packing, unplaced = pack([(label, f) for label, (n, f) in pools.items() for _ in range(n)], gpus)
        if not unplaced:
            break
    else:
        raise ValueError(f"the {len(shares)} GPU stages' actors do not fit on {gpus} GPUs even at 0.01 GPU each")
    stages = []
    per_second = math.inf
    for label, kind, rows_in, k, rate, cost, mem in partial:
        actors, per_actor = pools.get(label, (0, 0.0))
        if rate is not None:  # a GPU stage makes (its GPUs / its GPU-seconds per source) sources/s
            per_second = min(per_second, actors * per_actor / cost)
        share = round(shares.get(label, 0.0), 4)
        stages.append(StagePlan(label, kind, rows_in, k, rate, round(cost, 6), share, actors, per_actor, mem))
    return ResourcePlan(
        gpus,
        stages,
        round(per_second, 6),
        round(per_second * rows, 6),
        rows,
        sources,
        round(sources / per_second / 3600, 3) if sources else None,
        step / 100,
        packing,
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
    if p.scale < 1:
        lines.append(
            f"the balanced shares do not pack onto {p.gpus} whole GPUs: every pool got {p.scale:.0%} of its share"
        )
    for i, card in enumerate(p.packing):
        actors = ", ".join(f"{label} {share:.2f}" for label, share in card) or "-"
        lines.append(f"GPU {i}: {actors} ({sum(share for _, share in card):.2f} used)")
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
