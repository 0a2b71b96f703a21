"""`factory report OUT`: one self-contained HTML page about a job's output, for a person to look at.

It shows samples and failures per stage, filter pass rates (selection stages and `selections/` files),
a histogram of every score, the class frequency of the synthetic samples against the source data, and
the best and worst samples by each score. Plots are drawn with matplotlib, written as PNG files beside
the page and embedded in it as data URIs, so the HTML alone opens offline.

Counts per stage are in output rows: a sample a stage expanded into K variants counts K times after it.
Scores are read from the first `max_samples` written samples (all of them by default); the source's
class frequency from up to `source_limit` of the source samples the output was made from.

It streams: stats, samples and failures are read one file at a time, the scores are summarised in
bounded histograms (`factory.tools.streamstats`), the best and worst samples in bounded lists, so memory stays
flat at millions of samples. By default the report goes beside the output, in `OUT/report/` (for an
object-store output it is written locally first, then uploaded).
"""

from __future__ import annotations

import base64
import bisect
import html
import tempfile
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from factory.output.layout import OutputStore, open_output
from factory.output.samples import decode_mask, iter_failures, iter_samples, sample_meta
from factory.output.scores import SCORE_NAMES, flatten_scores
from factory.output.selections import read_selection, selection_names
from factory.tools.report_plots import GRID_COUNT, plot_classes, plot_grids, plot_histograms, plot_stages
from factory.tools.streamstats import Extremes, ScoreSummary

FAILURE_ROWS = 20  # failed or rejected samples listed with their details
REPORT_DIR = "report"


@dataclass
class StatsSummary:
    """The shards' stats summed as they stream."""

    shards: int = 0
    samples: int = 0
    failed: int = 0
    rejected: int = 0
    failed_by_stage: dict[str, Counter] = field(default_factory=dict)
    rejected_by_stage: dict[str, Counter] = field(default_factory=dict)


def summarize_stats(stats: Iterable[dict]) -> StatsSummary:
    out = StatsSummary()
    for s in stats:
        out.shards += 1
        out.samples += s["samples"]
        out.failed += s["failed"]
        out.rejected += s["rejected"]
        for table, by_reason in (
            (out.failed_by_stage, s["failures_by_reason"]),
            (out.rejected_by_stage, s["rejected_by_reason"]),
        ):
            for stage_reason, n in by_reason.items():
                stage, _, reason = stage_reason.partition(":")
                table.setdefault(stage, Counter())[reason] += n
    return out


@dataclass
class _Scan:
    rows: int = 0
    synthetic: int = 0
    labeled: int = 0
    pseudo_labeled: int = 0
    synthetic_classes: Counter = field(default_factory=Counter)  # class id -> synthetic images containing it
    synthetic_labeled: int = 0
    first_sources: list = field(default_factory=list)  # the smallest source ids seen, sorted, bounded
    scores: dict = field(default_factory=lambda: {name: ScoreSummary() for name in SCORE_NAMES})
    extremes: dict = field(default_factory=lambda: {name: Extremes(GRID_COUNT) for name in SCORE_NAMES})


def _scan(store: OutputStore, max_samples: int | None, source_limit: int) -> _Scan:
    scan = _Scan()
    for _, key, files in iter_samples(store):
        if max_samples is not None and scan.rows >= max_samples:
            break
        meta = sample_meta(files)
        scan.rows += 1
        scores = flatten_scores(meta.get("scores"))
        for name, value in scores.items():
            scan.scores[name].add(value)
            if value is not None:
                scan.extremes[name].add(value, key, files)
        _remember_source(scan.first_sources, meta.get("source_id"), source_limit)
        # ControlNet and t2i record `synthesis`; SegGen's stages mark the image's kind instead.
        synthetic = "synthesis" in meta or meta.get("image_kind") in ("synthetic", "color_map")
        scan.synthetic += synthetic
        mask = decode_mask(files)
        if mask is not None:
            scan.labeled += 1
            scan.pseudo_labeled += bool(meta.get("pseudo_label"))
            if synthetic:
                scan.synthetic_labeled += 1
                scan.synthetic_classes.update(np.unique(mask).tolist())
    return scan


def _remember_source(first: list, source_id: str | None, limit: int) -> None:
    """Keep the `limit` smallest distinct source ids: the same ones `sorted(all ids)[:limit]` gives."""
    if not source_id or limit <= 0:
        return
    at = bisect.bisect_left(first, source_id)
    if at < len(first) and first[at] == source_id:
        return
    if len(first) < limit or at < len(first):
        first.insert(at, source_id)
        del first[limit:]


def _source_classes(manifest: dict, source_ids: list, limit: int) -> tuple[Counter, int, str | None]:
    """(class id -> source images containing it, images read, why none could be read)."""
    from factory.sources import open_source
    from factory.sources.spec import SourceSpec

    counts: Counter = Counter()
    read = 0
    try:
        source = open_source(SourceSpec.model_validate(manifest["spec"]["source"]))
        for sample_id in source_ids[:limit]:
            rec = source.load(sample_id)
            if rec.mask is not None:
                counts.update(np.unique(rec.mask).tolist())
                read += 1
    except Exception as e:  # the report still stands without the source's side of the comparison
        return counts, read, f"{type(e).__name__}: {e}"
    return counts, read, None


def stage_table(manifest: dict, stats: StatsSummary) -> list[dict]:
    """Per stage (read first): rows in, passed, failed and rejected, with the reasons."""
    failed, rejected = stats.failed_by_stage, stats.rejected_by_stage
    stages = [("read", "read")] + [(st.get("name") or st["kind"], st["kind"]) for st in manifest["spec"]["stages"]]
    # Whatever left the pipeline after a stage passed it: written, or failed/rejected further on.
    passed = stats.samples
    out = []
    for label, kind in reversed(stages):
        f, r = sum(failed.get(label, {}).values()), sum(rejected.get(label, {}).values())
        rows_in = passed + f + r
        out.append(
            {
                "stage": label,
                "kind": kind,
                "in": rows_in,
                "passed": passed,
                "failed": f,
                "rejected": r,
                "pass_rate": passed / rows_in if rows_in else None,
                "failed_by_reason": dict(failed.get(label, {})),
                "rejected_by_reason": dict(rejected.get(label, {})),
            }
        )
        passed = rows_in
    return out[::-1]


# ---------------------------------------------------------------- the page


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _reasons(by_reason: dict) -> str:
    return ", ".join(f"{k}: {v}" for k, v in sorted(by_reason.items(), key=lambda kv: -kv[1])) or "-"


def _score_stats(scores: dict[str, ScoreSummary]) -> list[list]:
    out = []
    for name in SCORE_NAMES:
        summary = scores[name]
        values = (summary.mean, summary.low, summary.median(), summary.high)
        out.append([name, summary.n, summary.nulls, *(f"{v:.4g}" if summary.n else "-" for v in values)])
    return out


def _failure_rows(store: OutputStore, shards: list[int]) -> list[list]:
    rows = []
    for shard, record in iter_failures(store, shards):
        rows.append(
            [
                shard,
                record.get("key") or record.get("source_id", "-"),
                record.get("stage", "-"),
                record.get("reason", "-"),
                record.get("detail", ""),
            ]
        )
        if len(rows) == FAILURE_ROWS:
            break
    return rows


_STYLE = """
body { font-family: sans-serif; margin: 2em; color: #222; max-width: 1200px; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
th { background: #f0f0f0; }
img { max-width: 100%; margin: 0.5em 0; }
.note { color: #666; font-size: 0.9em; }
"""


def write_report(
    store: OutputStore, out_dir: str | Path, max_samples: int | None = None, source_limit: int = 200
) -> Path:
    """Write report.html and its PNG plots into the local folder `out_dir`; return the HTML file's path."""
    import matplotlib

    matplotlib.use("Agg")  # no display; must be chosen before pyplot is imported
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = store.read_manifest()
    shards = store.committed_shards()
    stats = summarize_stats(s for _, s in store.iter_stats())
    scan = _scan(store, max_samples, source_limit)
    table = stage_table(manifest, stats)
    source_counts, n_source, source_error = _source_classes(manifest, scan.first_sources, source_limit)
    selections = [read_selection(store, name) for name in selection_names(store)]
    failures = _failure_rows(store, shards)

    stages_png = plot_stages(table, out_dir)
    scores_png = plot_histograms(scan.scores, out_dir)
    classes_png = plot_classes(
        manifest["classes"], scan.synthetic_classes, scan.synthetic_labeled, source_counts, n_source, out_dir
    )
    grids = plot_grids(scan.extremes, out_dir)

    filters = [
        [
            r["stage"],
            r["in"],
            r["in"] - r["rejected"],
            _pct(1 - r["rejected"] / r["in"] if r["in"] else None),
            _reasons(r["rejected_by_reason"]),
        ]
        for r in table
        if r["kind"] == "keep" or r["rejected"]
    ]
    filters += [
        [
            f"selection {s['name']}",
            s["kept"] + s["dropped"],
            s["kept"],
            _pct(s["kept"] / (s["kept"] + s["dropped"]) if s["kept"] + s["dropped"] else None),
            _reasons(s["dropped_by_reason"]),
        ]
        for s in selections
    ]
    scanned = f"{scan.rows} of {stats.samples}" if scan.rows < stats.samples else "all"
    binned = any(summary.binned for summary in scan.scores.values())
    parts = [
        f"<h1>Factory report: {html.escape(manifest['name'])}</h1>",
        f'<p class="note">{html.escape(store.url)} &middot; spec {html.escape(manifest["spec_hash"])}</p>',
        _table(
            [
                "shards",
                "samples written",
                "failed",
                "rejected",
                "synthetic",
                "labelled (seg.png)",
                "pseudo-labelled",
                "unlabelled",
            ],
            [
                [
                    f"{stats.shards}/{manifest['plan']['num_shards']}",
                    stats.samples,
                    stats.failed,
                    stats.rejected,
                    scan.synthetic,
                    scan.labeled,
                    scan.pseudo_labeled,
                    scan.rows - scan.labeled,
                ]
            ],
        ),
        "<h2>Samples and failures per stage</h2>",
        _table(
            [
                "stage",
                "kind",
                "rows in",
                "passed",
                "pass rate",
                "failed",
                "failures by reason",
                "rejected",
                "rejections by reason",
            ],
            [
                [
                    r["stage"],
                    r["kind"],
                    r["in"],
                    r["passed"],
                    _pct(r["pass_rate"]),
                    r["failed"],
                    _reasons(r["failed_by_reason"]),
                    r["rejected"],
                    _reasons(r["rejected_by_reason"]),
                ]
                for r in table
            ],
        ),
        _img(stages_png, "rows per stage"),
        f'<h2>Failed and rejected samples</h2><p class="note">The first {FAILURE_ROWS}, from '
        "<code>failures/</code>.</p>",
        _table(["shard", "sample", "stage", "reason", "detail"], failures)
        if failures
        else '<p class="note">No failure details recorded.</p>',
        "<h2>Filter pass rates</h2>",
        '<p class="note">Selection stages (rows they let through, of the rows that reached them) and the '
        "top-fraction selections written by <code>factory select</code>.</p>",
        _table(["filter", "rows in", "kept", "pass rate", "dropped by reason"], filters)
        if filters
        else '<p class="note">This job has no filter.</p>',
        f'<h2>Scores</h2><p class="note">From {scanned} written samples. Null means the score\'s input '
        "was missing (no mask, no auto-label, no prompt)."
        + (
            " Past 1,024 values a score is summarised in a streamed histogram: its median is then the centre "
            "of the bin holding it."
            if binned
            else ""
        )
        + "</p>",
        _table(["score", "n", "null", "mean", "min", "median", "max"], _score_stats(scan.scores)),
        _img(scores_png, "score histograms"),
        "<h2>Class frequency: synthetic vs source</h2>",
        f'<p class="note">Synthetic: {scan.synthetic_labeled} labelled synthetic samples. Source: {n_source} '
        f"source images the output was made from"
        + (f" (could not read the source: {html.escape(source_error)})" if source_error else "")
        + ".</p>",
        _img(classes_png, "class frequency"),
        "<h2>Best and worst samples by score</h2>",
    ]
    parts += [_img(path, f"best and worst by {name}") for name, path in grids.items()]
    if not grids:
        parts.append('<p class="note">No sample has a score.</p>')
    page = (
        f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>Factory report: '
        f"{html.escape(manifest['name'])}</title><style>{_STYLE}</style></head><body>"
        + "\n".join(parts)
        + "</body></html>"
    )
    path = out_dir / "report.html"
    path.write_text(page, encoding="utf-8")
    return path


def publish_report(store: OutputStore, out_dir: str | Path | None = None, **options) -> str:
    """Write the report into `out_dir`, or by default beside the output in `OUT/report/` (written locally,
    then uploaded, for an object-store output); return where report.html is."""
    if out_dir is not None:
        return str(write_report(store, out_dir, **options))
    if store.is_local():
        return str(write_report(store, store.path(REPORT_DIR), **options))
    with tempfile.TemporaryDirectory() as tmp:
        local = write_report(store, tmp, **options).parent
        target = store.path(REPORT_DIR)
        store.fs.invalidate_cache()
        if store.fs.exists(target):
            store.fs.rm(target, recursive=True)
        for file in sorted(local.iterdir()):
            store.fs.put_file(str(file), f"{target}/{file.name}")
    return store.public_url(REPORT_DIR, "report.html")


def main_report(output_url: str, out_dir: str | None = None, endpoint_url: str | None = None) -> int:
    """`factory report OUT [--out DIR]`: write the report, print where it is."""
    print(f"wrote {publish_report(open_output(output_url, endpoint_url=endpoint_url), out_dir)}")
    return 0
