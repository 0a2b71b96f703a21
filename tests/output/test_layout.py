import threading

import pytest

from factory.output.layout import LEASE_FILE, OutputStore

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


def test_clearing_tmp_is_no_error_while_another_thread_writes_through_it(tmp_path):
    """A run clears `_tmp/` while other writers may still go through it (its lease heartbeat writes there and
    renames into place): a file renamed or removed mid-clear, or a folder that gained a file, is no error,
    and the leftovers of earlier attempts go. (The lease holds its renewals while the run clears:
    tests/engine/test_lease.py.)"""
    store = OutputStore(str(tmp_path / "out"))
    store.ensure_root()
    stop, wrote = threading.Event(), threading.Event()
    written = []

    def writer():
        while not stop.is_set():
            try:
                store.write_json({"beat": len(written)}, LEASE_FILE)
                written.append(True)
                wrote.set()
            except OSError:  # its own file or `_tmp/` removed under it: the writer's concern, not the clear's
                pass

    writing = threading.Thread(target=writer)
    writing.start()
    try:
        for attempt in range(300):
            (tmp_path / "out" / "_tmp" / "attempts").mkdir(parents=True, exist_ok=True)
            (tmp_path / "out" / "_tmp" / "attempts" / "shard-000001.json").write_text("{}")
            (tmp_path / "out" / "_tmp" / f"{attempt}.shard-000002.tar").write_bytes(b"partial")
            store.clear_tmp()
            if attempt % 10 == 9:
                # Between bursts of clears the writer finishes a write, however the threads are scheduled: a
                # writer that never got through while the clears ran back to back proved nothing.
                wrote.clear()
                assert wrote.wait(timeout=60), "the writer thread wrote nothing"
    finally:
        stop.set()
        writing.join()
    store.clear_tmp()
    assert written and not (tmp_path / "out" / "_tmp").exists()
    assert store.read_json(LEASE_FILE)["beat"] >= 0
