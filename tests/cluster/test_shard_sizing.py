"""The engine's shard-size check on the node shapes the KubeRay manifests declare, and its source probe.

A head started with num-cpus 0 runs no reads, stages or writes, so its small object store must not size
shards; the shipped RayJob's shard_size must pass on its own cluster, and fail once its workers' object
store is too small for it. The probe measures sources past bad samples only.
"""

import copy
from collections.abc import Iterator

import numpy as np
import pytest
import yaml
from fixtures_data import make_ade20k
from test_cluster_manifests import manifests, ray_cluster_specs

from factory.engine.checks import ROW_SHARE_OF_OBJECT_STORE, memory_problem, row_bytes_per_source, shard_size_problem
from factory.engine.driver import rows_per_source
from factory.engine.executors.base import worker_memory
from factory.engine.spec import JobSpec, parse_spec
from factory.sample import BadSample
from factory.schema import SpecError
from factory.sources import open_source
from factory.sources.base import Source, SourceRecord
from factory.sources.spec import SourceSpec

# ADEChallengeData2016's typical image (docs/architecture.md, "Sizing shard_size").
ADE20K_SIZE = (512, 683)


def _cpus(quantity: str) -> float:
    return int(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def node_shape(group: dict) -> dict:
    """The resources Ray reports for a pod of this group: KubeRay passes rayStartParams to `ray start`, and
    takes num-cpus / num-gpus from the Ray container's limits where the params leave them out."""
    params = group["rayStartParams"]
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    store = int(params["object-store-memory"])
    return {
        "CPU": _cpus(params.get("num-cpus", limits["cpu"])),
        "GPU": float(params.get("num-gpus", limits.get("nvidia.com/gpu", 0))),
        "object_store_memory": store,
        # Ray's `memory` resource: the pod's memory, less what its object store takes.
        "memory": _bytes(limits["memory"]) - store,
    }


def _bytes(quantity: str) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    return int(quantity[:-2]) * units[quantity[-2:]] if quantity[-2:] in units else int(quantity)


def cluster_nodes(spec: dict) -> list[dict]:
    return [node_shape(spec["headGroupSpec"]), *(node_shape(g) for g in spec["workerGroupSpecs"])]


def rayjob_spec(source_root) -> JobSpec:
    """The job the shipped RayJob runs, reading ADE20K-sized samples from `source_root`."""
    (configmap,) = [d for d in manifests()["rayjob.yaml"] if d["kind"] == "ConfigMap"]
    data = yaml.safe_load(configmap["data"]["job.yaml"])
    data["source"]["path"] = str(source_root)
    return parse_spec(data, origin="rayjob.yaml")


@pytest.fixture(scope="module")
def ade20k_job(tmp_path_factory) -> tuple[JobSpec, int, int]:
    """(the RayJob's spec, bytes per source in a row, rows per source), measured on ADE20K-sized samples."""
    root = tmp_path_factory.mktemp("ade20k")
    make_ade20k(root, n=4, size=ADE20K_SIZE)
    spec = rayjob_spec(root)
    source = open_source(spec.source)
    rows = rows_per_source(spec, source.classes)
    return spec, row_bytes_per_source(source, rows), rows


@pytest.mark.parametrize("where,spec", ray_cluster_specs(), ids=[w for w, _ in ray_cluster_specs()])
def test_the_rayjobs_shard_size_fits_the_shipped_cluster_shapes(ade20k_job, where, spec):
    job, per_source, rows = ade20k_job
    nodes = cluster_nodes(spec)
    head = nodes[0]
    assert head["CPU"] == head["GPU"] == 0  # the head runs no work ...
    assert job.output.shard_size * per_source > head["object_store_memory"] / ROW_SHARE_OF_OBJECT_STORE  # ... and
    # its store alone would refuse this shard size: only the nodes that work on rows may size it.
    assert shard_size_problem(job, per_source, rows, nodes) is None
    # Its workers, declaring two copies of a row besides their stages' memory_gb, fit its nodes' memory.
    assert memory_problem(job, per_source * job.output.shard_size, nodes) is None


def test_a_too_small_worker_store_is_refused(ade20k_job):
    job, per_source, rows = ade20k_job
    (rayjob,) = [d for d in manifests()["rayjob.yaml"] if d["kind"] == "RayJob"]
    cluster = copy.deepcopy(rayjob["spec"]["rayClusterSpec"])
    for group in cluster["workerGroupSpecs"]:
        group["rayStartParams"]["object-store-memory"] = "4000000000"
    problem = shard_size_problem(job, per_source, rows, cluster_nodes(cluster))
    assert problem and problem.startswith("output.shard_size: a shard of 200 sources")
    fits = int(4e9 / ROW_SHARE_OF_OBJECT_STORE // per_source)
    assert f"Use shard_size <= {fits}," in problem and "3.7 GiB on the smallest" in problem


def test_a_worker_that_fits_no_nodes_memory_is_refused_naming_its_stage(ade20k_job):
    job, per_source, _ = ade20k_job
    row = per_source * job.output.shard_size
    nodes = [{"CPU": 0, "memory": 10**12}, {"CPU": 8, "GPU": 1, "memory": 40 * 2**30}]  # the head works on nothing
    assert memory_problem(job, row, nodes) is None
    heavy = job.model_copy(deep=True)
    heavy.stages[-1].resources.memory_gb = 40
    problem = memory_problem(heavy, row, nodes)
    last = len(job.stages) - 1
    assert problem and problem.startswith(
        f"stages[{last}].resources.memory_gb: a worker of stage {job.stages[last].label!r}"
    )
    assert f"{worker_memory(row, 40) / 2**30:.1f} GiB" in problem and "offers Ray 40.0 GiB" in problem


def test_no_node_that_works_means_nothing_to_size(ade20k_job):
    job, per_source, rows = ade20k_job
    assert shard_size_problem(job, per_source, rows, [{"CPU": 0, "object_store_memory": 10**6}]) is None
    gpu_only = {"GPU": 1, "object_store_memory": 10**6}  # works on rows, whatever its CPUs
    assert shard_size_problem(job, per_source, rows, [gpu_only]) is not None


class ProbedSource(Source):
    """Samples 0..n-1 of 20x30 pixels; `faults` maps an index to what loading it raises."""

    def __init__(self, n: int, faults: dict[int, Exception]):
        super().__init__(SourceSpec(kind="folder", path="/nowhere", classes="ade150"))
        self.n, self.faults, self.loaded = n, faults, 0

    def _ids(self) -> Iterator[str]:
        return (f"s{i:03d}" for i in range(self.n))

    def _load(self, sample_id: str) -> SourceRecord:
        self.loaded += 1
        i = int(sample_id[1:])
        if i in self.faults:
            raise self.faults[i]
        return SourceRecord(sample_id, np.zeros((20, 30, 3), np.uint8), np.zeros((20, 30), np.uint8))


def test_the_probe_skips_bad_samples_only():
    source = ProbedSource(10, {0: BadSample("corrupt_image"), 2: BadSample("missing_mask")})
    assert row_bytes_per_source(source, rows_per_source=5) == 600 * 7 * 6
    assert source.loaded == 6  # two bad, then the four good ones it measures
    with pytest.raises(OSError, match="storage is down"):
        row_bytes_per_source(ProbedSource(10, {1: OSError("storage is down")}), rows_per_source=5)


def test_a_listing_of_bad_samples_is_refused_not_passed():
    bad = {i: BadSample("corrupt_image" if i % 2 else "missing_mask") for i in range(40)}
    with pytest.raises(SpecError, match=r"the first 16 samples of folder source '/nowhere' are all bad "):
        row_bytes_per_source(ProbedSource(40, bad), rows_per_source=1)
    with pytest.raises(SpecError, match=r"first 2 samples .* all bad \(1 missing_mask, 1 corrupt_image\)"):
        row_bytes_per_source(ProbedSource(2, bad), rows_per_source=1)
    assert row_bytes_per_source(ProbedSource(0, {}), rows_per_source=1) == 0  # an empty listing has no size
