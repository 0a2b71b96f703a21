"""A Ray cluster on this machine that scales from zero worker nodes, for tests/support/several_nodes.py.

Ray's fake multi-node provider (what `ray.cluster_utils.AutoscalingCluster` starts): a real `ray start
--head` with an autoscaling config whose worker nodes are raylets the autoscaler starts on this machine
when work asks for them. `AutoscalingCluster` itself cannot serve: it reads an example config its wheel
does not ship, and it starts and stops with `ray stop --force`, which would end every Ray on the machine
(the test session's own included). This one is started on a free port in its own temp folder and stopped
by ending exactly its processes: those started with its temp folder in their environment, and the agents
of its raylets (whose process titles overwrite that part of their environment).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import ray

from factory.engine.reaper import running


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class AutoscalingHead:
    """`with AutoscalingHead(tmp, head_cpus, node_resources, max_nodes) as address:` a cluster whose
    head has `head_cpus` CPUs and whose autoscaler may add up to `max_nodes` nodes of `node_resources`."""

    def __init__(self, temp_dir: str, head_cpus: int, node_resources: dict, max_nodes: int):
        self.temp_dir = temp_dir
        self.head_cpus = head_cpus
        self.port = _free_port()
        self.address = f"{ray.util.get_node_ip_address()}:{self.port}"
        self.config = {
            "cluster_name": "factory-test",
            "max_workers": max_nodes,
            "provider": {
                "type": "fake_multinode",
                "use_node_id_as_ip": True,
                "disable_node_updaters": True,
                "disable_launch_config_check": True,
                "gcs_address": self.address,
            },
            "available_node_types": {
                "ray.head.default": {"resources": {"CPU": head_cpus}, "max_workers": 0, "node_config": {}},
                "worker": {"resources": node_resources, "min_workers": 0, "max_workers": max_nodes, "node_config": {}},
            },
            "head_node_type": "ray.head.default",
            "upscaling_speed": 1.0,
            "idle_timeout_minutes": 5,
            **{key: [] for key in ("initialization_commands", "setup_commands", "head_setup_commands")},
            **{key: [] for key in ("worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands")},
            **{key: [] for key in ("cluster_synced_files", "rsync_exclude", "rsync_filter")},
            "docker": {},
            "auth": {"ssh_user": "ubuntu"},
            "file_mounts": {},
            "file_mounts_sync_continuously": False,
        }

    def __enter__(self) -> str:
        config = Path(self.temp_dir, "autoscaling.json")
        config.write_text(json.dumps(self.config))
        # The autoscaler looks every second. Token auth is off: the driver connecting to this head must run
        # with RAY_AUTH_MODE=disabled from its start (Ray reads the mode once per process).
        env = {**os.environ, "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_FAKE_CLUSTER": "1", "RAY_AUTH_MODE": "disabled"}
        command = [str(Path(sys.executable).parent / "ray"), "start", "--head", f"--port={self.port}"]
        command += [f"--temp-dir={self.temp_dir}", f"--num-cpus={self.head_cpus}", f"--autoscaling-config={config}"]
        subprocess.run([*command, "--include-dashboard=false"], env=env, check=True, capture_output=True)
        return self.address

    def __exit__(self, *exc) -> None:
        pids = self._processes()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + 2
            while (pids := {pid for pid in pids if running(pid)}) and time.monotonic() < deadline:
                time.sleep(0.1)

    def _processes(self) -> set[int]:
        environments: dict[int, list[bytes]] = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != os.getpid():
                try:
                    environments[int(entry.name)] = (entry / "environ").read_bytes().split(b"\0")
                except OSError:
                    continue
        marker = f"RAY_TMPDIR={self.temp_dir}".encode()
        ours = {pid for pid, env in environments.items() if marker in env}
        raylets = {f"RAY_RAYLET_PID={pid}".encode() for pid in ours}
        return ours | {pid for pid, env in environments.items() if raylets.intersection(env)}
