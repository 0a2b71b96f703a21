"""The plots of `factory report`, drawn with matplotlib and saved as PNG files beside the page."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from factory.output.samples import decode_image
from factory.output.scores import SCORE_NAMES
from factory.tools.streamstats import Extremes, ScoreSummary

GRID_COUNT = 4  # best and worst samples shown per score
TOP_CLASSES = 25


def _save(fig, out_dir: Path, name: str) -> Path:
    import matplotlib.pyplot as plt

    path = out_dir / name
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_stages(table: list[dict], out_dir: Path) -> Path:
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


def plot_histograms(scores: dict[str, ScoreSummary], out_dir: Path) -> Path:
    import matplotlib.pyplot as plt

    cols = 4
    fig, axes = plt.subplots(2, cols, figsize=(3.2 * cols, 5.6))
    for ax, name in zip(axes.ravel(), SCORE_NAMES):
        summary = scores[name]
        if summary.n:
            counts, edges = summary.histogram()
            ax.stairs(counts, edges, fill=True, color="#4c72b0")
        else:
            ax.text(0.5, 0.5, "all null", ha="center", va="center", transform=ax.transAxes, color="grey")
        ax.set_title(f"{name}\nn={summary.n}  null={summary.nulls}", fontsize=9)
        ax.tick_params(labelsize=7)
    for ax in axes.ravel()[len(SCORE_NAMES) :]:
        ax.axis("off")
    fig.tight_layout()
    return _save(fig, out_dir, "scores.png")


def plot_classes(
    names: list[str], synthetic: Counter, n_synthetic: int, source: Counter, n_source: int, out_dir: Path
) -> Path:
    import matplotlib.pyplot as plt

    def freq(counts: Counter, n: int, c: int) -> float:
        return counts.get(c, 0) / n if n else 0.0

    ids = [c for c in set(synthetic) | set(source) if c < len(names)]
    ids = sorted(ids, key=lambda c: -max(freq(synthetic, n_synthetic, c), freq(source, n_source, c)))[:TOP_CLASSES]
    fig, ax = plt.subplots(figsize=(7, 0.8 + 0.3 * max(len(ids), 1)))
    y = np.arange(len(ids))
    ax.barh(
        y - 0.2, [freq(source, n_source, c) for c in ids], 0.4, label=f"source ({n_source} images)", color="#55a868"
    )
    ax.barh(
        y + 0.2,
        [freq(synthetic, n_synthetic, c) for c in ids],
        0.4,
        label=f"synthetic ({n_synthetic} labelled images)",
        color="#8172b3",
    )
    ax.set_yticks(y, [names[c] for c in ids], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("fraction of images containing the class")
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title("class frequency: synthetic vs source")
    return _save(fig, out_dir, "classes.png")


def plot_grids(extremes: dict[str, Extremes], out_dir: Path) -> dict[str, Path]:
    import matplotlib.pyplot as plt

    paths = {}
    for name, kept in extremes.items():
        best, worst = kept.best(), kept.worst()
        if not best:
            continue
        fig, axes = plt.subplots(2, GRID_COUNT, figsize=(2.2 * GRID_COUNT, 5), squeeze=False)
        for row, (label, picks) in enumerate((("best", best), ("worst", worst))):
            for col in range(GRID_COUNT):
                ax = axes[row, col]
                ax.axis("off")
                if col < len(picks):
                    value, key, files = picks[col]
                    ax.imshow(decode_image(files))
                    ax.set_title(f"{label}: {value:.3g}\n{key}", fontsize=7)
        fig.suptitle(name, fontsize=10)
        paths[name] = _save(fig, out_dir, f"grid-{name}.png")
    return paths
