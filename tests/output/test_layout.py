import pytest

from factory.output.layout import OutputStore

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("scheme", ["", "file://"])
def test_plain_paths_and_file_urls_name_the_same_folder(tmp_path, scheme):
    store = OutputStore(f"{scheme}{tmp_path}/out")
    store.ensure_root()
    store.write_json({"a": 1}, "stats", "shard-000003.json")
    assert store.read_json("stats", "shard-000003.json") == {"a": 1}
    assert store.committed_shards() == [3]
    assert store.public_url("shards", "shard-000003.tar") == f"{tmp_path}/out/shards/shard-000003.tar"
    assert not list((tmp_path / "out" / "stats").glob("*.partial"))


def test_a_missing_output_has_no_manifest_and_no_shards(tmp_path):
    store = OutputStore(str(tmp_path / "nothing"))
    assert store.read_json("manifest.json") is None
    assert store.committed_shards() == []
