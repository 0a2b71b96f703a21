"""The local Ray a driver starts, and the node table asked with a deadline (factory/engine/ray_session.py)."""

import subprocess
import sys
import threading

import pytest
import ray

from factory.engine.ray_session import ClusterUnanswered, node_table

# `fit_on_ray` with a trainer that, in place of a fit, asks Ray's State API what Ray Train's placement-group
# cleaner asks it every second of a fit (whether an actor lives): it answers only where the local Ray
# started its dashboard, else the cleaner logs "Failed to query Ray Train Controller actor state" each time.
FIT_THAT_ASKS_THE_STATE_API = """
import types

import ray
import ray.train.torch
from ray.util.state import list_actors


class StateAskingTrainer:
    def __init__(self, *args, **kwargs):
        pass

    def fit(self):
        # By this Ray's address: other local Rays (the session's) may run beside it.
        list_actors(address=ray.get_runtime_context().gcs_address, raise_on_missing_output=False)
        return types.SimpleNamespace(error=None)


ray.train.torch.TorchTrainer = StateAskingTrainer
from factory.ray_train import fit_on_ray

fit_on_ray(None, {}, types.SimpleNamespace(num_workers=1, use_gpu=False, cpus_per_worker=1), "state", None)
print("the state api answered")
"""


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_the_local_ray_of_a_fit_serves_the_state_api_ray_train_polls():
    done = subprocess.run(
        [sys.executable, "-c", FIT_THAT_ASKS_THE_STATE_API], capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "the state api answered" in done.stdout


def test_a_node_table_request_left_unanswered_is_asked_again_then_told(monkeypatch, caplog):
    """Ray's `ray.nodes()` waits for the GCS with no deadline; a reply that never comes (seen once) must
    not hold a driver forever."""
    release = threading.Event()  # the unanswered calls end with the test, not with the process
    calls = []

    def nodes_answering_from_try(first_answered: int):
        def nodes():
            calls.append(1)
            if len(calls) < first_answered:
                release.wait()
            return [{"NodeID": "n1", "Alive": True}]

        return nodes

    try:
        monkeypatch.setattr(ray, "nodes", nodes_answering_from_try(2))
        assert node_table(timeout_s=0.2, tries=3) == [{"NodeID": "n1", "Alive": True}]
        assert len(calls) == 2 and "did not answer for the nodes in 0 s (try 1 of 3)" in caplog.text

        calls.clear()
        monkeypatch.setattr(ray, "nodes", nodes_answering_from_try(99))
        with pytest.raises(ClusterUnanswered, match="did not answer for the cluster's nodes in 2 tries of 0 s"):
            node_table(timeout_s=0.1, tries=2)
        assert len(calls) == 2
    finally:
        release.set()


def test_a_node_table_error_reaches_the_caller(monkeypatch):
    def nodes():
        raise ConnectionError("GCS unreachable")

    monkeypatch.setattr(ray, "nodes", nodes)
    with pytest.raises(ConnectionError, match="GCS unreachable"):
        node_table(timeout_s=5, tries=1)
