"""Selections of a finished output: the keys `factory select` kept, beside the shards (which stay as they are).

A selection is two things under `selections/` (see `factory.output.layout`):
    NAME.json                 the summary: score, fraction, order, threshold, kept and dropped counts
    NAME/shard-000000.txt     the keys kept from that shard, one per line, in shard order
A shard the selection has no key file for (committed after the selection was made) contributes nothing.
The summary is written last: a selection whose summary exists has all its key files.
"""

from __future__ import annotations

from factory.output.layout import SELECTIONS_DIR, OutputStore, shard_name


def key_file(store: OutputStore, name: str, shard: int) -> str:
    return store.path(SELECTIONS_DIR, name, f"{shard_name(shard)}.txt")


def selection_names(store: OutputStore) -> list[str]:
    store.fs.invalidate_cache()
    try:
        names = store.fs.ls(store.path(SELECTIONS_DIR), detail=False)
    except FileNotFoundError:
        return []
    return sorted(n.rsplit("/", 1)[-1][: -len(".json")] for n in names if n.endswith(".json"))


def read_selection(store: OutputStore, name: str) -> dict:
    summary = store.read_json(SELECTIONS_DIR, f"{name}.json")
    if summary is None:
        known = ", ".join(selection_names(store)) or "none"
        raise FileNotFoundError(f"{store.url}: no selection {name!r} (selections: {known})")
    return summary


def selected_keys(store: OutputStore, name: str, shard: int) -> set[str]:
    """The keys selection `name` kept from `shard` (empty if it has no key file for the shard)."""
    try:
        data = store.fs.cat_file(key_file(store, name, shard))
    except FileNotFoundError:
        return set()
    return set(data.decode().split())


def write_selected_keys(store: OutputStore, name: str, shard: int, keys: list[str]) -> None:
    path = key_file(store, name, shard)
    if store.is_local():
        store.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    store.fs.pipe_file(path, "".join(k + "\n" for k in keys).encode())


def remove_selection(store: OutputStore, name: str) -> None:
    """Delete a selection, summary first (before writing it again: no stale key file may survive, and no
    reader may pair the old summary with new key files)."""
    store.fs.invalidate_cache()
    for path in (store.path(SELECTIONS_DIR, f"{name}.json"), store.path(SELECTIONS_DIR, name)):
        if store.fs.exists(path):
            store.fs.rm(path, recursive=True)
