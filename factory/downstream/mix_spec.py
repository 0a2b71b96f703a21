"""The spec of a mix of real and synthetic data: the real dataset, the factory outputs (with score bounds
or a selection), the strategy (each paper's mixing law), batch size and transforms. `factory eval` builds
one per arm; user training code writes its own."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from factory.output.layout import open_output
from factory.output.scores import check_score_names
from factory.schema import SpecError, StrictModel, validated
from factory.sources.spec import SourceSpec


class SyntheticInput(StrictModel):
    url: str = Field(min_length=1, description="a factory output: path or fsspec URL (s3://bucket/prefix)")
    endpoint_url: str | None = Field(None, description="S3 endpoint (SeaweedFS, MinIO, ...)")
    storage_options: dict[str, Any] = Field(default_factory=dict)
    min: dict[str, float] = Field(default_factory=dict, description="score name -> lowest value used")
    max: dict[str, float] = Field(default_factory=dict, description="score name -> highest value used")
    selection: str | None = Field(None, description="use only the samples a `factory select` selection kept")

    @field_validator("min", "max")
    @classmethod
    def _known(cls, bounds: dict[str, float]) -> dict[str, float]:
        return check_score_names(bounds)

    def store(self):
        return open_output(self.url, self.storage_options, self.endpoint_url)

    def passes(self, scores: dict[str, float | None]) -> bool:
        """Within every bound; a null score fails a bound on it."""
        return all((value := scores[k]) is not None and value >= v for k, v in self.min.items()) and all(
            (value := scores[k]) is not None and value <= v for k, v in self.max.items()
        )


class RealOnly(StrictModel):
    kind: Literal["real"]


class SegGen(StrictModel):
    kind: Literal["seggen"]
    p: float = Field(0.6, ge=0, le=1, description="probability that a slot's real sample is replaced")


class SegGenPretrain(StrictModel):
    kind: Literal["seggen_pretrain"]
    pretrain_batches: int = Field(gt=0, description="batches (per rank) of synthetic data before the real")


class DiffusionSynthesis(StrictModel):
    kind: Literal["diffusion_synthesis"]
    alpha: float = Field(0.5, ge=0, le=1, description="probability that a slot holds a synthetic image")


class Sense(StrictModel):
    kind: Literal["sense"]


Strategy = Annotated[RealOnly | SegGen | SegGenPretrain | DiffusionSynthesis | Sense, Field(discriminator="kind")]


class MixSpec(StrictModel):
    real: SourceSpec
    synthetic: list[SyntheticInput] = Field(default_factory=list)
    strategy: Strategy = Field(default_factory=lambda: SegGen(kind="seggen"))
    batch_size: int = Field(8, gt=0, description="samples per batch (per rank)")
    seed: int = 0
    resize: int | None = Field(None, gt=0, description="resize the short side to this first")
    crop: int | None = Field(None, gt=0, description="random square crop (padded with ignore if smaller)")
    flip: bool = Field(False, description="random horizontal flips")
    photometric: bool = Field(False, description="random colour: channel order, per-channel contrast, brightness")
    shuffle_buffer: int = Field(256, gt=0, description="synthetic samples (or sources) shuffled together")

    @model_validator(mode="after")
    def _strategy_fits(self):
        kind = self.strategy.kind
        if kind != "real" and not self.synthetic:
            raise ValueError(f"strategy {kind} mixes in synthetic data: give at least one `synthetic` output")
        if kind == "real" and self.synthetic:
            raise ValueError("strategy real reads no synthetic data: remove `synthetic` or pick a mixing strategy")
        if kind == "sense" and self.batch_size % 2:
            raise ValueError(
                f"strategy sense splits each batch in half real, half synthetic: batch_size "
                f"{self.batch_size} must be even"
            )
        return self


def parse_mix_spec(data: Any, origin: str = "mix") -> MixSpec:
    return validated(MixSpec, data, origin)


def check_inputs(spec: MixSpec) -> None:
    """Every synthetic output exists and labels with the real dataset's classes; its selection exists."""
    from factory.output.selections import read_selection
    from factory.sources import open_source

    classes = open_source(spec.real).classes
    for i, inp in enumerate(spec.synthetic):
        store = inp.store()
        manifest = store.read_manifest()
        if manifest["classes"] != list(classes.names):
            raise SpecError(
                f"synthetic[{i}].url: {inp.url} labels with {len(manifest['classes'])} classes "
                f"({manifest['classes'][:3]}...), not the real dataset's {len(classes)} ({classes.name})"
            )
        if inp.selection:
            read_selection(store, inp.selection)
