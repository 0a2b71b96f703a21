"""What crosses a boundary between the engine's steps, typed: the shard in flight, a shard's result, a
failure, what a step did with a shard, and the job facts every shard's files carry.

Each turns into the JSON it is written as (`to_json`), and the one that travels through Ray Data as a
row (`ShardResult`) back from it; everything else holds these objects, never loose dicts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

from factory.engine.errors import describe
from factory.sample import Sample


@dataclass(frozen=True)
class Failure:
    """A step failed on a shard for a reason that is not the data, after its retries: the shard stays
    uncommitted and a rerun tries it again."""

    stage: str  # the step: read, a stage's label, write, commit or worker
    cause: str  # one line: the root exception's type and message
    advice: str  # what the user should do

    @classmethod
    def of(cls, stage: str, exc: BaseException) -> Failure:
        return cls(stage=stage, **describe(exc))


@dataclass
class StepStats:
    """What one step (the read, or a stage) did with one shard; written under `stages` in its stats file."""

    rows_out: int
    seconds: float
    rows_in: int | None = None  # the stage steps only
    batches: int | None = None
    retries: int | None = None
    oom_splits: int | None = None
    worker_setup_s: float | None = None  # in the stats of the first shard a stage worker processed
    # The stage worker's peak private memory while it ran the shard (the whole process: its models too)
    peak_private_mib: float | None = None

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class JobInfo:
    """The job a shard belongs to: in every sample's json and in every shard's stats."""

    job: str
    spec_hash: str
    models: dict[str, dict[str, str]] = field(default_factory=dict)  # stage label -> model ids
    # stage label -> model name -> the pinned weights' record (factory/models/weights.py WeightsPin.record)
    weights: dict[str, dict[str, dict]] = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ShardResult:
    """What the driver counts of a shard: committed, or failed (with why), and its row counts."""

    shard: int
    status: Literal["committed", "failed"]
    samples: int = 0
    failed: int = 0
    rejected: int = 0
    failure: Failure | None = None

    @property
    def committed(self) -> bool:
        return self.status == "committed"

    @property
    def why(self) -> Failure:
        """The failure of a failed shard, which always has one."""
        if self.failure is None:
            raise ValueError(f"shard {self.shard} is {self.status}, with no failure recorded")
        return self.failure

    @classmethod
    def failed_at(
        cls, shard: int, failure: Failure, samples: int = 0, failed: int = 0, rejected: int = 0
    ) -> ShardResult:
        return cls(shard, "failed", samples, failed, rejected, failure)

    def to_row(self) -> dict:
        """A flat row for Ray Data (one column per field); `from_row` reads it back."""
        failure = asdict(self.failure) if self.failure else dict.fromkeys(("stage", "cause", "advice"))
        return {
            "shard": self.shard,
            "status": self.status,
            "samples": self.samples,
            "failed": self.failed,
            "rejected": self.rejected,
            **failure,
        }

    @classmethod
    def from_row(cls, row: dict) -> ShardResult:
        failure = Failure(row["stage"], row["cause"], row["advice"]) if row.get("stage") is not None else None
        return cls(
            int(row["shard"]), row["status"], int(row["samples"]), int(row["failed"]), int(row["rejected"]), failure
        )


@dataclass
class ShardWork:
    """One shard in flight: the pipeline's row from the read step, through every stage, to the writer.

    `samples` stay in shard order (source position, then variant path). `stages` collects what each
    stage did with the shard (seconds, batches, retries, out-of-memory splits) for the stats. `failure`
    is set when a step failed for a reason that is not the data (after its retries): later steps pass
    the row on untouched, and the writer leaves the shard uncommitted for the next run.
    """

    shard: int
    samples: list[Sample]
    started: float
    stages: dict[str, StepStats] = field(default_factory=dict)
    failure: Failure | None = None
