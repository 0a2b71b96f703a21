"""The `keep` stage: selection by score thresholds inside the pipeline.

`keep` (after `score`) rejects each sample whose score is below its `min` or above its `max`; the shard
stats count the rejections by reason, e.g. `keep:fidelity.miou_below_min`. A top fraction ("the best 50%
by density.instances") needs the whole population, so it is not a stage but a pass over the finished
output: `factory select` (`factory.tools.top_fraction`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from factory.output.scores import check_score_names, flatten_scores
from factory.sample import Sample
from factory.schema import StrictModel
from factory.stages import NoParams, Stage, register_stage


class KeepParams(StrictModel):
    min: dict[str, float] = Field(default_factory=dict, description="score name -> lowest value kept")
    max: dict[str, float] = Field(default_factory=dict, description="score name -> highest value kept")
    missing: Literal["keep", "reject"] = Field(
        "keep", description="a sample whose bounded score is null (its input was missing) is kept or rejected"
    )

    @field_validator("min", "max")
    @classmethod
    def _known(cls, bounds: dict[str, float]) -> dict[str, float]:
        return check_score_names(bounds)


@register_stage
class KeepStage(Stage[KeepParams, NoParams]):
    name = "keep"
    Params = KeepParams

    def process(self, samples: list[Sample]) -> list[Sample]:
        for sample in samples:
            reasons = self.reasons(flatten_scores(sample.meta.get("scores")))
            if reasons:
                # One reason per sample keeps the stats' counts summing to the rejections; the detail lists all.
                sample.reject(self.context.label, reasons[0][0], "; ".join(d for _, d in reasons))
        return samples

    def reasons(self, scores: dict[str, float | None]) -> list[tuple[str, str]]:
        """(reason, detail) for every bound the scores break, in spec order (min bounds first)."""
        out = []
        for kind, bounds in (("min", self.params.min), ("max", self.params.max)):
            for name, bound in bounds.items():
                value = scores[name]
                if value is None:
                    if self.params.missing == "reject":
                        out.append((f"{name}_missing", f"{name} is null"))
                elif kind == "min" and value < bound:
                    out.append((f"{name}_below_min", f"{name} {value:.4g} < {bound:.4g}"))
                elif kind == "max" and value > bound:
                    out.append((f"{name}_above_max", f"{name} {value:.4g} > {bound:.4g}"))
        return out
