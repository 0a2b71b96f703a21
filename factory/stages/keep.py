"""Selection by score: thresholds inside the pipeline, top fractions as a pass over the finished output.

`keep` (a stage, after `score`) rejects each sample whose score is below its `min` or above its `max`;
the shard stats count the rejections by reason, e.g. `keep:fidelity.miou_below_min`.

A top fraction ("the best 50% by density.instances") needs the whole population: a batch or a shard is a
biased, run-dependent slice of it, and a running quantile changes as the job goes, so the same sample
could be kept or dropped depending on the order the shards finished in. So top fractions are not a stage:
`select_top` reads every committed sample's scores once the job is done and writes the kept keys to
`selections/<name>/` in the output (one key file per shard, and `<name>.json`, its summary), leaving the
shards untouched. The mixing loader (`factory.mix`) filters with it.
"""

from __future__ import annotations

import math
from array import array
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from factory.outputs import (SELECTIONS_DIR, committed_shards, iter_samples, iter_shard_samples, only_json,
                             open_output, remove_selection, sample_meta, write_selected_keys)
from factory.sample import Sample
from factory.scores import SCORE_NAMES, flatten_scores
from factory.stages import Stage, register_stage


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
    """Keep the `fraction` of committed samples with the highest (or lowest) `score`; write the selection
    (see `factory.outputs`) and return its summary.

    Two streaming passes over the samples' json: the first keeps one float per sample (never the keys) to
    find the threshold, the second writes each shard's kept keys. Samples whose score is null are dropped
    (reason `missing_score`); ties at the threshold are kept in stream order (shard, then position in the
    shard) until the fraction is reached, so the selection depends only on the output's contents.
    """
    if score not in SCORE_NAMES:
        raise ValueError(f"unknown score {score!r}; known: {', '.join(SCORE_NAMES)}")
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    shards = committed_shards(store)
    values = array("d", (_score_of(files, score) for _, _, files in iter_samples(store, shards, only_json)))
    total = len(values)
    sign = 1.0 if lowest else -1.0  # rank on sign * value, ascending: the best come first
    ranked = np.frombuffer(values, dtype=np.float64) if total else np.zeros(0)
    ranked = ranked[~np.isnan(ranked)]  # a copy: from here on one float per scored sample
    del values
    np.multiply(ranked, sign, out=ranked)
    n_scored, n_keep = len(ranked), math.ceil(fraction * len(ranked))
    threshold, ties_wanted = None, 0
    if n_keep:
        ranked.partition(n_keep - 1)
        cut = ranked[n_keep - 1]
        threshold, ties_wanted = float(sign * cut), n_keep - int(np.count_nonzero(ranked < cut))
    del ranked

    name = name or f"{'bottom' if lowest else 'top'}-{score}-{fraction:g}"
    remove_selection(store, name)
    kept = 0
    for shard in shards:
        keys = []
        for key, files in iter_shard_samples(store, shard, only_json):
            value = _score_of(files, score)
            if n_keep == 0 or math.isnan(value):
                continue
            if sign * value < sign * threshold or (value == threshold and ties_wanted > 0):
                ties_wanted -= value == threshold
                keys.append(key)
        write_selected_keys(store, name, shard, keys)
        kept += len(keys)
    if kept != n_keep:
        raise RuntimeError(f"{store.url}: the output changed while selection {name!r} was written; run it again")
    selection = {
        "name": name,
        "score": score,
        "fraction": fraction,
        "order": "lowest" if lowest else "highest",
        "threshold": threshold,
        "kept": kept,
        "dropped": total - kept,
        "dropped_by_reason": {"outside_fraction": n_scored - kept, "missing_score": total - n_scored},
        "shards": len(shards),
        "keys": f"{SELECTIONS_DIR}/{name}/shard-NNNNNN.txt",
    }
    # The summary last: a selection whose summary exists has all its key files.
    store.write_json(selection, SELECTIONS_DIR, f"{name}.json")
    return selection


def _score_of(files: dict[str, bytes], score: str) -> float:
    """The sample's score, NaN when null."""
    value = flatten_scores(sample_meta(files).get("scores"))[score]
    return math.nan if value is None else float(value)


def main_select(output_url: str, score: str, top: float, lowest: bool = False,
                endpoint_url: str | None = None) -> int:
    """`factory select OUT --score NAME --top FRACTION [--lowest]`: write a selection, print its summary."""
    selection = select_top(open_output(output_url, endpoint_url=endpoint_url), score, top, lowest)
    print(f"{output_url}/{SELECTIONS_DIR}/{selection['name']}.json: kept {selection['kept']}, dropped "
          f"{selection['dropped']} {selection['dropped_by_reason']}, threshold {selection['threshold']}")
    return 0
