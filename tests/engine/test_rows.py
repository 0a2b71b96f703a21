"""A shard as one Ray Data row (factory/engine/executors/rows.py): the arrays come back equal, as read-only
views of the row's memory (no copy in), and writing one copies the pixels once (no intermediate bytes)."""

import time
import tracemalloc

import numpy as np
import pyarrow as pa
import pytest

from factory.engine.executors.rows import shard_row, shard_works
from factory.engine.records import ShardWork, StepStats
from factory.sample import Sample

pytestmark = pytest.mark.unit


def shard(size: int = 256, flipped: bool = True) -> ShardWork:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    mask = rng.integers(0, 150, (size, size), dtype=np.uint8)
    samples = [
        Sample(shard=3, index=0, source_id="a", image=image, mask=mask, meta={"prompt": "a room"}),
        # Variants share the source's arrays; one holds a view that is not contiguous, one a uint16 map.
        Sample(
            shard=3,
            index=0,
            source_id="a",
            image=image[:, ::-1] if flipped else image,
            mask=mask,
            source_image=image,
            variant="0",
        ),
        Sample(shard=3, index=1, source_id="b", instances=np.arange(12, dtype=np.uint16).reshape(3, 4)),
        Sample(shard=3, index=2, source_id="c", error={"stage": "read", "reason": "corrupt", "detail": ""}),
    ]
    return ShardWork(shard=3, samples=samples, started=time.time(), stages={"read": StepStats(rows_out=4, seconds=0.1)})


def test_a_shard_comes_back_equal_and_its_arrays_are_read_only_views_of_the_row():
    work = shard()
    table = shard_row(work)
    [back] = shard_works(table)
    assert back.shard == 3 and back.stages == work.stages
    for got, sent in zip(back.samples, work.samples, strict=True):
        assert (got.key, got.meta, got.error) == (sent.key, sent.meta, sent.error)
        for name in ("image", "mask", "instances", "source_image"):
            a, b = getattr(got, name), getattr(sent, name)
            assert (a is None) == (b is None) and (a is None or (a.dtype == b.dtype and np.array_equal(a, b)))
    data = np.frombuffer(table.column("work").chunks[0].buffers()[2], dtype=np.uint8)
    image = back.samples[0].image
    assert np.shares_memory(image, data) and not image.flags.writeable
    # Shared arrays stay shared: one image and one mask in the row, not one per variant.
    assert back.samples[1].source_image is image
    assert data.nbytes < 2.2 * (image.nbytes + back.samples[0].mask.nbytes)


def test_writing_a_row_copies_the_pixels_once_and_no_more():
    work = shard(size=512, flipped=False)  # a view that is not contiguous is pickled in band
    pixels = 512 * 512 * 4
    tracemalloc.start()
    table = shard_row(work)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # Python's heap held no copy of the pixels (no `bytes` of the pickle): the one copy is Arrow's buffer.
    assert peak < pixels / 10, peak
    assert pa.total_allocated_bytes() >= table.nbytes >= pixels


def test_rows_read_from_a_table_of_several_chunks_and_slices():
    tables = [shard_row(shard(size=8)) for _ in range(3)]
    table = pa.concat_tables(tables).slice(1, 2)
    assert [w.shard for w in shard_works(table)] == [3, 3]
    assert np.array_equal(shard_works(table)[1].samples[0].image, shard(size=8).samples[0].image)
