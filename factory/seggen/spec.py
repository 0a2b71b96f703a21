"""The training spec of `factory train text2mask|mask2img` (jobs/train_*.yaml)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from factory.models.sdxl import SDXL_BASE
from factory.schema import StrictModel, absolute_path, read_yaml, validated
from factory.sources.spec import SourceSpec
from factory.storage import Location

KINDS = ("text2mask", "mask2img")


class TrainModel(StrictModel):
    profile: Literal["pretrained", "tiny", "random"] = Field(
        "pretrained", description="random: the SDXL base architecture with random weights (benchmarks only)"
    )
    base: str = Field(SDXL_BASE, description="SDXL base: hub id, local dir or s3:// URL")
    storage_options: dict[str, Any] = Field(default_factory=dict)


class TrainSpec(StrictModel):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$", description="run name: letters, digits, - and _")
    seed: int = 0
    source: SourceSpec
    model: TrainModel = Field(default_factory=TrainModel)
    palette: Literal["separated", "ade150"] = Field("separated", description="colours for the source's classes")
    palette_seed: int = 0
    outlines: bool = Field(False, description="draw instance outlines in the edge colour (panoptic/instance data)")
    prompt: str = Field("a photo of {classes}", description="prompt for samples without a caption")
    captions: str | None = Field(None, description='JSON lines {"id": ..., "caption": ...} per source id')
    empty_prompt_prob: float = Field(0.0, ge=0, le=1, description="share of empty prompts (for guidance)")
    steps: int = Field(30000, gt=0, description="optimizer steps; paper: 30K iterations")
    batch_size: int = Field(4, gt=0, description="samples per worker per step")
    lr: float = Field(1e-5, gt=0, description="AdamW learning rate")
    weight_decay: float = Field(1e-2, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    resolution: int = Field(768, ge=8, description="square training crop; paper: 768")
    checkpoint_every: int = Field(1000, gt=0)
    keep_checkpoints: int = Field(2, gt=0, description="newest checkpoints kept; older ones are deleted")
    num_workers: int = Field(1, gt=0, description="Ray Train workers (one GPU each with use_gpu)")
    use_gpu: bool = True
    cpus_per_worker: float = Field(1, gt=0)
    mixed_precision: Literal["no", "fp16", "bf16"] = Field("bf16", description="autocast dtype on GPU")
    loader_workers: int = Field(2, ge=0, description="data loading processes per worker")
    output: Location

    def content_hash(self) -> str:
        """What decides the weights; where they go, how long, and how often they are saved may change."""
        data = self.model_dump(
            mode="json",
            exclude={
                "output",
                "steps",
                "checkpoint_every",
                "keep_checkpoints",
                "use_gpu",
                "cpus_per_worker",
                "loader_workers",
            },
        )
        data["source"].pop("storage_options")
        data["model"].pop("storage_options")
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


class TrainResumeError(RuntimeError):
    """The output already holds another training run."""


def parse_train_spec(data: Any, origin: str = "spec") -> TrainSpec:
    return validated(TrainSpec, data, origin)


def load_train_spec(path: str | Path) -> TrainSpec:
    return parse_train_spec(read_yaml(path), origin=str(path))


def with_absolute_paths(spec: TrainSpec) -> TrainSpec:
    """Local relative paths made absolute, as the workers may run in another directory; the spec hash
    then names the data by its full path."""
    update = {
        "source": spec.source.model_copy(update={"path": absolute_path(spec.source.path)}),
        "output": spec.output.model_copy(update={"url": absolute_path(spec.output.url)}),
        "captions": absolute_path(spec.captions),
    }
    return spec.model_copy(update=update)
