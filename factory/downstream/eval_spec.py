"""The spec of `factory eval` (jobs/eval_*.yaml): the real data, a held-out split, the arms (mixes) to compare
with real-only, the segmenter and its training, the seeds."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from factory.downstream.mix_spec import MixSpec, Strategy, SyntheticInput
from factory.schema import StrictModel, absolute_path, read_yaml, validated
from factory.sources.spec import SourceSpec
from factory.storage import Location

BASELINE = "real-only"


class SegmenterConfig(StrictModel):
    kind: Literal[
        "unet",
        "fcn_resnet50",
        "fcn_resnet101",
        "deeplabv3_resnet50",
        "deeplabv3_resnet101",
        "deeplabv3_mobilenet_v3_large",
    ] = "unet"
    width: int = Field(16, gt=0, description="unet: channels of the first level (doubled at each level)")
    depth: int = Field(3, ge=1, le=6, description="unet: levels (the input is padded to a multiple of 2^depth)")
    backbone_checkpoint: str | None = Field(None, description="state dict for the backbone (path or fsspec URL)")
    storage_options: dict[str, Any] = Field(default_factory=dict)


class EvalArm(StrictModel):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$", description="arm name: letters, digits, - and _")
    synthetic: list[SyntheticInput] = Field(min_length=1, description="factory outputs this arm mixes in")
    strategy: Strategy
    teacher_threshold: float = Field(0.9, ge=0, le=1, description="sense: confidence a pseudo-label pixel needs")


class EvalTrain(StrictModel):
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


class EvalSpec(StrictModel):
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
    runs_at_once: int = Field(
        1, gt=0, description="independent runs trained side by side, one worker each (with num_workers 1)"
    )
    output: Location = Field(description="where results go: path or fsspec URL")

    @model_validator(mode="after")
    def _checks(self):
        names = [a.name for a in self.arms]
        if BASELINE in names or len(set(names)) != len(names):
            raise ValueError(f"arms: names must be unique and not {BASELINE!r} (the baseline every spec has)")
        if same_data(self.real, self.heldout):
            raise ValueError("heldout: is the training data itself (same kind, path and split)")
        if self.runs_at_once > 1 and self.num_workers > 1:
            raise ValueError(
                "runs_at_once: runs side by side take one worker each; with num_workers > 1 each run is "
                "data-parallel instead: choose one of the two"
            )
        if self.segmenter.kind.startswith("deeplabv3") and self.train.batch_size < 2:
            raise ValueError(
                "train.batch_size: DeepLabV3's image-pooling batch norm needs at least 2 images per worker"
            )
        return self

    def content_hash(self) -> str:
        """What decides the results; where they go and how they are computed (workers, GPUs) may change."""
        data = self.model_dump(
            mode="json", exclude={"output", "num_workers", "use_gpu", "cpus_per_worker", "runs_at_once"}
        )
        data["train"].pop("loader_workers")
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    def runs(self) -> list[tuple[str, int]]:
        """(arm, seed) in order: per seed the baseline first (a SENSE arm's teacher)."""
        return [(arm, seed) for seed in range(self.seeds) for arm in [BASELINE, *(a.name for a in self.arms)]]

    def workers(self) -> int:
        """Ray Train workers: one per run side by side, or num_workers for each data-parallel run."""
        return self.runs_at_once if self.runs_at_once > 1 else self.num_workers

    def mix(self, arm: str, seed: int) -> MixSpec:
        t = self.train
        common = {
            "real": self.real,
            "batch_size": t.batch_size,
            "seed": seed,
            "resize": t.resize,
            "crop": t.crop,
            "flip": t.flip,
            "photometric": t.photometric,
            "shuffle_buffer": t.shuffle_buffer,
        }
        if arm == BASELINE:
            return MixSpec(strategy={"kind": "real"}, **common)
        chosen = next(a for a in self.arms if a.name == arm)
        return MixSpec(synthetic=chosen.synthetic, strategy=chosen.strategy, **common)


def same_data(a: SourceSpec, b: SourceSpec) -> bool:
    def where(s):
        return s.kind, s.path.rstrip("/"), s.split, s.image_suffix, s.mask_suffix

    return where(a) == where(b)


def parse_eval_spec(data: Any, origin: str = "spec") -> EvalSpec:
    return validated(EvalSpec, data, origin)


def load_eval_spec(path: str | Path) -> EvalSpec:
    return parse_eval_spec(read_yaml(path), origin=str(path))


def with_absolute_paths(spec: EvalSpec) -> EvalSpec:
    """Local relative paths made absolute: the workers may run in another directory."""
    arms = [
        arm.model_copy(
            update={"synthetic": [s.model_copy(update={"url": absolute_path(s.url)}) for s in arm.synthetic]}
        )
        for arm in spec.arms
    ]
    return spec.model_copy(
        update={
            "real": spec.real.model_copy(update={"path": absolute_path(spec.real.path)}),
            "heldout": spec.heldout.model_copy(update={"path": absolute_path(spec.heldout.path)}),
            "arms": arms,
            "segmenter": spec.segmenter.model_copy(
                update={"backbone_checkpoint": absolute_path(spec.segmenter.backbone_checkpoint)}
            ),
            "output": spec.output.model_copy(update={"url": absolute_path(spec.output.url)}),
        }
    )
