import tracemalloc

import pytest

from factory.engine.shard_plan import Plan, PlanError, plan_shards, read_shard_ids
from factory.output.layout import SHARDS_PER_PART, plan_part_name

pytestmark = pytest.mark.timeout(120)


def opener(folder):
    return lambda name: open(folder / name, "wb")


def test_shards_are_row_groups(tmp_path):
    ids = [f"img-{i:04d}" for i in range(10)]
    plan = plan_shards(iter(ids), 4, opener(tmp_path))
    assert plan == Plan(num_samples=10, shard_size=4)
    assert (plan.num_shards, plan.shard_count(0), plan.shard_count(2)) == (3, 4, 2)
    assert [read_shard_ids(str(tmp_path / plan_part_name(s)), s) for s in range(3)] == [ids[:4], ids[4:8], ids[8:]]


@pytest.mark.parametrize("ids", [["b", "a"], ["a", "a"]])
def test_unsorted_or_duplicate_listing_is_refused(tmp_path, ids):
    with pytest.raises(PlanError, match="strictly increasing"):
        plan_shards(iter(ids), 4, opener(tmp_path))


def test_empty_listing_is_refused(tmp_path):
    with pytest.raises(PlanError, match="no samples"):
        plan_shards(iter([]), 4, opener(tmp_path))


def test_million_sample_plan_streams_in_bounded_memory(tmp_path):
    """A million ids arrive as a stream; the planner holds one shard of them at a time."""
    n = 1_000_000
    tracemalloc.start()
    plan = plan_shards((f"ADE_train_{i:08d}" for i in range(n)), 1000, opener(tmp_path))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert plan.num_shards == 1000
    # The ids alone are ~70 MB as Python strings; the planner must stay far below that.
    assert peak < 16 * 2**20, f"planning peaked at {peak / 2**20:.1f} MiB"
    # Parts of SHARDS_PER_PART shards: reading a shard opens one bounded footer, whatever the plan's size.
    assert len(list(tmp_path.glob("part-*.parquet"))) == -(-1000 // SHARDS_PER_PART)
    assert read_shard_ids(str(tmp_path / plan_part_name(999)), 999)[-1] == f"ADE_train_{n - 1:08d}"
    assert read_shard_ids(str(tmp_path / plan_part_name(256)), 256)[0] == "ADE_train_00256000"
