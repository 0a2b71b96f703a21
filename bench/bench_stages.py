"""Cheap stages for the scale benchmark, loaded by the engine as `bench_stages:Class` like any plug-in."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict

from factory.stages import Stage


class ExpandParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    variants: int = 2


class ExpandStage(Stage):
    """K variants per input, each with a new image (so a row really holds K images)."""

    name = "bench-expand"
    Params = ExpandParams

    def variants_per_input(self) -> int:
        return self.params.variants

    def process(self, samples):
        out = []
        for s in samples:
            for j, v in enumerate(s.expand(self.params.variants)):
                v.image = np.roll(s.image, j + 1, axis=1)
                out.append(v)
        return out


class RejectParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    fraction: float = 0.25
    sleep_s: float = 0.0  # sleep this long on the source `sleep_id`, or on every shard's `sleep_index`th
    sleep_id: str = ""
    sleep_index: int = -1
    marker_dir: str = ""  # where the sleep writes when it starts and ends


class RejectStage(Stage):
    """Rejects a fixed fraction of rows (by a hash of the key); optionally sleeps on one source sample, or on
    one sample of every shard."""

    name = "bench-reject"
    Params = RejectParams

    def process(self, samples):
        for s in samples:
            if s.index == self.params.sleep_index and s.variant.endswith("0"):
                time.sleep(self.params.sleep_s)
            if s.source_id == self.params.sleep_id and s.variant.endswith("0"):
                Path(self.params.marker_dir, "sleep-start").write_text(str(time.time()))
                time.sleep(self.params.sleep_s)
                Path(self.params.marker_dir, "sleep-end").write_text(str(time.time()))
            h = int.from_bytes(hashlib.sha256(s.key.encode()).digest()[:4], "big") / 2**32
            if h < self.params.fraction:
                s.reject(self.context.label, "hashed_out")
        return samples
