"""`factory eval SPEC`: does the synthetic data help? Train a segmenter on real data only and on each
mix, with N seeds each, and measure mIoU on a held-out real split that no arm trains on.

Each (arm, seed) run starts from the same weights for a given seed (torch seeded by it) and reads the
same real data order, so an arm's difference to real-only is paired by seed: the report gives each
arm's mean +- std mIoU over seeds and the paired difference with a 95% t-interval. Runs execute on Ray
Train (a TorchTrainer; data-parallel over `num_workers`, GPUs with `use_gpu`), one after another inside
one fit, or `runs_at_once` side by side, a worker each; each run's result goes to the output as it
finishes, and a rerun skips finished runs.

Output (local path or fsspec URL):
    eval-spec.json                the spec and its hash: a rerun with another spec is refused
    eval.json                     spec hash, per arm: mIoU per seed, mean, std, difference to real-only
    eval.png                      mean +- std per arm, and the paired differences with their intervals
    runs/ARM-seedS.json           one run: mIoU, per-class IoU, steps, seconds
    models/real-only-seedS.pt     the baseline's weights (SENSE arms use it as their teacher)
"""

from __future__ import annotations

import io
import json
import logging
import math

import numpy as np

from factory.downstream.eval_spec import BASELINE, EvalSpec, load_eval_spec, same_data, with_absolute_paths
from factory.ray_train import fit_on_ray
from factory.schema import SpecError
from factory.sources.spec import SourceSpec
from factory.storage import Folder

log = logging.getLogger("factory")

SPEC_RECORD = "eval-spec.json"


def check_heldout(spec: EvalSpec) -> None:
    """No arm's synthetic data was made from the held-out split (its images would leak into training)."""

    for i, arm in enumerate(spec.arms):
        for j, inp in enumerate(arm.synthetic):
            source = SourceSpec.model_validate(inp.store().read_manifest()["spec"]["source"])
            if same_data(source, spec.heldout):
                raise SpecError(
                    f"arms[{i}].synthetic[{j}].url: {inp.url} was made from the held-out split "
                    f"({spec.heldout.path}); an arm may not train on it"
                )


# ---------------------------------------------------------------- metrics


def paired_difference(arm: list[float], base: list[float], level: float = 0.95) -> dict:
    """Mean of the per-seed differences arm - base, with its two-sided t-interval."""
    from scipy import stats

    d = np.asarray(arm) - np.asarray(base)
    mean, sd = float(d.mean()), float(d.std(ddof=1))
    half = float(stats.t.ppf(0.5 + level / 2, len(d) - 1) * sd / math.sqrt(len(d)))
    return {"mean": mean, "std": sd, "low": mean - half, "high": mean + half, "level": level, "per_seed": d.tolist()}


def summarize(spec: EvalSpec, results: dict[tuple[str, int], dict]) -> dict:
    """eval.json's content from the finished runs."""
    base = [results[(BASELINE, s)]["miou"] for s in range(spec.seeds)]
    arms = {}
    for name in [BASELINE, *(a.name for a in spec.arms)]:
        values = [results[(name, s)]["miou"] for s in range(spec.seeds)]
        arms[name] = {
            "miou": values,
            "mean": float(np.mean(values)),
            "std": float(np.std(values, ddof=1)),
            "vs_real_only": None if name == BASELINE else paired_difference(values, base),
        }
    return {
        "name": spec.name,
        "spec_hash": spec.content_hash(),
        "seeds": spec.seeds,
        "segmenter": spec.segmenter.kind,
        "steps": spec.train.steps,
        "arms": arms,
    }


def arm_line(name: str, arm: dict, seeds: int) -> str:
    line = f"{name:<20} mIoU {arm['mean']:.3f} +- {arm['std']:.3f} ({seeds} seeds)"
    d = arm["vs_real_only"]
    if d is not None:
        line += f"   vs {BASELINE}: {d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}] 95%"
    return line


# ---------------------------------------------------------------- the driver


def check_eval(spec: EvalSpec) -> EvalSpec:
    """The spec with absolute paths, after checking its inputs: every output readable, labelled with the
    real data's classes, its selection present, none made from the held-out split."""
    from factory.downstream.mix import check_inputs

    spec = with_absolute_paths(spec)
    check_heldout(spec)
    for arm in spec.arms:
        check_inputs(spec.mix(arm.name, 0))
    return spec


def run_eval(spec: EvalSpec, address: str | None = None) -> dict:
    """Run every pending (arm, seed), then write eval.json and eval.png; return eval.json's content."""
    from factory.downstream.eval_worker import run_path

    spec = check_eval(spec)
    out = Folder.at(spec.output)
    out.ensure_root()
    record = out.read_json(SPEC_RECORD)
    if record is not None and record["spec_hash"] != spec.content_hash():
        raise SpecError(
            f"{spec.output.url} holds results of another eval spec (hash {record['spec_hash']}, this "
            f"one {spec.content_hash()}); give another output.url"
        )
    out.write_bytes(
        json.dumps({"spec_hash": spec.content_hash(), "spec": spec.model_dump(mode="json")}, indent=1).encode(),
        SPEC_RECORD,
    )

    def done() -> dict[tuple[str, int], dict]:
        found = {run: out.read_json(*run_path(*run)) for run in spec.runs()}
        return {run: r for run, r in found.items() if r is not None}

    pending = [run for run in spec.runs() if run not in done()]
    log.info("eval %s: %d runs, %d to do -> %s", spec.name, len(spec.runs()), len(pending), spec.output.url)
    if pending:
        fit_on_ray(
            _eval_worker_entry,
            {"spec": spec.model_dump(mode="json"), "pending": pending},
            spec,
            f"eval-{spec.name}",
            address,
            spec.workers(),
        )
    summary = summarize(spec, done())
    out.write_bytes(json.dumps(summary, indent=1).encode(), "eval.json")
    out.write_bytes(plot(summary), "eval.png")
    return summary


def _eval_worker_entry(config: dict) -> None:
    from factory.downstream.eval_worker import eval_worker

    eval_worker(config)


def plot(summary: dict) -> bytes:
    """PNG: mIoU per arm (mean +- std, each seed a dot) and each arm's paired difference to real-only."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary["arms"])
    arms = [summary["arms"][n] for n in names]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 0.9 + 0.5 * len(names)))
    y = np.arange(len(names))
    left.barh(y, [a["mean"] for a in arms], xerr=[a["std"] for a in arms], color="#4c72b0", alpha=0.7, capsize=3)
    for i, a in enumerate(arms):
        left.plot(a["miou"], [i] * len(a["miou"]), "k.", markersize=5)
    left.set_yticks(y, names)
    left.invert_yaxis()
    left.set_xlabel(f"held-out mIoU (mean +- std over {summary['seeds']} seeds)")
    diffs = [a["vs_real_only"] for a in arms]
    for i, d in enumerate(diffs):
        if d is not None:
            colour = "#4c9a5e" if d["low"] > 0 else "#c44e52" if d["high"] < 0 else "#777777"
            right.errorbar(
                d["mean"], i, xerr=[[d["mean"] - d["low"]], [d["high"] - d["mean"]]], fmt="o", color=colour, capsize=4
            )
    right.axvline(0, color="black", linewidth=0.8)
    right.set_yticks(y, names)
    right.set_ylim(left.get_ylim())
    right.set_xlabel(f"mIoU - {BASELINE} (paired by seed, 95% interval)")
    fig.suptitle(f"factory eval {summary['name']}: {summary['segmenter']}, {summary['steps']} steps", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def main_eval(spec_path: str, address: str | None = None, check_only: bool = False) -> int:
    """`factory eval SPEC [--check]`: run it (or resume it), print one line per arm."""
    spec = load_eval_spec(spec_path)
    if check_only:
        check_eval(spec)
        print(
            f"{spec_path}: ok (eval {spec.name}: {len(spec.arms)} arms + {BASELINE}, {spec.seeds} seeds, "
            f"spec hash {spec.content_hash()})"
        )
        return 0
    summary = run_eval(spec, address)
    for name, arm in summary["arms"].items():
        print(arm_line(name, arm, summary["seeds"]))
    print(f"results: {spec.output.url}/eval.json, plot: {spec.output.url}/eval.png")
    return 0
