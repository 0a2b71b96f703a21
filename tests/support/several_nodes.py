"""A job on a Ray cluster of several raylets on this machine, for tests/cluster/test_several_nodes.py.

    python several_nodes.py SPEC.yaml NODES_DIR SCENARIO REPORT.json

Ray's own multi-node harness (`ray.cluster_utils.Cluster`): a head with CPUs only and worker nodes that
each hold one unit of a custom resource standing in for a GPU (FACTORY_TEST_GPU_RESOURCE names it, so the
engine asks for it in place of GPUs). The stages record where they ran in NODES_DIR (stages_for_tests).
Scenarios:
    no_gpu_node    the stand-in resource is named but no node holds it: the job must be refused
REPORT.json gets the job's index (or its error) and the head's node id.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import ray
import yaml
from ray.cluster_utils import Cluster

from factory.engine.driver import run_job
from factory.engine.errors import one_line
from factory.engine.runner import GPU_STAND_IN_ENV
from factory.engine.spec import parse_spec

STAND_IN = "test_gpu"


def main(spec_path: str, nodes_dir: str, scenario: str, report: str) -> None:
    os.environ[GPU_STAND_IN_ENV] = STAND_IN
    os.environ["FACTORY_TEST_NODES"] = nodes_dir
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.wait_for_nodes()
    found: dict = {"head": cluster.head_node.node_id}
    spec = parse_spec(yaml.safe_load(Path(spec_path).read_text()))
    try:
        found["index"] = run_job(spec, address=cluster.address)
    except Exception as e:
        found["error"] = one_line(e)
    Path(report).write_text(json.dumps(found))
    ray.shutdown()  # the driver first: the cluster will not remove the head this process is connected to
    cluster.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
