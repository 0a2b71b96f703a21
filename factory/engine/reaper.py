"""Leave nothing behind when the driver of a local Ray dies.

A local Ray started by `ray.init()` shares the driver's fate for the processes it starts itself (GCS,
raylet, dashboard), but the raylet's agents (dashboard agent, runtime-env agent) outlive a driver killed
with SIGKILL. `watch_local_ray()` starts a small detached process that waits for the driver to go and
then stops those agents; each is named by pid and start time, so a reused pid is never touched.

    python -m factory.engine.reaper DRIVER_PID PID:START_TIME ...
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time

import psutil

_AGENTS = ("DashboardAgent", "RuntimeEnvAgent")


def watch_local_ray() -> None:
    """Call right after a local `ray.init()` in the driver."""
    me = psutil.Process()
    agents = [
        agent
        for raylet in me.children()
        if "raylet" in raylet.name()
        for agent in raylet.children()
        if any(name in " ".join(agent.cmdline()) for name in _AGENTS)
    ]
    if agents:
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "factory.engine.reaper",
                str(me.pid),
                *(f"{a.pid}:{a.create_time()}" for a in agents),
            ],
            start_new_session=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )


def _same_process(pid: int, started: float) -> psutil.Process | None:
    try:
        proc = psutil.Process(pid)
        return proc if abs(proc.create_time() - started) < 0.01 else None
    except psutil.NoSuchProcess:
        return None


def running(pid: int) -> bool:
    """Whether `pid` still runs: a zombie has ended, it only waits for its parent to read its status."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def main(argv: list[str]) -> None:
    driver = int(argv[0])
    targets = [(int(pid), float(started)) for pid, _, started in (t.partition(":") for t in argv[1:])]
    while running(driver):
        time.sleep(1.0)
    time.sleep(2.0)  # a clean shutdown stops the agents itself; give it the time to
    left = [proc for pid, started in targets if (proc := _same_process(pid, started)) is not None]
    for proc in left:
        with contextlib.suppress(psutil.NoSuchProcess):  # it went by itself meanwhile
            proc.terminate()
    # Together, not one after another: an agent whose raylet is gone may never act on SIGTERM.
    _, alive = psutil.wait_procs(left, timeout=3)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()


if __name__ == "__main__":
    main(sys.argv[1:])
