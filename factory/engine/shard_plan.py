"""Planning: a sorted listing of sample ids cut into shards of N, stored as parquet, one row group per shard.

The listing is consumed as a stream and written out one shard at a time, so the planner never holds more
than one shard of ids. The plan is split into parts of `SHARDS_PER_PART` shards (`plan/part-00000.parquet`
holds shards 0-255): a worker reads one part's footer and one row group, so reading a shard costs the same
at ten shards as at a hundred thousand. Output shard i holds everything derived from the ids of shard i,
which is what makes a shard regenerable on its own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq

from factory.engine.errors import FactoryError
from factory.output.layout import PLAN_DIR, SHARDS_PER_PART, plan_part_name

_SCHEMA = pa.schema([("sample_id", pa.string())])


class PlanError(FactoryError, ValueError):
    pass


@dataclass(frozen=True)
class Plan:
    num_samples: int
    shard_size: int

    @property
    def num_shards(self) -> int:
        return -(-self.num_samples // self.shard_size)

    def shard_count(self, shard: int) -> int:
        """Number of source samples in a shard (the last one may be short)."""
        return min(self.shard_size, self.num_samples - shard * self.shard_size)

    def summary(self) -> dict:
        return {
            "num_samples": self.num_samples,
            "num_shards": self.num_shards,
            "shard_size": self.shard_size,
            "dir": PLAN_DIR,
            "shards_per_part": SHARDS_PER_PART,
        }


def plan_shards(ids: Iterable[str], shard_size: int, open_part: Callable[[str], BinaryIO]) -> Plan:
    """Write ids (sorted ascending, unique) as one row group per shard into parts opened by `open_part(name)`.

    Raises PlanError if the listing is empty or not strictly increasing: a duplicate or an unstable
    order would make shard contents depend on the run, which breaks resume.
    """
    count = 0
    previous = None
    sink = writer = None
    try:
        for shard, chunk in enumerate(_chunks(ids, shard_size)):
            for sample_id in chunk:
                if previous is not None and sample_id <= previous:
                    raise PlanError(
                        f"the listing is not strictly increasing at {previous!r} -> {sample_id!r} "
                        "(duplicate or unsorted sample ids)"
                    )
                previous = sample_id
            if shard % SHARDS_PER_PART == 0:
                _close(writer, sink)
                sink = open_part(plan_part_name(shard))
                writer = pq.ParquetWriter(sink, _SCHEMA)
            assert writer is not None  # shard 0 opened the first part
            writer.write_table(pa.table({"sample_id": chunk}, schema=_SCHEMA), row_group_size=shard_size)
            count += len(chunk)
    finally:
        _close(writer, sink)
    if count == 0:
        raise PlanError("the source lists no samples")
    return Plan(num_samples=count, shard_size=shard_size)


def _close(writer, sink) -> None:
    if writer is not None:
        writer.close()
    if sink is not None:
        sink.close()


def _chunks(ids: Iterable[str], size: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for sample_id in ids:
        chunk.append(sample_id)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def read_shard_ids(part, shard: int) -> list[str]:
    """The sample ids of one shard, from its plan part (a path or an open binary file)."""
    row_group = shard % SHARDS_PER_PART
    return pq.ParquetFile(part).read_row_group(row_group, columns=["sample_id"]).column(0).to_pylist()
