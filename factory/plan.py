"""Planning: a sorted listing of sample ids cut into shards of N, stored as one parquet row group per shard.

The listing is consumed as a stream and written out in chunks, so the driver never holds more than one
chunk of ids; a worker reads only its own shard's row group. Output shard i holds everything derived
from the ids of row group i, which is what makes a shard regenerable on its own.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

PLAN_FILE = "plan.parquet"
_SCHEMA = pa.schema([("sample_id", pa.string())])


class PlanError(ValueError):
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
        return {"num_samples": self.num_samples, "num_shards": self.num_shards, "shard_size": self.shard_size}


def plan_shards(ids: Iterable[str], shard_size: int, sink) -> Plan:
    """Write ids (sorted ascending, unique) to `sink` (a binary file) as one row group per shard.

    Raises PlanError if the listing is empty or not strictly increasing: a duplicate or an unstable
    order would make shard contents depend on the run, which breaks resume.
    """
    writer = pq.ParquetWriter(sink, _SCHEMA)
    count = 0
    previous = None
    try:
        for chunk in _chunks(ids, shard_size):
            for sample_id in chunk:
                if previous is not None and sample_id <= previous:
                    raise PlanError(
                        f"the listing is not strictly increasing at {previous!r} -> {sample_id!r} "
                        "(duplicate or unsorted sample ids)"
                    )
                previous = sample_id
            writer.write_table(pa.table({"sample_id": chunk}, schema=_SCHEMA), row_group_size=shard_size)
            count += len(chunk)
    finally:
        writer.close()
    if count == 0:
        raise PlanError("the source lists no samples")
    return Plan(num_samples=count, shard_size=shard_size)


def _chunks(ids: Iterable[str], size: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for sample_id in ids:
        chunk.append(sample_id)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def read_shard_ids(source, shard: int) -> list[str]:
    """The sample ids of one shard, from a plan file path or open binary file."""
    return pq.ParquetFile(source).read_row_group(shard, columns=["sample_id"]).column(0).to_pylist()
