"""The local Ray a driver starts (factory/engine/ray_session.py)."""

import subprocess
import sys

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

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


def test_the_local_ray_of_a_fit_serves_the_state_api_ray_train_polls():
    done = subprocess.run(
        [sys.executable, "-c", FIT_THAT_ASKS_THE_STATE_API], capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "the state api answered" in done.stdout
