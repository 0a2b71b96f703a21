"""Sorted listings of a directory tree as a stream, in memory bounded by a run size, whatever the count.

The plan needs sample ids ascending and unique, and at ten million samples nothing may hold them all.
Ids are relative paths with the file name replaced by a stem (`a/b/x_image.png` -> `a/b/x`), so the tree
is walked depth first and each directory's entries are ordered by a key that makes the concatenated
stream globally sorted: a file by its stem, a subdirectory by its name + "/". That order is exact: every
id under subdirectory `s` starts with `s/`, and a stem (which holds no "/") compares with all of them the
same way, because the comparison is settled within `s/` (a stem that is a prefix of `s`, or equal to
it, is shorter and so smaller). So "a" < "a-b" < "a.b" < "a/..." < "a0" < "a_b", as in `sorted()`.

A directory with more entries than `RUN_SIZE` is sorted externally: sorted runs are spilled to temporary
files and merged (`heapq.merge`), so memory stays at one run per directory level being walked.
Local paths are read with `os.scandir` (a stream); other filesystems one directory listing at a time
through fsspec (their client holds that one listing while it is sorted; it is dropped from fsspec's
directory cache afterwards, so a walk never accumulates listings).
"""

from __future__ import annotations

import heapq
import logging
import os
import pickle
import posixpath
import tempfile
from collections.abc import Callable, Iterable, Iterator

from fsspec.implementations.local import LocalFileSystem

log = logging.getLogger(__name__)

RUN_SIZE = 100_000  # keys sorted in memory at once per directory level (~10 MB of short names)
_CHUNK = 1024  # keys per pickled record in a spilled run: what each run holds while merging


def sorted_ids(fs, base: str, stem: Callable[[str], str | None]) -> Iterator[str]:
    """Ids of the files under `base`, ascending: `<relative dir>/<stem(name)>` for each file name that
    `stem` accepts (it returns None or "" for the others). Subdirectories are followed, symlinked ones
    too, but never into a directory that is already being walked (a symlink loop)."""
    local = isinstance(fs, LocalFileSystem)

    def walk(path: str, prefix: str, ancestors: frozenset) -> Iterator[str]:
        if local:
            st = os.stat(path)
            here = (st.st_dev, st.st_ino)
            if here in ancestors:
                log.warning("listing: %s loops back to a directory above it; not followed", path)
                return
            ancestors = ancestors | {here}
            entries = _scandir(path)
        else:
            entries = _fsspec_dir(fs, path)
        keys = (name + "/" if is_dir else stem(name) for name, is_dir in entries)
        for key in sorted_unique(key for key in keys if key):
            if key.endswith("/"):
                yield from walk((os.path if local else posixpath).join(path, key[:-1]), prefix + key, ancestors)
            else:
                yield prefix + key

    return walk(base, "", frozenset())


def _scandir(path: str) -> Iterator[tuple[str, bool]]:
    with os.scandir(path) as entries:
        for entry in entries:
            yield entry.name, entry.is_dir()


def _fsspec_dir(fs, path: str) -> Iterator[tuple[str, bool]]:
    path = path.rstrip("/")
    infos = fs.ls(path, detail=True)
    fs.invalidate_cache(path)
    for info in infos:
        name = info["name"].rstrip("/")
        if name != path:  # some filesystems list a directory's own entry
            yield posixpath.basename(name), info["type"] == "directory"


def sorted_unique(keys: Iterable[str]) -> Iterator[str]:
    """`keys` ascending without repeats, holding at most `RUN_SIZE` of them (the rest in temp files)."""
    runs: list = []
    run: list[str] = []
    try:
        for key in keys:
            run.append(key)
            if len(run) >= RUN_SIZE:
                runs.append(_spill(sorted(run)))
                run = []
        run.sort()
        merged = heapq.merge(*(_read_run(f) for f in runs), run) if runs else iter(run)
        previous = None
        for key in merged:
            if key != previous:
                yield key
            previous = key
    finally:
        for f in runs:
            f.close()


def _spill(keys: list[str]):
    """A sorted run written to an anonymous temporary file (deleted on close); pickled in chunks, so
    any file name (newlines included) round-trips."""
    f = tempfile.TemporaryFile()
    for start in range(0, len(keys), _CHUNK):
        pickle.dump(keys[start : start + _CHUNK], f, protocol=pickle.HIGHEST_PROTOCOL)
    f.seek(0)
    return f


def _read_run(f) -> Iterator[str]:
    while True:
        try:
            chunk = pickle.load(f)
        except EOFError:
            return
        yield from chunk
