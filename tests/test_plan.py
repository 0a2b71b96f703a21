import io
import tracemalloc

import pytest

from factory.plan import Plan, PlanError, plan_shards, read_shard_ids

pytestmark = pytest.mark.timeout(120)


def test_shards_are_row_groups():
    sink = io.BytesIO()
    ids = [f"img-{i:04d}" for i in range(10)]
    plan = plan_shards(iter(ids), 4, sink)
    assert plan == Plan(num_samples=10, shard_size=4)
    assert (plan.num_shards, plan.shard_count(0), plan.shard_count(2)) == (3, 4, 2)
    sink.seek(0)
    assert [read_shard_ids(io.BytesIO(sink.getvalue()), s) for s in range(3)] == [ids[:4], ids[4:8], ids[8:]]


@pytest.mark.parametrize("ids", [["b", "a"], ["a", "a"]])
def test_unsorted_or_duplicate_listing_is_refused(ids):
    with pytest.raises(PlanError, match="strictly increasing"):
        plan_shards(iter(ids), 4, io.BytesIO())


def test_empty_listing_is_refused():
    with pytest.raises(PlanError, match="no samples"):
        plan_shards(iter([]), 4, io.BytesIO())


def test_million_sample_plan_streams_in_bounded_memory(tmp_path):
    """A million ids arrive as a stream; the driver holds one shard of them at a time."""
    n = 1_000_000
    tracemalloc.start()
    with open(tmp_path / "plan.parquet", "wb") as sink:
        plan = plan_shards((f"ADE_train_{i:08d}" for i in range(n)), 1000, sink)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert plan.num_shards == 1000
    # The ids alone are ~70 MB as Python strings; the planner must stay far below that.
    assert peak < 16 * 2**20, f"planning peaked at {peak / 2**20:.1f} MiB"
    assert read_shard_ids(str(tmp_path / "plan.parquet"), 999)[-1] == f"ADE_train_{n - 1:08d}"
