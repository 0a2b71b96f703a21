"""A shard as one Ray Data row, with one copy of its pixels on the way out and none on the way in.

The row's `work` value is a `ShardWork` pickled with protocol 5, its arrays kept out of band:

    [count, head size, size of each buffer] (little-endian uint64) | head pickle | buffer | buffer ...

each buffer starting on a 64-byte boundary. An array shared by several samples (the source image of
every variant, a mask each variant keeps) is one object to pickle and stored once.

Writing copies each array once, straight into the Arrow buffer that becomes the block: no intermediate
`bytes`, no second copy by `pa.array` (an array that is not contiguous, a flipped view, is pickled in
band and copied once more). Reading takes the Arrow value's memory as it is (Ray Data hands an actor a
block mapped from the object store) and unpickles the arrays as views of it: no copy at all, and
read-only wherever the row came from, as the samples' contract asks (stages assign new arrays, never
write into the ones they were given).

A row carries a whole shard, possibly past 2 GiB: `large_binary` (64-bit offsets).
"""

from __future__ import annotations

import pickle

import numpy as np
import pyarrow as pa

from factory.engine.records import ShardWork

_ALIGN = 64


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def shard_row(work: ShardWork) -> pa.Table:
    buffers: list[pickle.PickleBuffer] = []
    head = pickle.dumps(work, protocol=5, buffer_callback=buffers.append)
    raws = [b.raw() for b in buffers]
    sizes = [len(head), *(r.nbytes for r in raws)]
    index = np.array([len(raws), *sizes], dtype="<u8").tobytes()
    starts, at = [], _aligned(len(index) + len(head))
    for raw in raws:
        starts.append(at)
        at = _aligned(at + raw.nbytes)
    data = pa.allocate_buffer(at)
    view = memoryview(data).cast("B")  # an Arrow buffer of its own allocation is writable
    view[: len(index)] = index
    view[len(index) : len(index) + len(head)] = head
    for start, raw in zip(starts, raws, strict=True):
        view[start : start + raw.nbytes] = raw
    offsets = pa.py_buffer(np.array([0, at], dtype="<i8").tobytes())
    work_column = pa.Array.from_buffers(pa.large_binary(), 1, [None, offsets, data])
    return pa.table({"shard": pa.array([work.shard], pa.int64()), "work": work_column})


def shard_works(table: pa.Table) -> list[ShardWork]:
    column = table.column("work")
    return [_work(chunk, i) for chunk in column.chunks for i in range(len(chunk))]


def _work(chunk: pa.Array, i: int) -> ShardWork:
    offsets = np.frombuffer(chunk.buffers()[1], dtype="<i8")[chunk.offset + i : chunk.offset + i + 2]
    value = memoryview(chunk.buffers()[2]).toreadonly()[int(offsets[0]) : int(offsets[1])]
    count = int(np.frombuffer(value[:8], dtype="<u8")[0])
    sizes = np.frombuffer(value[8 : 8 * (count + 2)], dtype="<u8").tolist()
    at = 8 * (count + 2)
    head = value[at : at + sizes[0]]
    pieces, at = [], _aligned(at + sizes[0])
    for size in sizes[1:]:
        pieces.append(value[at : at + size])
        at = _aligned(at + size)
    return pickle.loads(head, buffers=pieces)
