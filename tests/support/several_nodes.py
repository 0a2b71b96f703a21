"""A job on a Ray cluster of several raylets on this machine, for tests/cluster/test_several_nodes.py.

    python several_nodes.py SPEC.yaml NODES_DIR SCENARIO REPORT.json [NEXT_SPEC.yaml NEXT_REPORT.json]

Ray's own multi-node harness (`ray.cluster_utils.Cluster`): a head with CPUs only and worker nodes that
each hold one unit of a custom resource standing in for a GPU (FACTORY_TEST_GPU_RESOURCE names it, so the
engine asks for it in place of GPUs). The stages record where they ran in NODES_DIR (stages_for_tests).
Scenarios:
    lose_and_gain  two stand-in nodes; once both hold work (held at a gate), one is killed (its raylet and
                   every worker on it, as a spot instance is taken back) and a fresh one joins; the gate opens
    late_node      a head alone; once it holds work, a CPU node joins; the gate opens (a node-local output
                   must never be written from the node that joined)
    two_nodes      two stand-in nodes, nothing happens to them
    from_zero      a head alone with an autoscaler (autoscaling.py) that may add two stand-in nodes
REPORT.json gets the job's index (or its error), the head's node id and the nodes lost and added. The nodes
start with FACTORY_MODEL_CACHE=NODE_CACHE, the driver then runs with DRIVER_CACHE. NEXT_SPEC, where given,
runs on the same cluster once the first job has ended (a cluster costs seconds of CPU to start here); its
index or error goes to NEXT_REPORT, its stage work to the same NODES_DIR.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import ray
import yaml
from autoscaling import AutoscalingHead
from ray.cluster_utils import Cluster

from factory.engine.driver import run_job
from factory.engine.errors import one_line
from factory.engine.runner import GPU_STAND_IN_ENV
from factory.engine.spec import parse_spec

STAND_IN = "test_gpu"
NODE_CACHE, DRIVER_CACHE = "/models/of-the-nodes", "/models/of-the-driver"
STAND_IN_NODE = {"num_cpus": 1, "resources": {STAND_IN: 1}}


def main(spec_path: str, nodes_dir: str, scenario: str, report: str, *next_job: str) -> None:
    os.environ[GPU_STAND_IN_ENV] = STAND_IN
    os.environ["FACTORY_TEST_NODES"] = nodes_dir
    # Set before any raylet starts: the workers inherit the environment of the process that started them.
    gate = Path(tempfile.mkdtemp(), "gate")
    gate.touch()
    os.environ["FACTORY_TEST_GATE"] = str(gate)
    os.environ["FACTORY_MODEL_CACHE"] = NODE_CACHE
    spec = parse_spec(yaml.safe_load(Path(spec_path).read_text()))
    if scenario == "from_zero":
        from_zero(spec, found := {})
    else:
        found = on_cluster(spec, scenario, Path(nodes_dir), gate, *next_job)
    Path(report).write_text(json.dumps(found))


def on_cluster(spec, scenario: str, marks: Path, gate: Path, next_spec: str = "", next_report: str = "") -> dict:
    # A lost node is declared dead after 3 missed health checks a second apart (Ray's default: 5 of 3 s).
    health = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 2 if scenario == "late_node" else 1, "_system_config": health},
    )
    found: dict = {"head": cluster.head_node.node_id}
    if scenario in ("lose_and_gain", "two_nodes"):
        workers = [cluster.add_node(**STAND_IN_NODE) for _ in range(2)]
    cluster.wait_for_nodes()
    os.environ["FACTORY_MODEL_CACHE"] = DRIVER_CACHE  # the driver's own: never imposed on the nodes
    # The job runs in a thread: starting a node installs signal handlers, which only the main thread may.
    job = threading.Thread(target=run, args=(spec, cluster.address, found), daemon=True)
    job.start()
    if scenario == "lose_and_gain":
        lose_and_gain(cluster, workers, marks, gate, found)
    elif scenario == "late_node":
        late_node(cluster, marks, gate, found)
    else:
        gate.unlink()
    job.join()
    if next_spec:
        run(parse_spec(yaml.safe_load(Path(next_spec).read_text())), cluster.address, after := {})
        Path(next_report).write_text(json.dumps(after))
    ray.shutdown()  # the driver first: the cluster will not remove the head this process is connected to
    cluster.shutdown()
    return found


def from_zero(spec, found: dict) -> None:
    """A head alone, whose autoscaler may start two stand-in GPU nodes: the job's wait asks for them."""
    Path(os.environ["FACTORY_TEST_GATE"]).unlink()
    with AutoscalingHead(os.environ["RAY_TMPDIR"], 1, {"CPU": 1, STAND_IN: 1}, max_nodes=2) as address:
        os.environ["FACTORY_MODEL_CACHE"] = DRIVER_CACHE
        ray.init(address=address)
        alive = [n for n in ray.nodes() if n["Alive"]]
        found["nodes_at_start"] = len(alive)
        found["head"] = next(n["NodeID"] for n in alive if "node:__internal_head__" in n["Resources"])
        run(spec, address, found)
        found["nodes_at_end"] = sum(n["Alive"] for n in ray.nodes())
        ray.shutdown()


def run(spec, address: str, found: dict) -> None:
    try:
        found["index"] = run_job(spec, address=address)
    except Exception as e:
        found["error"] = one_line(e, limit=5000)


def add_node(cluster: Cluster, **args) -> str:
    """A node that joins now, started (as any node) with the nodes' environment, not the driver's."""
    os.environ["FACTORY_MODEL_CACHE"] = NODE_CACHE
    try:
        node = cluster.add_node(**args)
    finally:
        os.environ["FACTORY_MODEL_CACHE"] = DRIVER_CACHE
    cluster.wait_for_nodes()
    return node.node_id


def wait_for_work(marks: Path, nodes: set[str], found: dict) -> bool:
    """Whether every node of `nodes` took work before the job ended."""
    while not nodes <= {m.name.rsplit(".", 1)[0] for m in marks.iterdir()}:
        if "index" in found or "error" in found:
            return False
        time.sleep(0.1)
    return True


def late_node(cluster: Cluster, marks: Path, gate: Path, found: dict) -> None:
    if wait_for_work(marks, {found["head"]}, found):
        found["added"] = add_node(cluster, num_cpus=2)
        time.sleep(2)  # long enough for the scheduler to see the new node's free CPUs
    gate.unlink()


def lose_and_gain(cluster: Cluster, workers: list, marks: Path, gate: Path, found: dict) -> None:
    """Once both stand-in nodes hold a shard, kill the first one, start a new one, open the gate."""
    if not wait_for_work(marks, {w.node_id for w in workers}, found):
        return  # the job ended before both nodes held work: the test reports it
    lost = workers[0]
    found["lost"] = lost.node_id
    found["lost_shards"] = sorted(int(m.name.rsplit(".", 1)[1]) for m in marks.glob(f"{lost.node_id}.*"))
    cluster.remove_node(lost, allow_graceful=False)
    found["added"] = add_node(cluster, **STAND_IN_NODE)
    gate.unlink()


if __name__ == "__main__":
    main(*sys.argv[1:])
