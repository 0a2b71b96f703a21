"""`factory report OUT`: one self-contained HTML page about a job's output, for a person to look at.

It shows samples and failures per stage, filter pass rates (selection stages and `selections/` files),
a histogram of every score, the class frequency of the synthetic samples against the source data, and
the best and worst samples by each score. Plots are drawn with matplotlib, written as PNG files beside
the page and embedded in it as data URIs, so the HTML alone opens offline.

Counts per stage are in output rows: a sample a stage expanded into K variants counts K times after it.
Scores are read from the first `max_samples` written samples (all of them by default); the source's
class frequency from up to `source_limit` of the source samples the output was made from.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from factory.preview import iter_shard_samples
from factory.scores import SCORE_NAMES, flatten_scores
from factory.stages.keep import SELECTIONS_DIR
from factory.store import OutputStore

GRID_COUNT = 4  # best and worst samples shown per score
TOP_CLASSES = 25


@dataclass
class _Row:
    key: str
    shard: int
    scores: dict[str, float | None]


@dataclass
class _Scan:
    rows: list[_Row] = field(default_factory=list)
    synthetic: int = 0
    labeled: int = 0
    pseudo_labeled: int = 0
    synthetic_classes: Counter = field(default_factory=Counter)  # class id -> synthetic images containing it
    synthetic_labeled: int = 0
    source_ids: set = field(default_factory=set)


def _scan(store: OutputStore, max_samples: int | None) -> _Scan:
    scan = _Scan()
    for shard in sorted(store.committed_shards()):
        for key, files in iter_shard_samples(store, store.shard_path(shard)):
            if max_samples is not None and len(scan.rows) >= max_samples:
                return scan
            meta = json.loads(files["json"])
            scan.rows.append(_Row(key, shard, flatten_scores(meta.get("scores"))))
            scan.source_ids.add(meta.get("source_id"))
            # ControlNet and t2i record `synthesis`; SegGen's stages mark the image's kind instead.
            synthetic = "synthesis" in meta or meta.get("image_kind") in ("synthetic", "color_map")
            scan.synthetic += synthetic
            if "seg.png" in files:
                scan.labeled += 1
                scan.pseudo_labeled += bool(meta.get("pseudo_label"))
                if synthetic:
                    scan.synthetic_labeled += 1
                    mask = np.asarray(Image.open(io.BytesIO(files["seg.png"])))
                    scan.synthetic_classes.update(np.unique(mask).tolist())
    return scan


def _source_classes(manifest: dict, source_ids: set, limit: int) -> tuple[Counter, int, str | None]:
    """(class id -> source images containing it, images read, why none could be read)."""
    from factory.sources import open_source
    from factory.spec import SourceSpec

    counts: Counter = Counter()
    read = 0
    try:
        source = open_source(SourceSpec.model_validate(manifest["spec"]["source"]))
        for sample_id in sorted(i for i in source_ids if i)[:limit]:
            rec = source.load(sample_id)
            if rec.mask is not None:
                counts.update(np.unique(rec.mask).tolist())
                read += 1
    except Exception as e:  # the report still stands without the source's side of the comparison
        return counts, read, f"{type(e).__name__}: {e}"
    return counts, read, None


def stage_table(manifest: dict, stats: dict[int, dict]) -> list[dict]:
    """Per stage (read first): rows in, passed, failed and rejected, with the reasons."""
    failed: dict[str, Counter] = {}
    rejected: dict[str, Counter] = {}
    for s in stats.values():
        for table, by_reason in ((failed, s["failures_by_reason"]), (rejected, s["rejected_by_reason"])):
            for stage_reason, n in by_reason.items():
                stage, _, reason = stage_reason.partition(":")
                table.setdefault(stage, Counter())[reason] += n
    stages = [("read", "read")] + [(st.get("name") or st["kind"], st["kind"]) for st in manifest["spec"]["stages"]]
    # Whatever left the pipeline after a stage passed it: written, or failed/rejected further on.
    passed = sum(s["samples"] for s in stats.values())
    out = []
    for label, kind in reversed(stages):
        f, r = sum(failed.get(label, {}).values()), sum(rejected.get(label, {}).values())
        rows_in = passed + f + r
        out.append({
            "stage": label, "kind": kind, "in": rows_in, "passed": passed, "failed": f, "rejected": r,
            "pass_rate": passed / rows_in if rows_in else None,
            "failed_by_reason": dict(failed.get(label, {})), "rejected_by_reason": dict(rejected.get(label, {})),
        })
        passed = rows_in
    return out[::-1]


# ---------------------------------------------------------------- plots


def _save(fig, out_dir: Path, name: str) -> Path:
    import matplotlib.pyplot as plt

    path = out_dir / name
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return path


def _plot_stages(table: list[dict], out_dir: Path) -> Path:
    import matplotlib.pyplot as plt

    labels = [r["stage"] for r in table]
    fig, ax = plt.subplots(figsize=(7, 0.5 + 0.45 * len(table)))
    left = np.zeros(len(table))
    for part, colour in (("passed", "#4c9a5e"), ("failed", "#c44e52"), ("rejected", "#dd8452")):
        values = np.array([r[part] for r in table], dtype=float)
        ax.barh(labels, values, left=left, color=colour, label=part)
        left += values
    ax.invert_yaxis()
    ax.set_xlabel("rows")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    ax.set_title("rows per stage")
    return _save(fig, out_dir, "stages.png")


def _plot_histograms(rows: list[_Row], out_dir: Path) -> Path:
    import matplotlib.pyplot as plt

    cols = 4
    fig, axes = plt.subplots(2, cols, figsize=(3.2 * cols, 5.6))
    for ax, name in zip(axes.ravel(), SCORE_NAMES):
        values = [r.scores[name] for r in rows if r.scores[name] is not None]
        nulls = len(rows) - len(values)
        if values:
            ax.hist(values, bins=min(30, max(5, len(set(values)))), color="#4c72b0")
        else:
            ax.text(0.5, 0.5, "all null", ha="center", va="center", transform=ax.transAxes, color="grey")
        ax.set_title(f"{name}\nn={len(values)}  null={nulls}", fontsize=9)
        ax.tick_params(labelsize=7)
    for ax in axes.ravel()[len(SCORE_NAMES):]:
        ax.axis("off")
    fig.tight_layout()
    return _save(fig, out_dir, "scores.png")


def _plot_classes(names: list[str], synthetic: Counter, n_synthetic: int, source: Counter, n_source: int,
                  out_dir: Path) -> Path:
    import matplotlib.pyplot as plt

    def freq(counts: Counter, n: int, c: int) -> float:
        return counts.get(c, 0) / n if n else 0.0

    ids = [c for c in set(synthetic) | set(source) if c < len(names)]
    ids = sorted(ids, key=lambda c: -max(freq(synthetic, n_synthetic, c), freq(source, n_source, c)))[:TOP_CLASSES]
    fig, ax = plt.subplots(figsize=(7, 0.8 + 0.3 * max(len(ids), 1)))
    y = np.arange(len(ids))
    ax.barh(y - 0.2, [freq(source, n_source, c) for c in ids], 0.4, label=f"source ({n_source} images)",
            color="#55a868")
    ax.barh(y + 0.2, [freq(synthetic, n_synthetic, c) for c in ids], 0.4,
            label=f"synthetic ({n_synthetic} labelled images)", color="#8172b3")
    ax.set_yticks(y, [names[c] for c in ids], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("fraction of images containing the class")
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title("class frequency: synthetic vs source")
    return _save(fig, out_dir, "classes.png")


def _extremes(rows: list[_Row], name: str) -> tuple[list[tuple[float, _Row]], list[tuple[float, _Row]]]:
    scored = sorted(((r.scores[name], r) for r in rows if r.scores[name] is not None), key=lambda t: (t[0], t[1].key))
    return scored[::-1][:GRID_COUNT], scored[:GRID_COUNT]


def _plot_grids(store: OutputStore, rows: list[_Row], out_dir: Path) -> dict[str, Path]:
    import matplotlib.pyplot as plt

    wanted = {name: _extremes(rows, name) for name in SCORE_NAMES}
    wanted = {name: ext for name, ext in wanted.items() if ext[0]}
    needed = {(r.shard, r.key) for best, worst in wanted.values() for _, r in best + worst}
    images: dict[str, np.ndarray] = {}
    for shard in sorted({s for s, _ in needed}):
        for key, files in iter_shard_samples(store, store.shard_path(shard)):
            if (shard, key) in needed:
                ext = "jpg" if "jpg" in files else "png"
                images[key] = np.asarray(Image.open(io.BytesIO(files[ext])).convert("RGB"))
    paths = {}
    for name, (best, worst) in wanted.items():
        fig, axes = plt.subplots(2, GRID_COUNT, figsize=(2.2 * GRID_COUNT, 5), squeeze=False)
        for row, (label, picks) in enumerate((("best", best), ("worst", worst))):
            for col in range(GRID_COUNT):
                ax = axes[row, col]
                ax.axis("off")
                if col < len(picks):
                    value, r = picks[col]
                    ax.imshow(images[r.key])
                    ax.set_title(f"{label}: {value:.3g}\n{r.key}", fontsize=7)
        fig.suptitle(name, fontsize=10)
        paths[name] = _save(fig, out_dir, f"grid-{name}.png")
    return paths


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


def _score_stats(rows: list[_Row]) -> list[list]:
    out = []
    for name in SCORE_NAMES:
        v = np.array([r.scores[name] for r in rows if r.scores[name] is not None], dtype=float)
        stats = [f"{f(v):.4g}" for f in (np.mean, np.min, np.median, np.max)] if len(v) else ["-"] * 4
        out.append([name, len(v), len(rows) - len(v), *stats])
    return out


_STYLE = """
body { font-family: sans-serif; margin: 2em; color: #222; max-width: 1200px; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
th { background: #f0f0f0; }
img { max-width: 100%; margin: 0.5em 0; }
.note { color: #666; font-size: 0.9em; }
"""


def write_report(store: OutputStore, out_dir: str | Path, max_samples: int | None = None,
                 source_limit: int = 200) -> Path:
    """Write report.html and its PNG plots into `out_dir`; return the HTML file's path."""
    import matplotlib

    matplotlib.use("Agg")  # no display; must be chosen before pyplot is imported
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = store.read_json("manifest.json")
    if manifest is None:
        raise FileNotFoundError(f"{store.url}: no manifest.json, so no job has been planned here")
    stats = dict(store.iter_stats())
    scan = _scan(store, max_samples)
    table = stage_table(manifest, stats)
    source_counts, n_source, source_error = _source_classes(manifest, scan.source_ids, source_limit)
    selections = _selections(store)

    stages_png = _plot_stages(table, out_dir)
    scores_png = _plot_histograms(scan.rows, out_dir)
    classes_png = _plot_classes(manifest["classes"], scan.synthetic_classes, scan.synthetic_labeled,
                                source_counts, n_source, out_dir)
    grids = _plot_grids(store, scan.rows, out_dir)

    total = {k: sum(s[k] for s in stats.values()) for k in ("samples", "failed", "rejected")}
    filters = [[r["stage"], r["in"], r["in"] - r["rejected"], _pct(1 - r["rejected"] / r["in"] if r["in"] else None),
                _reasons(r["rejected_by_reason"])] for r in table if r["kind"] == "keep" or r["rejected"]]
    filters += [[f"selection {s['name']}", s["kept"] + s["dropped"], s["kept"],
                 _pct(s["kept"] / (s["kept"] + s["dropped"]) if s["kept"] + s["dropped"] else None),
                 _reasons(s["dropped_by_reason"])] for s in selections]
    scanned = f"{len(scan.rows)} of {total['samples']}" if len(scan.rows) < total["samples"] else "all"
    parts = [
        f"<h1>Factory report: {html.escape(manifest['name'])}</h1>",
        f'<p class="note">{html.escape(store.url)} &middot; spec {html.escape(manifest["spec_hash"])}</p>',
        _table(["shards", "samples written", "failed", "rejected", "synthetic", "labelled (seg.png)",
                "pseudo-labelled", "unlabelled"],
               [[f"{len(stats)}/{manifest['plan']['num_shards']}", total["samples"], total["failed"],
                 total["rejected"], scan.synthetic, scan.labeled, scan.pseudo_labeled,
                 len(scan.rows) - scan.labeled]]),
        "<h2>Samples and failures per stage</h2>",
        _table(["stage", "kind", "rows in", "passed", "pass rate", "failed", "failures by reason", "rejected",
                "rejections by reason"],
               [[r["stage"], r["kind"], r["in"], r["passed"], _pct(r["pass_rate"]), r["failed"],
                 _reasons(r["failed_by_reason"]), r["rejected"], _reasons(r["rejected_by_reason"])]
                for r in table]),
        _img(stages_png, "rows per stage"),
        "<h2>Filter pass rates</h2>",
        '<p class="note">Selection stages (rows they let through, of the rows that reached them) and the '
        "top-fraction selections written by <code>factory select</code>.</p>",
        _table(["filter", "rows in", "kept", "pass rate", "dropped by reason"], filters)
        if filters else '<p class="note">This job has no filter.</p>',
        f"<h2>Scores</h2><p class=\"note\">From {scanned} written samples. Null means the score's input "
        "was missing (no mask, no auto-label, no prompt).</p>",
        _table(["score", "n", "null", "mean", "min", "median", "max"], _score_stats(scan.rows)),
        _img(scores_png, "score histograms"),
        "<h2>Class frequency: synthetic vs source</h2>",
        f'<p class="note">Synthetic: {scan.synthetic_labeled} labelled synthetic samples. Source: {n_source} '
        f"source images the output was made from"
        + (f" (could not read the source: {html.escape(source_error)})" if source_error else "") + ".</p>",
        _img(classes_png, "class frequency"),
        "<h2>Best and worst samples by score</h2>",
    ]
    parts += [_img(path, f"best and worst by {name}") for name, path in grids.items()]
    if not grids:
        parts.append('<p class="note">No sample has a score.</p>')
    page = (f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>Factory report: "
            f"{html.escape(manifest['name'])}</title><style>{_STYLE}</style></head><body>"
            + "\n".join(parts) + "</body></html>")
    path = out_dir / "report.html"
    path.write_text(page, encoding="utf-8")
    return path


def _selections(store: OutputStore) -> list[dict]:
    store.fs.invalidate_cache()
    try:
        names = sorted(store.fs.ls(store.path(SELECTIONS_DIR), detail=False))
    except FileNotFoundError:
        return []
    return [store.read_json(SELECTIONS_DIR, n.rsplit("/", 1)[-1]) for n in names if n.endswith(".json")]


def main_report(output_url: str, out_dir: str, endpoint_url: str | None = None) -> int:
    """`factory report OUT [--out DIR]`: write the report, print where it is."""
    options = {"client_kwargs": {"endpoint_url": endpoint_url}} if endpoint_url else {}
    path = write_report(OutputStore(output_url, options), out_dir)
    print(f"wrote {path}")
    return 0
