"""One run writes an output at a time: a lease file in the output with a heartbeat.

A run takes the lease before it plans, clears `_tmp/` or computes anything, and renews it every
`ttl / 6` seconds. A second `factory run` on the same output finds a live lease and is refused with who
holds it; a lease whose heartbeat is older than `ttl`, or whose holder is a dead process on this same
host (a driver killed a moment ago), is taken over. Two runs starting at the same moment both write
their lease, wait, and read it back: only the last writer finds its own, the other is refused.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from contextlib import contextmanager

from factory.engine.errors import FactoryError
from factory.output.layout import OutputStore

log = logging.getLogger("factory")

LEASE_FILE = "_lease.json"
# Longer than the gap between two runs' checks and writes of the lease, so the last writer wins and the
# other sees it: a local rename is visible at once, an object-store PUT may take a while to land.
_SETTLE_S = {True: 0.1, False: 1.0}


class LeaseError(FactoryError, RuntimeError):
    """Another run holds the output."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Lease:
    def __init__(self, store: OutputStore, ttl: float = 60.0):
        self.store = store
        self.ttl = ttl
        self.run_id = uuid.uuid4().hex[:12]
        self.host = socket.gethostname()
        self.started = time.time()
        self.lost = False  # set when another run took the lease over (our heartbeat stalled past ttl)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._writing = threading.Lock()  # a renewal, or a clearing of `_tmp/` it writes through: never both

    def _record(self) -> dict:
        return {
            "run_id": self.run_id,
            "host": self.host,
            "pid": os.getpid(),
            "started": self.started,
            "heartbeat": time.time(),
        }

    def _abandoned(self, lease: dict) -> bool:
        """Whether the holder is gone. On this host its pid and this host's clock tell. Another host's clock
        is never compared with ours: its lease is abandoned when its heartbeat stays unchanged for `ttl`
        seconds as this host counts them (a live holder renews it every ttl / 6)."""
        if lease.get("host") == self.host:
            stale = time.time() - float(lease.get("heartbeat", 0)) > self.ttl
            return stale or not _pid_alive(int(lease.get("pid", -1)))
        log.info("watching the lease of %s for %.0fs: taken over if its heartbeat stops", self._holder(lease), self.ttl)
        deadline = time.monotonic() + self.ttl
        while (left := deadline - time.monotonic()) > 0:
            time.sleep(min(left, self.ttl / 12))
            if self.store.read_json(LEASE_FILE) != lease:
                return False
        return True

    def _holder(self, lease: dict) -> str:
        def when(key: str) -> str:
            return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(lease.get(key, 0))))

        return (
            f"run {lease.get('run_id')} (host {lease.get('host')}, pid {lease.get('pid')}, started "
            f"{when('started')}, last heartbeat {when('heartbeat')} by its host's clock)"
        )

    def acquire(self) -> None:
        current = self.store.read_json(LEASE_FILE)
        if current is not None and current.get("run_id") != self.run_id and not self._abandoned(current):
            raise LeaseError(
                f"{self.store.url} is being written by another {self._holder(current)}; wait for it to end or "
                f"stop it. A holder that died is taken over once its heartbeat is {self.ttl:.0f}s old."
            )
        if current is not None:
            log.info("taking over the abandoned lease of %s", self._holder(current))
        self.store.ensure_root()
        self.store.write_json(self._record(), LEASE_FILE)
        time.sleep(_SETTLE_S[self.store.is_local()])
        current = self.store.read_json(LEASE_FILE)
        if current is None or current.get("run_id") != self.run_id:
            holder = self._holder(current) if current else "run that finished just now"
            raise LeaseError(f"{self.store.url} was claimed at the same moment by another {holder}")
        self._thread = threading.Thread(target=self._beat, name="factory-lease", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl / 6):
            try:
                current = self.store.read_json(LEASE_FILE)
                if current is not None and current.get("run_id") != self.run_id:
                    log.error("the output's lease was taken over by %s", self._holder(current))
                    self.lost = True
                    return
                with self._writing:
                    self.store.write_json(self._record(), LEASE_FILE)
            except Exception as e:  # storage hiccup: the next beat tries again, well within the ttl
                log.warning("could not renew the lease: %s", e)

    @contextmanager
    def renewals_held(self):
        """No renewal while inside: the lease's record is written through `_tmp/` (renamed into place), which
        the run clears before and after its pipeline."""
        with self._writing:
            yield

    def check(self) -> None:
        if self.lost:
            raise LeaseError(f"another run took over {self.store.url} while this one stalled; stopping this one")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.lost:
            return
        try:
            current = self.store.read_json(LEASE_FILE)
            if current is not None and current.get("run_id") == self.run_id:
                self.store.remove(LEASE_FILE)
        except Exception as e:  # the lease then expires by itself after ttl
            log.warning("could not release the lease: %s", e)
