"""`factory select OUT --score NAME --top F`: keep the best fraction of a finished job's samples by one score.

A top fraction needs the whole population: a batch or a shard is a biased, run-dependent slice of it, and
a running quantile changes as the job goes, so the same sample could be kept or dropped depending on the
order the shards finished in. So this reads every committed sample's scores once the job is done and
writes the kept keys as a selection (`factory.output.selections`), leaving the shards untouched. The
mixing loader (`factory.downstream.mix`) filters with it.
"""

from __future__ import annotations

import math
from array import array

import numpy as np

from factory.output.layout import SELECTIONS_DIR, OutputStore
from factory.output.samples import iter_samples, iter_shard_samples, only_json, sample_meta
from factory.output.scores import SCORE_NAMES, flatten_scores
from factory.output.selections import remove_selection, write_selected_keys


def select_top(store: OutputStore, score: str, fraction: float, lowest: bool = False, name: str | None = None) -> dict:
    """Keep the `fraction` of committed samples with the highest (or lowest) `score`; write the selection
    (see `factory.output.samples`) and return its summary.

    Two streaming passes over the samples' json: the first keeps one float per sample (never the keys) to
    find the threshold, the second writes each shard's kept keys. Samples whose score is null are dropped
    (reason `missing_score`); ties at the threshold are kept in stream order (shard, then position in the
    shard) until the fraction is reached, so the selection depends only on the output's contents.
    """
    if score not in SCORE_NAMES:
        raise ValueError(f"unknown score {score!r}; known: {', '.join(SCORE_NAMES)}")
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    shards = store.committed_shards()
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
            if threshold is None or math.isnan(value):  # None: nothing to keep
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


def main_select(store: OutputStore, score: str, top: float, lowest: bool = False) -> int:
    """`factory select OUT --score NAME --top FRACTION [--lowest]`: write a selection, print its summary."""
    selection = select_top(store, score, top, lowest)
    print(
        f"{store.url}/{SELECTIONS_DIR}/{selection['name']}.json: kept {selection['kept']}, dropped "
        f"{selection['dropped']} {selection['dropped_by_reason']}, threshold {selection['threshold']}"
    )
    return 0
