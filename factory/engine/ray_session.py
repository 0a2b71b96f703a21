"""Connecting to Ray: a running cluster by its address, or a local Ray started in this process, whose
agents `factory.engine.reaper` stops if this process is killed."""

from __future__ import annotations

import os

import ray

from factory.engine.reaper import watch_local_ray


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
