"""Connecting to Ray: a running cluster by its address, or a local Ray started in this process, whose
agents `factory.engine.reaper` stops if this process is killed; and asking it for its nodes with a deadline."""

from __future__ import annotations

import logging
import os
import threading

import ray

from factory.engine.errors import RERUN, FactoryError
from factory.engine.reaper import watch_local_ray

log = logging.getLogger("factory")

NODE_TABLE_TIMEOUT_S = 30.0
NODE_TABLE_TRIES = 3


class ClusterUnanswered(FactoryError, RuntimeError):
    """Ray's GCS (the head node's control store) did not answer a question about the cluster in time."""

    advice = f"check that the cluster's head node is up and reachable from here, then {RERUN}"


def init_ray(address: str | None, dashboard: bool = False) -> None:
    """Connect to the cluster at `address`, or start a local Ray. A local Ray runs without Ray's dashboard
    (nothing of a job needs it), but for `dashboard` (a Ray Train fit): Ray Train's placement-group cleaner
    asks the dashboard's State API every second whether the fit's controller lives, and without one it logs
    "Failed to query Ray Train Controller actor state" each time, for as long as the fit runs (24 lines in
    a 20 s fit, measured). The train extra brings the dashboard's packages; where they are missing, Ray
    starts without it rather than failing the fit."""
    if ray.is_initialized():
        return
    # A local Ray's workers take the model cache from this process; a cluster's nodes each keep their own
    # (their disks, their environment), so nothing of the driver's is imposed on them.
    env = {k: os.environ[k] for k in ("FACTORY_MODEL_CACHE", "HF_HUB_OFFLINE") if k in os.environ and not address}
    ray.init(
        address=address,
        runtime_env={"env_vars": env} if env else None,
        log_to_driver=True,
        **({} if address else {"include_dashboard": None if dashboard else False}),
    )
    if address is None:
        watch_local_ray()


def node_table(timeout_s: float = NODE_TABLE_TIMEOUT_S, tries: int = NODE_TABLE_TRIES) -> list[dict]:
    """`ray.nodes()`, asked anew where no answer comes within `timeout_s`. Ray's call waits for the GCS's
    reply with no deadline, and once a reply never came: a driver on a local Ray, under the test suite's
    load, waited 14 minutes in it (2026-12-08) while the GCS listed no request in progress. Each try runs
    in a daemon thread (Ray's call releases the GIL while it waits); one that never returns stays blocked
    there, and the next try sends a new request. After `tries`, `ClusterUnanswered`."""
    for attempt in range(1, tries + 1):
        done, answer = _ask_for_nodes()
        if done.wait(timeout_s):
            if "error" in answer:
                raise answer["error"]
            return answer["nodes"]
        log.warning("Ray's GCS did not answer for the nodes in %.0f s (try %d of %d)", timeout_s, attempt, tries)
    raise ClusterUnanswered(f"Ray's GCS did not answer for the cluster's nodes in {tries} tries of {timeout_s:.0f} s")


def _ask_for_nodes() -> tuple[threading.Event, dict]:
    """`ray.nodes()` in a daemon thread: the event is set once `answer` holds its "nodes" or its "error"."""
    done, answer = threading.Event(), {}

    def ask() -> None:
        try:
            answer["nodes"] = ray.nodes()
        except BaseException as exc:  # handed to the caller's thread as it is
            answer["error"] = exc
        finally:
            done.set()

    threading.Thread(target=ask, name="factory-node-table", daemon=True).start()
    return done, answer
