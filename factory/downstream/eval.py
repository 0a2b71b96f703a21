"""`factory eval SPEC`: does the synthetic data help? Train a segmenter on real data only and on each
mix, with N seeds each, and measure mIoU on a held-out real split that no arm trains on.

Each (arm, seed) run starts from the same weights for a given seed (torch seeded by it) and reads the
same real data order, so an arm's difference to real-only is paired by seed: the report gives each
arm's mean +- std mIoU over seeds and the paired difference with a 95% t-interval. Runs execute on Ray
Train (a TorchTrainer; data-parallel over `num_workers`, GPUs with `use_gpu`), one after another inside
one fit; rank 0 writes each run's result to the output as it finishes, and a rerun skips finished runs.

Output (local path or fsspec URL):
    eval.json                     spec hash, per arm: mIoU per seed, mean, std, difference to real-only
    eval.png                      mean +- std per arm, and the paired differences with their intervals
    runs/ARM-seedS.json           one run: mIoU, per-class IoU, steps, seconds
    models/real-only-seedS.pt     the baseline's weights (SENSE arms use it as their teacher)
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from factory.downstream.mix import MixSpec, Strategy, SyntheticInput
from factory.schema import validated
from factory.downstream.segmenter import SegmenterConfig
from factory.sources.spec import SourceSpec
from factory.schema import SpecError, read_yaml
from factory.seggen.train import TrainOutput, fit_on_ray

log = logging.getLogger("factory")

BASELINE = "real-only"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EvalArm(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$", description="arm name: letters, digits, - and _")
    synthetic: list[SyntheticInput] = Field(min_length=1, description="factory outputs this arm mixes in")
    strategy: Strategy
    teacher_threshold: float = Field(0.9, ge=0, le=1, description="sense: confidence a pseudo-label pixel needs")


class EvalTrain(_Strict):
    steps: int = Field(2000, gt=0, description="optimizer steps per run")
    batch_size: int = Field(16, gt=0, description="samples per step per worker")
    lr: float = Field(1e-3, gt=0, description="AdamW learning rate, decayed by the poly rule (power 0.9)")
    weight_decay: float = Field(1e-4, ge=0)
    resize: int | None = Field(None, gt=0, description="short side resized to this (train and held-out)")
    crop: int | None = Field(None, gt=0, description="random square training crop")
    flip: bool = True
    photometric: bool = Field(False, description="random channel order, per-channel contrast and brightness")
    shuffle_buffer: int = Field(256, gt=0)
    mixed_precision: Literal["no", "bf16"] = Field("bf16", description="autocast on GPU (a CPU trains in fp32)")
    loader_workers: int = Field(2, ge=0, description="DataLoader processes per worker")


class EvalSpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
    seeds: int = Field(3, ge=2, description="runs per arm (at least 2, for an interval)")
    real: SourceSpec = Field(description="the real training data every arm uses")
    heldout: SourceSpec = Field(description="the held-out real split mIoU is measured on; no arm trains on it")
    arms: list[EvalArm] = Field(min_length=1, description="mixes compared with real-only")
    segmenter: SegmenterConfig = Field(default_factory=SegmenterConfig)
    train: EvalTrain = Field(default_factory=EvalTrain)
    eval_batch_size: int = Field(16, gt=0)
    num_workers: int = Field(1, gt=0, description="Ray Train workers (one GPU each with use_gpu)")
    use_gpu: bool = False
    cpus_per_worker: float = Field(1, gt=0)
    output: TrainOutput = Field(description="where results go: path or fsspec URL")

    @model_validator(mode="after")
    def _checks(self):
        names = [a.name for a in self.arms]
        if BASELINE in names or len(set(names)) != len(names):
            raise ValueError(f"arms: names must be unique and not {BASELINE!r} (the baseline every spec has)")
        if _same_data(self.real, self.heldout):
            raise ValueError("heldout: is the training data itself (same kind, path and split)")
        if self.segmenter.kind.startswith("deeplabv3") and self.train.batch_size < 2:
            raise ValueError("train.batch_size: DeepLabV3's image-pooling batch norm needs at least 2 images "
                             "per worker")
        return self

    def content_hash(self) -> str:
        """What decides the results; where they go and how they are computed (workers, GPUs) may change."""
        data = self.model_dump(mode="json", exclude={"output", "num_workers", "use_gpu", "cpus_per_worker"})
        data["train"].pop("loader_workers")
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    def runs(self) -> list[tuple[str, int]]:
        """(arm, seed) in order: per seed the baseline first (a SENSE arm's teacher)."""
        return [(arm, seed) for seed in range(self.seeds) for arm in [BASELINE, *(a.name for a in self.arms)]]

    def mix(self, arm: str, seed: int) -> MixSpec:
        t = self.train
        common = {"real": self.real, "batch_size": t.batch_size, "seed": seed, "resize": t.resize, "crop": t.crop,
                  "flip": t.flip, "photometric": t.photometric, "shuffle_buffer": t.shuffle_buffer}
        if arm == BASELINE:
            return MixSpec(strategy={"kind": "real"}, **common)
        chosen = next(a for a in self.arms if a.name == arm)
        return MixSpec(synthetic=chosen.synthetic, strategy=chosen.strategy, **common)


def _same_data(a: SourceSpec, b: SourceSpec) -> bool:
    def where(s):
        return s.kind, s.path.rstrip("/"), s.split, s.image_suffix, s.mask_suffix

    return where(a) == where(b)


def parse_eval_spec(data: Any, origin: str = "spec") -> EvalSpec:
    return validated(EvalSpec, data, origin)


def load_eval_spec(path: str | Path) -> EvalSpec:
    return parse_eval_spec(read_yaml(path), origin=str(path))


def check_heldout(spec: EvalSpec) -> None:
    """No arm's synthetic data was made from the held-out split (its images would leak into training)."""

    for i, arm in enumerate(spec.arms):
        for j, inp in enumerate(arm.synthetic):
            source = SourceSpec.model_validate(inp.store().read_manifest()["spec"]["source"])
            if _same_data(source, spec.heldout):
                raise SpecError(f"arms[{i}].synthetic[{j}].url: {inp.url} was made from the held-out split "
                                f"({spec.heldout.path}); an arm may not train on it")


# ---------------------------------------------------------------- metrics


def confusion(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    """(C, C) counts, rows = ground truth, columns = prediction; ignore pixels left out."""
    keep = target != ignore_index
    index = target[keep].long() * num_classes + pred[keep].long()
    return torch.bincount(index, minlength=num_classes**2).reshape(num_classes, num_classes)


def class_iou(conf: torch.Tensor) -> dict[int, float]:
    """IoU of each class present in the ground truth (the mmseg convention: a class the held-out split
    lacks is not scored, but predicting it costs the classes whose pixels it took)."""
    conf = conf.double()
    tp, gt, pred = conf.diag(), conf.sum(1), conf.sum(0)
    return {int(c): float(tp[c] / (gt[c] + pred[c] - tp[c])) for c in torch.nonzero(gt > 0).flatten()}


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
        arms[name] = {"miou": values, "mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)),
                      "vs_real_only": None if name == BASELINE else paired_difference(values, base)}
    return {"name": spec.name, "spec_hash": spec.content_hash(), "seeds": spec.seeds, "segmenter": spec.segmenter.kind,
            "steps": spec.train.steps, "arms": arms}


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

    spec = _with_absolute_paths(spec)
    check_heldout(spec)
    for arm in spec.arms:
        check_inputs(spec.mix(arm.name, 0))
    return spec


def run_eval(spec: EvalSpec, address: str | None = None) -> dict:
    """Run every pending (arm, seed), then write eval.json and eval.png; return eval.json's content."""
    from factory.downstream.eval_worker import run_path

    spec = check_eval(spec)
    fs, root = spec.output.filesystem()
    fs.makedirs(root, exist_ok=True)
    record = _read_json(fs, f"{root}/eval-spec.json")
    if record is not None and record["spec_hash"] != spec.content_hash():
        raise SpecError(f"{spec.output.url} holds results of another eval spec (hash {record['spec_hash']}, this "
                        f"one {spec.content_hash()}); give another output.url")
    fs.pipe_file(f"{root}/eval-spec.json", json.dumps(
        {"spec_hash": spec.content_hash(), "spec": spec.model_dump(mode="json")}, indent=1).encode())

    def done() -> dict[tuple[str, int], dict]:
        fs.invalidate_cache()
        found = {run: _read_json(fs, "/".join([root, *run_path(*run)])) for run in spec.runs()}
        return {run: r for run, r in found.items() if r is not None}

    pending = [run for run in spec.runs() if run not in done()]
    log.info("eval %s: %d runs, %d to do -> %s", spec.name, len(spec.runs()), len(pending), spec.output.url)
    if pending:
        fit_on_ray(_eval_worker_entry, {"spec": spec.model_dump(mode="json"), "pending": pending}, spec,
                   f"eval-{spec.name}", address)
    summary = summarize(spec, done())
    fs.pipe_file(f"{root}/eval.json", json.dumps(summary, indent=1).encode())
    fs.pipe_file(f"{root}/eval.png", plot(summary))
    return summary


def _eval_worker_entry(config: dict) -> None:
    from factory.downstream.eval_worker import eval_worker

    eval_worker(config)


def _read_json(fs, path: str) -> dict | None:
    try:
        with fs.open(path, "rb") as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def _with_absolute_paths(spec: EvalSpec) -> EvalSpec:
    """Local relative paths made absolute: the workers may run in another directory."""
    def absolute(path: str | None) -> str | None:
        return path if path is None or "://" in path else str(Path(path).expanduser().resolve())

    arms = [arm.model_copy(update={"synthetic": [s.model_copy(update={"url": absolute(s.url)})
                                                 for s in arm.synthetic]}) for arm in spec.arms]
    return spec.model_copy(update={
        "real": spec.real.model_copy(update={"path": absolute(spec.real.path)}),
        "heldout": spec.heldout.model_copy(update={"path": absolute(spec.heldout.path)}),
        "arms": arms,
        "segmenter": spec.segmenter.model_copy(update={"backbone_checkpoint": absolute(spec.segmenter.backbone_checkpoint)}),
        "output": spec.output.model_copy(update={"url": absolute(spec.output.url)}),
    })


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
            right.errorbar(d["mean"], i, xerr=[[d["mean"] - d["low"]], [d["high"] - d["mean"]]], fmt="o",
                           color=colour, capsize=4)
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
        print(f"{spec_path}: ok (eval {spec.name}: {len(spec.arms)} arms + {BASELINE}, {spec.seeds} seeds, "
              f"spec hash {spec.content_hash()})")
        return 0
    summary = run_eval(spec, address)
    for name, arm in summary["arms"].items():
        print(arm_line(name, arm, summary["seeds"]))
    print(f"results: {spec.output.url}/eval.json, plot: {spec.output.url}/eval.png")
    return 0
