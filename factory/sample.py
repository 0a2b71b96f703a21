"""The unit every part of the factory shares: a `Sample` (one source sample, or a variant derived from it),
and `BadSample`, the one exception that means "this sample's data is bad". A shard of samples in flight
is `factory.engine.records.ShardWork`."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np


class BadSample(Exception):
    """An input that cannot be used; `reason` is a short stable word counted in the shard stats.

    This is the one exception that means "this sample's data is bad": readers raise it, and a stage may
    raise it from `process` (the engine then finds the sample that caused it). Every other exception is
    an infrastructure failure, retried and never committed as a lost sample.
    """

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def derive_seed(job_seed: int, source_id: str, variant: str, salt: str = "") -> int:
    """A 63-bit seed fixed by (job seed, sample id, variant path): a regenerated shard gets the same one."""
    digest = hashlib.sha256(f"{job_seed}\x00{source_id}\x00{variant}\x00{salt}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


@dataclass
class Sample:
    """A sample in flight. Stages never drop one: they fill it, expand it into variants, or mark it.

    `variant` is the sample's path through the expanding stages: "" for a source sample, then one
    zero-padded part per stage that expanded it ("3", then "3-0"). A child's path extends its parent's,
    so no two rows of a source ever share a key, whatever stages expand or reject in between.

    Arrays are shared between the variants of one source (and pickled once per shard, not once per
    variant): stages assign new arrays, never write into these in place.
    """

    shard: int
    index: int  # position of the source sample in its shard
    source_id: str
    image: np.ndarray | None = None  # (H, W, 3) uint8 RGB
    mask: np.ndarray | None = None  # (H, W) class ids, uint8 (uint16 for > 254 classes), ignore 255
    instances: np.ndarray | None = None  # (H, W) uint16 instance ids, 0 = no instance
    source_image: np.ndarray | None = None  # the real image a synthetic one was made from (for scoring)
    meta: dict = field(default_factory=dict)  # JSON-able: prompt, seed, scores, model ids
    variant: str = ""
    error: dict | None = None  # {"stage", "reason", "detail"}: failed, written to stats only
    rejected: dict | None = None  # {"stage", "reason", "detail"}: filtered out by a selection stage

    @property
    def key(self) -> str:
        """WebDataset key: dot-free, deterministic, unique within the job."""
        base = f"{self.shard:06d}-{self.index:06d}"
        return f"{base}-{self.variant}" if self.variant else base

    @property
    def ok(self) -> bool:
        return self.error is None and self.rejected is None

    def array(self, name: Literal["image", "mask", "source_image"]) -> np.ndarray:
        """An array the caller knows is there: it checked, or the recipe's earlier stages always fill it.

        A missing one is a bug in a stage or a recipe, not bad data: it fails the batch as any bug does,
        with a message that names the array (not an AttributeError on None somewhere in numpy or PIL).
        """
        value = getattr(self, name)
        if value is None:
            raise ValueError(f"sample {self.key} has no {name}")
        return value

    def seed(self, job_seed: int, salt: str = "") -> int:
        return derive_seed(job_seed, self.source_id, self.variant, salt)

    def fail(self, stage: str, reason: str, detail: str = "") -> Sample:
        self.error = {"stage": stage, "reason": reason, "detail": detail[:500]}
        self.image = self.mask = self.instances = self.source_image = None
        return self

    def reject(self, stage: str, reason: str, detail: str = "") -> Sample:
        """Mark as filtered out; the pixels stay, for the optional rejected shard set."""
        self.rejected = {"stage": stage, "reason": reason, "detail": detail[:500]}
        return self

    def expand(self, k: int) -> list[Sample]:
        """k variants of this sample (their own meta, shared arrays); k == 1 adds no level to the path."""
        if k == 1:
            return [replace(self, meta=dict(self.meta))]
        width = len(str(k - 1))  # zero-padded, so keys sort in variant order within a level
        prefix = f"{self.variant}-" if self.variant else ""
        return [replace(self, meta=dict(self.meta), variant=f"{prefix}{j:0{width}d}") for j in range(k)]
