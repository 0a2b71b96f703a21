"""The output's lease (factory/engine/lease.py): one run writes an output; a dead holder is taken over, and
no clock of another host is compared with this one's."""

import threading
import time

import pytest

from factory.engine.lease import LEASE_FILE, Lease, LeaseError
from factory.output.layout import OutputStore

pytestmark = pytest.mark.timeout(60)


def other_host_lease(store: OutputStore, heartbeat: float) -> dict:
    record = {"run_id": "elsewhere", "host": "another-host", "pid": 1, "started": heartbeat, "heartbeat": heartbeat}
    store.ensure_root()
    store.write_json(record, LEASE_FILE)
    return record


def test_another_hosts_lease_is_taken_over_only_once_its_heartbeat_stops(tmp_path):
    store = OutputStore(str(tmp_path))
    # Its clock runs a day ahead of ours: a comparison of clocks would call it alive for a day.
    record = other_host_lease(store, heartbeat=time.time() + 86400)
    lease = Lease(store, ttl=0.6)
    started = time.monotonic()
    lease.acquire()
    try:
        assert time.monotonic() - started >= 0.6  # it watched the heartbeat for a whole ttl first
        assert store.read_json(LEASE_FILE)["run_id"] == lease.run_id != record["run_id"]
    finally:
        lease.release()


def test_another_hosts_lease_that_still_beats_is_never_taken_over(tmp_path):
    store = OutputStore(str(tmp_path))
    # Its clock runs a day behind ours: a comparison of clocks would call it dead at once.
    record = other_host_lease(store, heartbeat=time.time() - 86400)
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(0.05):
            record["heartbeat"] += 0.05
            store.write_json(record, LEASE_FILE)

    beating = threading.Thread(target=beat, daemon=True)
    beating.start()
    try:
        with pytest.raises(LeaseError, match="being written by another run elsewhere"):
            Lease(store, ttl=0.6).acquire()
    finally:
        stop.set()
        beating.join()


def test_a_lease_of_this_host_whose_process_is_gone_is_taken_over_at_once(tmp_path):
    store = OutputStore(str(tmp_path))
    store.ensure_root()
    dead = {"run_id": "old", "host": Lease(store).host, "pid": 2**22 + 1, "started": 0, "heartbeat": time.time()}
    store.write_json(dead, LEASE_FILE)
    lease = Lease(store, ttl=60)
    lease.acquire()
    lease.release()
    assert store.read_json(LEASE_FILE) is None


def test_no_renewal_fails_while_the_run_clears_tmp(tmp_path, caplog):
    """The record is written through `_tmp/`, which the run clears before and after its pipeline: renewals
    wait while it does, so none is cut off mid-write (a renewal that fails is only retried a beat later, but
    the job's end once failed on the clear itself: tests/output/test_layout.py)."""
    store = OutputStore(str(tmp_path / "out"))
    lease = Lease(store, ttl=0.006)  # a renewal every millisecond
    lease.acquire()
    try:
        for _ in range(200):
            with lease.renewals_held():
                store.clear_tmp()
    finally:
        lease.release()
    assert "could not renew" not in caplog.text
    assert store.read_json(LEASE_FILE) is None  # released
