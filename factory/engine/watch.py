"""Every step of a shard (its read, each stage, its write) runs under a watch, the same in every executor.

- A record (`_tmp/attempts/shard-N.json` in the output) says where the shard is: the step, the node,
  the process, since when. A worker can die without a word (a crash in native code, the OOM killer, a
  lost node); the driver then reads the record and names the step and the node, instead of a bare Ray
  error.
- A deadline: a step that runs past `engine.shard_timeout_s` (by default `DEFAULT_BASE_S` plus
  `DEFAULT_PER_ROW_S` per row the step handles) records `timeout` and ends its worker process, since a
  hung read or model call cannot be interrupted from Python. Ray then replaces the worker and retries
  the shard, at most `engine.retries` times. Without Ray (`InProcessExecutor`) the process is the
  user's: the deadline raises `ShardTimeout` in the main thread instead.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from factory.output.layout import OutputStore, shard_name
from factory.storage import TMP_DIR

log = logging.getLogger("factory")

# Each shard's record, in the output's _tmp/: cleared with it when the job ends.
ATTEMPT_SUFFIX = ".attempt.json"
DEFAULT_BASE_S = 600.0
DEFAULT_PER_ROW_S = 30.0
# A worker that ends itself past its deadline exits with this code: EX_TEMPFAIL, for "try again".
TIMEOUT_EXIT_CODE = 75


class ShardTimeout(BaseException):
    """A step ran past its deadline in a process that must not be ended (no Ray). A BaseException, so
    that no stage's or retry's `except Exception` takes it for an ordinary failure and tries again."""


def node_address() -> str:
    """The node this process runs on, as Ray names it where Ray runs (its IP), else the host name."""
    try:
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except ImportError:
        pass
    return socket.gethostname()


def ray_node_id() -> str | None:
    """Ray's id of this process's node (several nodes may share one address), or None without Ray."""
    import sys

    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return None
    return ray.get_runtime_context().get_node_id()


def place(node: str, node_id: str | None, pid: int | str) -> str:
    """A process as a user finds it in the Ray logs: its node's address and id, and its pid."""
    return f"node {node} (" + (f"Ray node {node_id[:12]}, " if node_id else "") + f"pid {pid})"


def whereabouts() -> str:
    """This process's `place`."""
    return place(node_address(), ray_node_id(), os.getpid())


class _Deadline:
    """One thread per process that ends the step it watches when its time is up."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._armed: tuple[float, object] | None = None
        self._thread: threading.Thread | None = None

    def arm(self, at: float, expire) -> None:
        with self._cond:
            self._armed = (at, expire)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="factory-deadline", daemon=True)
                self._thread.start()
            self._cond.notify()

    def disarm(self) -> None:
        with self._cond:
            self._armed = None
            self._cond.notify()

    def _run(self) -> None:
        with self._cond:
            while True:
                if self._armed is None:
                    self._cond.wait()
                    continue
                at, expire = self._armed
                if time.time() < at:
                    self._cond.wait(at - time.time())
                    continue
                self._armed = None
                expire()  # type: ignore[operator]  # a callable, typed loosely to keep the tuple simple


_DEADLINE = _Deadline()


@dataclass(frozen=True)
class Watch:
    """How a job's steps are watched: picklable, sent to every worker with the job."""

    store_url: str | None  # where the records go (the job's output); None: no records (`factory stage`)
    store_options: dict
    timeout_s: float | None  # engine.shard_timeout_s; None: the default from the rows
    end_process: bool  # on a deadline: end the worker (under Ray) or raise ShardTimeout (in-process)

    def seconds_for(self, rows: int) -> float:
        return self.timeout_s if self.timeout_s is not None else DEFAULT_BASE_S + DEFAULT_PER_ROW_S * rows

    def _store(self) -> OutputStore | None:
        return OutputStore(self.store_url, self.store_options) if self.store_url else None

    def _record(self, shard: int, **fields) -> None:
        store = self._store()
        if store is None:
            return
        body = {"shard": shard, "node": node_address(), "node_id": ray_node_id(), "pid": os.getpid(), **fields}
        try:
            # A plain write: the record is read only after its writer is gone, and needs no fsync.
            store.write_bytes(json.dumps(body).encode(), TMP_DIR, shard_name(shard) + ATTEMPT_SUFFIX)
        except Exception as e:  # the record only explains a failure: it never causes one
            log.warning("could not record shard %d at %s: %s", shard, fields.get("step"), e)

    @contextmanager
    def step(self, shard: int, step: str, rows: int) -> Iterator[None]:
        """Run one step of one shard under its record and deadline."""
        seconds = self.seconds_for(rows)
        self._record(shard, step=step, since=time.time())
        main = threading.current_thread() is threading.main_thread()
        if self.end_process:
            _DEADLINE.arm(time.time() + seconds, lambda: self._end_process(shard, step, seconds))
        elif main:
            previous = signal.signal(signal.SIGALRM, lambda *_: self._raise(shard, step, seconds))
            signal.setitimer(signal.ITIMER_REAL, seconds)
        try:
            yield
        finally:
            if self.end_process:
                _DEADLINE.disarm()
            elif main:
                signal.setitimer(signal.ITIMER_REAL, 0)
                signal.signal(signal.SIGALRM, previous)

    def _cause(self, step: str, seconds: float) -> str:
        return f"timeout: step {step} ran past {seconds:g}s (engine.shard_timeout_s)"

    def _raise(self, shard: int, step: str, seconds: float) -> None:
        raise ShardTimeout(self._cause(step, seconds))

    def _end_process(self, shard: int, step: str, seconds: float) -> None:
        cause = self._cause(step, seconds)
        self._record(shard, step=step, timeout=cause)
        log.error("shard %d: %s; ending this worker so that Ray replaces it", shard, cause)
        logging.shutdown()
        os._exit(TIMEOUT_EXIT_CODE)


def read_attempt(store: OutputStore, shard: int) -> dict | None:
    """Where the shard was last seen (its record), or None."""
    try:
        return store.read_json(TMP_DIR, shard_name(shard) + ATTEMPT_SUFFIX)
    except Exception as e:  # like the write: a record that cannot be read leaves the cause unknown, no more
        log.warning("could not read the record of shard %d: %s", shard, e)
        return None
