"""The node-local model cache: entries filled once per node, and file hashes computed once per file state.

Every actor on a node shares the cache (`FACTORY_MODEL_CACHE`, by default ~/.cache/factory/models): the
first one to need an entry fills it under an fcntl lock while the others wait, then all read it. Hashes
of weight files are remembered beside the entries, keyed by the file's path, size, mtime and inode, so
verifying a multi-gigabyte model is paid once per node and file, not once per actor.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import socket
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

COMPLETE = ".factory-complete"
_CHUNK = 8 << 20


def model_cache_dir() -> Path:
    """The node-local model cache; read at call time so tests and jobs can point it elsewhere."""
    return Path(os.environ.get("FACTORY_MODEL_CACHE") or "~/.cache/factory/models").expanduser()


@contextmanager
def _file_lock(path: Path):
    """An exclusive fcntl lock: every actor on a node takes it, so only the first one fills the cache."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def fill_once(dest: Path, fill: Callable[[Path], None]) -> Path:
    """Run `fill(dest)` once per node; the completion marker is written last, so a crash mid-way is redone.

    Every fill that completes appends a line to `<dest>.log` beside the entry (when, which process, how
    long), so "was this model fetched once on this node?" has an answer after the fact.
    """
    if (dest / COMPLETE).is_file():
        return dest
    with _file_lock(dest.with_name(dest.name + ".lock")):
        if (dest / COMPLETE).is_file():  # another process finished while we waited for the lock
            return dest
        shutil.rmtree(dest, ignore_errors=True)  # leftovers of an interrupted fill
        dest.mkdir(parents=True)
        started = time.time()
        fill(dest)
        (dest / COMPLETE).write_text("ok\n")
        with open(dest.with_name(dest.name + ".log"), "a") as record:
            record.write(
                f"{time.strftime('%Y-%m-%dT%H:%M:%S')} filled by {socket.gethostname()} "
                f"pid {os.getpid()} in {time.time() - started:.1f}s\n"
            )
    return dest


def drop_entry(dest: Path) -> None:
    """Remove a cache entry (under its lock), so the next `fill_once` fills it again."""
    with _file_lock(dest.with_name(dest.name + ".lock")):
        shutil.rmtree(dest, ignore_errors=True)


def _remembered(memo: Path) -> dict | None:
    """A file's hash memo on this node, or None: never hashed here (the memo is written whole, by rename)."""
    if not memo.is_file():
        return None
    return json.loads(memo.read_text())


def file_sha256(path: Path) -> str:
    """The file's sha256 (hex), read once per node for each state of the file (path, size, mtime, inode)."""
    st = path.stat()
    state = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}
    memo = model_cache_dir() / "sha256" / f"{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:32]}.json"
    known = _remembered(memo)
    if known is not None and known.get("state") == state and "sha256" in known:
        return known["sha256"]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    memo.parent.mkdir(parents=True, exist_ok=True)
    partial = memo.with_name(f"{memo.name}.{os.getpid()}")
    partial.write_text(json.dumps({"path": str(path), "state": state, "sha256": digest.hexdigest()}))
    partial.replace(memo)
    return digest.hexdigest()
