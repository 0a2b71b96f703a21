"""Bounded summaries of a stream of values, for tools that read every sample of an output (`report`).

Memory is fixed whatever the number of samples: a score keeps its first `bins` values exactly, then a
histogram of `bins` bins whose range doubles (merging neighbouring bins) when a value falls outside it,
so every count stays exact and only the bin width coarsens. The best and worst samples are kept in
bounded lists.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np


class ScoreSummary:
    """Count, nulls, mean, min, max, median and a histogram of one score's values."""

    def __init__(self, bins: int = 1024):
        if bins < 2 or bins % 2:
            raise ValueError(f"bins must be an even number >= 2, got {bins}")
        self.bins = bins
        self.n = self.nulls = 0
        self.total = 0.0
        self.low = self.high = math.nan
        self.exact: list[float] | None = []  # the values, until there are more than `bins` of them
        self.counts = np.zeros(0, dtype=np.int64)  # the histogram's bins, once binned
        self.lo = self.width = 0.0

    def add(self, value: float | None) -> None:
        if value is None:
            self.nulls += 1
            return
        value = float(value)
        self.n += 1
        self.total += value
        self.low, self.high = (value, value) if self.n == 1 else (min(self.low, value), max(self.high, value))
        if self.exact is not None:
            self.exact.append(value)
            if len(self.exact) > self.bins:
                self._start_bins(self.exact)
            return
        self._bin(value)

    @property
    def binned(self) -> bool:
        return self.exact is None

    @property
    def mean(self) -> float:
        return self.total / self.n if self.n else math.nan

    def median(self) -> float:
        """Exact while the values are kept; then the centre of the bin holding the median (within half a
        bin width of it)."""
        if self.n == 0:
            return math.nan
        if self.exact is not None:
            return float(np.median(self.exact))
        i = int(np.searchsorted(np.cumsum(self.counts), (self.n + 1) / 2))
        return self.lo + (i + 0.5) * self.width

    def histogram(self, max_bars: int = 30) -> tuple[np.ndarray, np.ndarray]:
        """(counts, edges) with at most `max_bars` bars over the values' range."""
        if self.exact is not None:
            return np.histogram(self.exact, bins=min(max_bars, max(5, len(set(self.exact)))))
        nonzero = np.flatnonzero(self.counts)
        first, last = int(nonzero[0]), int(nonzero[-1]) + 1
        group = -(-(last - first) // max_bars)
        used = self.counts[first:last]
        used = np.concatenate([used, np.zeros(-len(used) % group, dtype=used.dtype)])
        counts = used.reshape(-1, group).sum(axis=1)
        edges = self.lo + self.width * (first + group * np.arange(len(counts) + 1))
        return counts, edges

    def _start_bins(self, values: list[float]) -> None:
        self.exact = None
        span = (self.high - self.low) or max(abs(self.low), 1.0)
        self.lo, self.width = self.low, span * (1 + 1e-9) / self.bins
        self.counts = np.zeros(self.bins, dtype=np.int64)
        for v in values:
            self._bin(v)

    def _bin(self, value: float) -> None:
        half = self.bins // 2
        while value < self.lo:  # double the range to the left
            self.counts = np.concatenate([np.zeros(half, np.int64), self.counts.reshape(half, 2).sum(axis=1)])
            self.lo -= self.width * self.bins
            self.width *= 2
        while value >= self.lo + self.width * self.bins:  # double it to the right
            self.counts = np.concatenate([self.counts.reshape(half, 2).sum(axis=1), np.zeros(half, np.int64)])
            self.width *= 2
        self.counts[min(int((value - self.lo) / self.width), self.bins - 1)] += 1


class Extremes:
    """The `count` highest and lowest (value, key) pairs seen, each with a payload (e.g. image bytes)."""

    def __init__(self, count: int):
        self.count = count
        self.items: list[tuple[float, str, Any]] = []

    def add(self, value: float, key: str, payload: Any) -> None:
        self.items.append((value, key, payload))
        if len(self.items) >= 4 * self.count:
            self._trim()

    def _trim(self) -> None:
        ordered = sorted(self.items, key=lambda t: (t[0], t[1]))
        self.items = ordered if len(ordered) <= 2 * self.count else ordered[: self.count] + ordered[-self.count :]

    def best(self) -> list[tuple[float, str, Any]]:
        return sorted(self.items, key=lambda t: (t[0], t[1]), reverse=True)[: self.count]

    def worst(self) -> list[tuple[float, str, Any]]:
        return sorted(self.items, key=lambda t: (t[0], t[1]))[: self.count]
