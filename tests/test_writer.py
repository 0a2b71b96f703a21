import pytest
from helpers import read_tar

from factory.store import OutputStore
from factory.writer import EncodedSample, ShardWriter

pytestmark = pytest.mark.timeout(60)


def record(index, variant=0, variants=1):
    key = f"000000-{index:06d}-{variant:03d}"
    return EncodedSample(0, index, variant, variants, key, f"s-{index}", {"png": b"x", "json": b"{}"}, None, None)


def test_rows_are_written_in_key_order_and_retries_are_not_duplicated(tmp_path):
    store = OutputStore(str(tmp_path))
    writer = ShardWriter(store, {0: 3}, {})
    assert writer.add([record(2), record(1, 1, 2)]) == []
    assert writer.add([record(1, 1, 2), record(0)]) == []  # a retried task sends (1, 1) again
    assert writer.add([record(1, 0, 2)]) == [0]
    assert writer.add([record(2)]) == []  # a retry after the commit changes nothing
    assert list(read_tar(tmp_path / "shards" / "shard-000000.tar")) == [
        "000000-000000-000", "000000-000001-000", "000000-000001-001", "000000-000002-000",
    ]
