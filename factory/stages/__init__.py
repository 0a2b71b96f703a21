"""The stage contract and the registry the engine looks stages up in.

A stage is a class: the engine builds one instance per worker, calls `setup()` once (load models there),
then `process(samples)` for every batch. It declares whether it can use a GPU, how many rows each input
becomes (`variants_per_input`), and validates its own `params` and `model` sections with pydantic models.
Resources (CPUs, GPUs, batch size, pool size) come from the spec, so the same stage runs on a laptop
and on a GPU cluster. Registering a new stage (decorator or `module:Class` in the spec) never touches
the engine.
"""

from __future__ import annotations

import importlib
import pkgutil
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Generic, TypeVar

from pydantic import BaseModel

from factory.models.loading import ModelConfig
from factory.models.weights import WeightsSource
from factory.sample import Sample
from factory.schema import StrictModel
from factory.sources.classes import ClassSet

_REGISTRY: dict[str, type[Stage]] = {}

# What a stage validated its `params` and `model` sections into: a subclass names its own pydantic models
# (`Stage[CaptionParams, CaptionModelConfig]`), so its attributes are typed by them.
ParamsT = TypeVar("ParamsT", bound=BaseModel)
ModelT = TypeVar("ModelT", bound=BaseModel)
StageT = TypeVar("StageT", bound="type[Stage]")


class NoParams(StrictModel):
    """The `params` or `model` section of a stage that has none: any field is an error."""


@dataclass(frozen=True)
class StageContext:
    """What a stage knows about the job it runs in."""

    label: str
    job_seed: int
    classes: ClassSet
    device: str  # "cuda" or "cpu": cuda only when the spec gives the stage a GPU and one is visible


class Stage(ABC, Generic[ParamsT, ModelT]):
    name: ClassVar[str]
    uses_gpu: ClassVar[bool] = False
    # The extra of the install its models need (pyproject.toml), checked before a job or `factory stage` runs.
    extra: ClassVar[str | None] = None
    Params: ClassVar[type[BaseModel]] = NoParams
    Model: ClassVar[type[BaseModel]] = NoParams

    def __init__(self, params: ParamsT, model: ModelT, context: StageContext):
        self.params = params
        self.model = model
        self.context = context

    def check(self) -> None:  # noqa: B027 (optional: a stage without checks needs none)
        """Checks that need the source's class set, run on the driver before the job is planned.

        Raise ValueError with a message naming the parameter; cheap work only (no model loading).
        """

    def setup(self) -> None:  # noqa: B027 (optional: a stage without models loads nothing)
        """Load models; called once per worker before the first batch."""

    def variants_per_input(self) -> int:
        """How many samples `process` returns for each input sample."""
        return 1

    def model_ids(self) -> dict[str, str]:
        """Model identities recorded in every sample's json and in the shard stats."""
        return {}

    def weight_sources(self) -> dict[str, WeightsSource]:
        """The models among `model_ids` that `setup` loads from real weights (not the tiny or random
        profiles), which the engine pins when the job is planned; override where a stage loads models of
        another section (score's auto-labeller)."""
        return self.model.weight_sources(self.model_ids()) if isinstance(self.model, ModelConfig) else {}

    @abstractmethod
    def process(self, samples: list[Sample]) -> list[Sample]:
        """Process a batch of live samples; return `variants_per_input()` samples for each, in order.

        Raise to fail the whole batch (the engine then retries the samples one by one to find the bad
        one), or mark single samples with `sample.fail(...)` / `sample.rejected = {...}`.
        """


def register_stage(cls: StageT) -> StageT:
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"stage name {cls.name!r} is registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def resolve_stage(kind: str) -> type[Stage]:
    """A registered stage by name, or any Stage subclass given as `module:Class`."""
    if ":" in kind:
        module, _, attr = kind.partition(":")
        try:
            cls = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise KeyError(f"cannot import stage {kind!r}: {e}") from None
        if not (isinstance(cls, type) and issubclass(cls, Stage)):
            raise KeyError(f"{kind!r} is not a factory Stage subclass")
        return cls
    _import_builtin_stages()
    if kind not in _REGISTRY:
        raise KeyError(f"unknown stage {kind!r}; known: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[kind]


def _import_builtin_stages() -> None:
    """Every module in this package registers its stages on import: a new stage is a new file here."""
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")


def stage_names() -> list[str]:
    _import_builtin_stages()
    return sorted(_REGISTRY)
