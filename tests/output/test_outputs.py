"""Reading outputs (factory.output.samples): samples, stats, failures, status, selections; `factory select` and
the report's scan stream, with memory that does not grow with the number of samples."""

import json
import math
import tracemalloc

import numpy as np
import pytest
from output_builder import Item, build_output, scored_items

from factory.cli import main
from factory.output.layout import OutputStore
from factory.output.samples import decode_image, decode_mask, iter_failures, iter_samples, iter_shard_samples, only_json
from factory.output.selections import read_selection, selected_keys, selection_names
from factory.tools.report import _scan, summarize_stats
from factory.tools.status import job_status
from factory.tools.streamstats import Extremes, ScoreSummary
from factory.tools.top_fraction import select_top

pytestmark = pytest.mark.timeout(300)


def test_samples_decode_exactly_and_stream_in_shard_order(tmp_path):
    rng = np.random.default_rng(0)
    mask8 = rng.choice(np.array([0, 7, 149, 255], np.uint8), (12, 16))
    mask16 = rng.choice(np.array([0, 300, 65534, 65535], np.uint16), (12, 16))
    image = rng.integers(0, 256, (12, 16, 3), np.uint8)
    store = build_output(
        OutputStore(str(tmp_path / "out")),
        {
            1: [Item("000001-000000", "b", image, mask8, {"variant": 0})],
            0: [Item("000000-000000-0", "a", image, mask8), Item("000000-000000-1", "a", image, None)],
        },
    )
    rows = list(iter_samples(store))
    assert [(s, k) for s, k, _ in rows] == [(0, "000000-000000-0"), (0, "000000-000000-1"), (1, "000001-000000")]
    _, _, files = rows[0]
    assert set(files) == {"png", "seg.png", "json"}
    np.testing.assert_array_equal(decode_image(files), image)
    assert decode_mask(files).dtype == np.uint8 and np.array_equal(decode_mask(files), mask8)
    assert decode_mask(rows[1][2]) is None
    only = list(iter_shard_samples(store, 0, select_files=only_json))
    assert [set(f) for _, f in only] == [{"json"}, {"json"}]
    wide = build_output(
        OutputStore(str(tmp_path / "wide")),
        {0: [Item("000000-000000", "c", image, mask16)]},
        classes=[f"c{i}" for i in range(400)],
    )
    decoded = decode_mask(next(iter_samples(wide))[2])
    assert decoded.dtype == np.uint16 and np.array_equal(decoded, mask16)


def test_status_and_failures_stream(tmp_path):
    failures = {
        0: [
            {
                "key": "000000-000001",
                "source_id": "x",
                "stage": "read",
                "reason": "corrupt_image",
                "detail": "bad bytes",
            }
        ],
        2: [{"key": "000002-000000", "source_id": "y", "stage": "synth", "reason": "nan", "detail": ""}],
    }
    store = build_output(
        OutputStore(str(tmp_path / "out")), {0: scored_items(0, [1, 2]), 2: scored_items(2, [3])}, failures=failures
    )
    status = job_status(store)
    assert {k: status[k] for k in ("shards_done", "shards_total", "samples", "failed", "by_reason")} == {
        "shards_done": 2,
        "shards_total": 3,
        "samples": 3,
        "failed": 2,
        "by_reason": {"read:corrupt_image": 1, "synth:nan": 1},
    }
    assert status["samples_per_second"] == round(3 / 4.0, 3)  # from the first start to the last finish
    assert [(s, r["reason"]) for s, r in iter_failures(store)] == [(0, "corrupt_image"), (2, "nan")]
    summary = summarize_stats(s for _, s in store.iter_stats())
    assert (summary.shards, summary.samples, summary.failed) == (2, 3, 2)
    assert summary.failed_by_stage == {"read": {"corrupt_image": 1}, "synth": {"nan": 1}}


def brute_force(values_by_shard, fraction, lowest):
    """The selection by a full sort: (score, stream position) order, nulls dropped."""
    rows = [
        (v, pos, key)
        for pos, (key, v) in enumerate(
            (f"{s:06d}-{i:06d}", v) for s, vs in sorted(values_by_shard.items()) for i, v in enumerate(vs)
        )
        if v is not None
    ]
    rows.sort(key=lambda t: (t[0] if lowest else -t[0], t[1]))
    return {key for _, _, key in rows[: math.ceil(fraction * len(rows))]}


@pytest.mark.parametrize("lowest", [False, True])
def test_select_top_matches_a_full_sort_with_ties_and_nulls(tmp_path, lowest):
    rng = np.random.default_rng(1)
    values = {s: [None if rng.random() < 0.1 else int(rng.integers(0, 6)) for _ in range(37)] for s in range(4)}
    store = build_output(OutputStore(str(tmp_path / "out")), {s: scored_items(s, v) for s, v in values.items()})
    for fraction in (0.05, 0.3, 0.5, 1.0):
        selection = select_top(store, "density.instances", fraction, lowest=lowest)
        kept = {k for s in range(4) for k in selected_keys(store, selection["name"], s)}
        assert kept == brute_force(values, fraction, lowest)
        scored = sum(v is not None for vs in values.values() for v in vs)
        assert selection["kept"] == len(kept) == math.ceil(fraction * scored)
        assert selection["dropped_by_reason"] == {
            "outside_fraction": scored - len(kept),
            "missing_score": 4 * 37 - scored,
        }
        assert read_selection(store, selection["name"]) == selection
    # Written again over itself: key files are replaced, never merged.
    select_top(store, "density.instances", 0.05, lowest=lowest, name="again")
    select_top(store, "density.instances", 1.0, lowest=lowest, name="again")
    assert sum(len(selected_keys(store, "again", s)) for s in range(4)) == scored
    assert "again" in selection_names(store)
    with pytest.raises(FileNotFoundError, match="no selection 'nope'"):
        read_selection(store, "nope")


def test_select_cli_and_all_null(tmp_path, capsys):
    store = build_output(OutputStore(str(tmp_path / "out")), {0: scored_items(0, [None, None])})
    assert main(["select", store.url, "--score", "density.instances", "--top", "0.5"]) == 0
    assert "kept 0, dropped 2" in capsys.readouterr().out
    assert selected_keys(store, "top-density.instances-0.5", 0) == set()


def _peak(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_select_report_and_status_memory_is_flat_in_the_number_of_samples(tmp_path):
    """Peak Python memory at 4x the samples grows by at most ~20 bytes per extra sample for select (one
    float per sample, by design) and by a constant for the report's scan and status. The smaller output
    (1,200 samples) is already past the scan's 1,024 exact values, so both scans hold the same bins."""
    rng = np.random.default_rng(2)
    stores = {}
    for n_shards in (2, 8):
        stores[n_shards] = build_output(
            OutputStore(str(tmp_path / f"out{n_shards}")),
            {s: scored_items(s, rng.random(600).tolist()) for s in range(n_shards)},
        )
    peaks = {
        n: {
            "select": _peak(lambda: select_top(st, "density.instances", 0.5)),
            "scan": _peak(lambda: _scan(st, None, 200)),
            "status": _peak(lambda: job_status(st)),
        }
        for n, st in stores.items()
    }
    extra = 6 * 600
    assert (peaks[8]["select"] - peaks[2]["select"]) / extra < 20
    # The scan keeps 1,024 exact values per score, then fixed bins: the same peak at 1.2k and 4.8k samples.
    assert (peaks[8]["scan"] - peaks[2]["scan"]) / extra < 2
    assert (peaks[8]["status"] - peaks[2]["status"]) / extra < 2


def test_score_summary_histogram_is_exact_in_counts():
    rng = np.random.default_rng(3)
    values = np.concatenate([rng.normal(5, 2, 3000), [-40.0, 90.0]])
    summary = ScoreSummary(bins=64)
    for v in values:
        summary.add(float(v))
    summary.add(None)
    assert summary.binned and summary.n == len(values) and summary.nulls == 1
    assert (summary.low, summary.high) == (-40.0, 90.0) and summary.mean == pytest.approx(values.mean())
    counts, edges = summary.histogram(max_bars=30)
    assert counts.sum() == len(values) and len(counts) <= 30
    assert edges[0] <= -40.0 and edges[-1] > 90.0
    assert abs(summary.median() - np.median(values)) <= summary.width
    small = ScoreSummary()
    for v in (3.0, 1.0, 2.0):
        small.add(v)
    assert not small.binned and small.median() == 2.0


def test_extremes_keep_the_best_and_worst():
    ext = Extremes(3)
    rng = np.random.default_rng(4)
    values = rng.permutation(100).astype(float)
    for i, v in enumerate(values):
        ext.add(v, f"k{i:03d}", None)
    assert len(ext.items) < 12
    assert [v for v, _, _ in ext.best()] == [99.0, 98.0, 97.0]
    assert [v for v, _, _ in ext.worst()] == [0.0, 1.0, 2.0]


def test_captions_dedupe_variants_within_a_shard(tmp_path):
    items = [
        Item("000000-000000-0", "a", meta={"caption": "one"}),
        Item("000000-000000-1", "a", meta={"caption": "one"}),
        Item("000000-000001-0", "b", meta={"caption": "two"}),
    ]
    store = build_output(OutputStore(str(tmp_path / "out")), {0: items, 1: [Item("000001-000000-0", "c")]})
    assert main(["captions", store.url, "--out", str(tmp_path / "c.jsonl")]) == 0
    lines = [json.loads(x) for x in (tmp_path / "c.jsonl").read_text().splitlines()]
    assert lines == [{"id": "a", "caption": "one"}, {"id": "b", "caption": "two"}]
