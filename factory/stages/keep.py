"""Selection by score: thresholds inside the pipeline, top fractions as a pass over the finished output.

`keep` (a stage, after `score`) rejects each sample whose score is below its `min` or above its `max`;
the shard stats count the rejections by reason, e.g. `keep:fidelity.miou_below_min`.

A top fraction ("the best 50% by density.instances") needs the whole population: a batch or a shard is a
biased, run-dependent slice of it, and a running quantile changes as the job goes, so the same sample
could be kept or dropped depending on the order the shards finished in. So top fractions are not a stage:
`select_top` reads every committed sample's scores once the job is done and writes the kept keys to
`selections/<name>.json` in the output, leaving the shards untouched. Training readers filter with it.
"""

from __future__ import annotations

import json
import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from factory.sample import Sample
from factory.scores import SCORE_NAMES, flatten_scores
from factory.stages import Stage, register_stage

SELECTIONS_DIR = "selections"


def _known_scores(bounds: dict[str, float]) -> dict[str, float]:
    unknown = sorted(set(bounds) - set(SCORE_NAMES))
    if unknown:
        raise ValueError(f"unknown score(s) {', '.join(unknown)}; known: {', '.join(SCORE_NAMES)}")
    return bounds


class KeepParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    min: dict[str, float] = Field(default_factory=dict, description="score name -> lowest value kept")
    max: dict[str, float] = Field(default_factory=dict, description="score name -> highest value kept")
    missing: Literal["keep", "reject"] = Field(
        "keep", description="a sample whose bounded score is null (its input was missing) is kept or rejected")

    @field_validator("min", "max")
    @classmethod
    def _known(cls, bounds: dict[str, float]) -> dict[str, float]:
        return _known_scores(bounds)


@register_stage
class KeepStage(Stage):
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


def select_top(store, score: str, fraction: float, lowest: bool = False, name: str | None = None) -> dict:
    """Keep the `fraction` of committed samples with the highest (or lowest) `score`; write and return it.

    Samples whose score is null are dropped (reason `missing_score`); ties at the cut are broken by key,
    so the selection depends only on the output's contents.
    """
    from factory.preview import iter_shard_samples

    if score not in SCORE_NAMES:
        raise ValueError(f"unknown score {score!r}; known: {', '.join(SCORE_NAMES)}")
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    scored: list[tuple[float, str, str]] = []
    missing = 0
    for shard in sorted(store.committed_shards()):
        shard_name = store.shard_name(shard)
        for key, files in iter_shard_samples(store, store.shard_path(shard)):
            value = flatten_scores(json.loads(files["json"]).get("scores"))[score]
            if value is None:
                missing += 1
            else:
                scored.append((float(value), key, shard_name))
    scored.sort(key=lambda t: (t[0] if lowest else -t[0], t[1]))
    n_keep = math.ceil(fraction * len(scored))
    kept = scored[:n_keep]
    keys: dict[str, list[str]] = {}
    for _, key, shard_name in sorted(kept, key=lambda t: t[1]):
        keys.setdefault(shard_name, []).append(key)
    name = name or f"{'bottom' if lowest else 'top'}-{score}-{fraction:g}"
    selection = {
        "name": name,
        "score": score,
        "fraction": fraction,
        "order": "lowest" if lowest else "highest",
        "threshold": kept[-1][0] if kept else None,
        "kept": len(kept),
        "dropped": len(scored) - len(kept) + missing,
        "dropped_by_reason": {"outside_fraction": len(scored) - len(kept), "missing_score": missing},
        "keys": keys,
    }
    store.write_json(selection, SELECTIONS_DIR, f"{name}.json")
    return selection


def main_select(output_url: str, score: str, top: float, lowest: bool = False,
                endpoint_url: str | None = None) -> int:
    """`factory select OUT --score NAME --top FRACTION [--lowest]`: write a selection, print its summary."""
    from factory.store import OutputStore

    options = {"client_kwargs": {"endpoint_url": endpoint_url}} if endpoint_url else {}
    selection = select_top(OutputStore(output_url, options), score, top, lowest)
    print(f"{output_url}/{SELECTIONS_DIR}/{selection['name']}.json: kept {selection['kept']}, dropped "
          f"{selection['dropped']} {selection['dropped_by_reason']}, threshold {selection['threshold']}")
    return 0
