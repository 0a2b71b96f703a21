"""The unit that flows between stages: one sample of one source, or one variant derived from it."""

from __future__ import annotations

import hashlib
import pickle
from dataclasses import dataclass, field, replace

import numpy as np


class BadSample(Exception):
    """An input that cannot be used; `reason` is a short stable word counted in the shard stats."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def derive_seed(job_seed: int, source_id: str, variant: int, salt: str = "") -> int:
    """A 63-bit seed fixed by (job seed, sample id, variant): a regenerated shard gets the same one."""
    digest = hashlib.sha256(f"{job_seed}\x00{source_id}\x00{variant}\x00{salt}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


@dataclass
class Sample:
    """A sample in flight. Stages never drop one: they fill it, expand it into variants, or mark it.

    `variants` is how many rows the sample's branch was split into: each row is 1/variants of its source.
    The shard writer commits a shard once every source position has delivered all of itself (written,
    failed or rejected rows), whatever the mix of expansions its rows went through.
    """

    shard: int
    index: int
    source_id: str
    image: np.ndarray | None = None  # (H, W, 3) uint8 RGB
    mask: np.ndarray | None = None  # (H, W) class ids, uint8 (uint16 for > 254 classes), ignore 255
    instances: np.ndarray | None = None  # (H, W) int32 instance ids, 0 = no instance
    source_image: np.ndarray | None = None  # the real image a synthetic one was made from (for scoring)
    meta: dict = field(default_factory=dict)  # JSON-able: prompt, seed, scores, model ids
    variant: int = 0
    variants: int = 1
    error: dict | None = None  # {"stage", "reason", "detail"}: failed, written to stats only
    rejected: dict | None = None  # {"stage", "reason", "detail"}: filtered out by a selection stage

    def reject(self, stage: str, reason: str, detail: str = "") -> "Sample":
        """Mark as filtered out; the pixels stay, for the optional rejected shard set."""
        self.rejected = {"stage": stage, "reason": reason, "detail": detail[:500]}
        return self

    @property
    def key(self) -> str:
        """WebDataset key: dot-free, deterministic, unique within the job."""
        return f"{self.shard:06d}-{self.index:06d}-{self.variant:03d}"

    @property
    def ok(self) -> bool:
        return self.error is None and self.rejected is None

    def seed(self, job_seed: int, salt: str = "") -> int:
        return derive_seed(job_seed, self.source_id, self.variant, salt)

    def fail(self, stage: str, reason: str, detail: str = "") -> "Sample":
        self.error = {"stage": stage, "reason": reason, "detail": detail[:500]}
        self.image = self.mask = self.instances = self.source_image = None
        return self

    def expand(self, k: int) -> list["Sample"]:
        """k variants of this sample; variant numbers stay unique when stages expand one after another."""
        return [
            replace(self, meta=dict(self.meta), variant=self.variant * k + j, variants=self.variants * k)
            for j in range(k)
        ]

    def to_bytes(self) -> bytes:
        return pickle.dumps(self, protocol=5)

    @staticmethod
    def from_bytes(data: bytes) -> "Sample":
        return pickle.loads(data)
