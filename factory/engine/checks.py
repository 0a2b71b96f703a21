"""Checks of a job against the cluster it is about to run on, before anything is planned or written.

A spec can be valid and still impossible here: a stage asking for a GPU on a cluster without one, more
CPUs than a node has, actor pools that together need more than the cluster offers (Ray would wait for
them forever), a shard too large for the object store of a node that works on it, a node-local output on
several nodes. Each is refused with the field to change. An autoscaling cluster may grow into a request:
with `engine.resource_wait_s` the check waits that long for it, saying so, before it refuses.

The checks themselves are pure functions of the spec and the nodes as Ray describes them (`ray.nodes()`'s
`Resources`: `CPU`, `GPU`, `object_store_memory` in bytes), so a test can run them on the node shapes a
cluster manifest declares.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections import Counter

import numpy as np

from factory.engine.executors.base import ROW_COPIES_IN_A_WORKER, WORKER_BASE_MEMORY, worker_memory
from factory.engine.ray_session import node_table
from factory.engine.runner import gpu_stand_in
from factory.engine.spec import JobSpec
from factory.output.layout import OutputStore
from factory.sample import BadSample
from factory.schema import SpecError
from factory.sources.base import Source

log = logging.getLogger("factory")

# A shard row lives in the object store as a stage's input and output at once, and a pool queues more:
# one row may take at most this share of a node's object store.
ROW_SHARE_OF_OBJECT_STORE = 4
_SIZE_PROBES = 4  # good source samples read to measure a typical one
_PROBE_LIMIT = 16  # listing entries tried for them, past bad samples


def _alive_nodes() -> list[dict]:
    stand_in = gpu_stand_in()
    nodes = [n["Resources"] for n in node_table() if n["Alive"]]
    return [{**n, "GPU": n.get(stand_in, 0)} for n in nodes] if stand_in else nodes


def _runs_work(node: dict) -> bool:
    # Read tasks, stage actors and write tasks all ask for CPUs or GPUs: a node with neither (a head started
    # with num-cpus 0) never holds a shard row, so its object store says nothing about the shard size.
    return node.get("CPU", 0) > 0 or node.get("GPU", 0) > 0


def resource_problems(spec: JobSpec, nodes: list[dict]) -> list[str]:
    """What the cluster (its nodes' resource totals) cannot give the job; empty if it can."""
    problems = []
    cpu = sum(n.get("CPU", 0) for n in nodes)
    gpu = sum(n.get("GPU", 0) for n in nodes)
    cpu_need = max(spec.engine.read_cpus, spec.engine.write_cpus)  # one read or write task at a time, at least
    gpu_need = 0.0
    for i, st in enumerate(spec.stages):
        r = st.resources
        for field, key, want in (("num_gpus", "GPU", r.num_gpus), ("num_cpus", "CPU", r.num_cpus)):
            if want > 0 and not any(n.get(key, 0) >= want for n in nodes):
                best = max((n.get(key, 0) for n in nodes), default=0)
                problems.append(
                    f"stages[{i}].resources.{field}: stage {st.label!r} asks for {want:g} {key} per "
                    f"worker, but the largest node has {best:g}"
                )
        cpu_need += r.min_pool * r.num_cpus
        gpu_need += r.min_pool * r.num_gpus
    if not problems:
        for key, need, have in (("CPU", cpu_need, cpu), ("GPU", gpu_need, gpu)):
            if need > have + 1e-9:
                pools = ", ".join(
                    f"{st.label} {st.resources.min_pool}"
                    f" x {st.resources.num_cpus if key == 'CPU' else st.resources.num_gpus:g}"
                    for st in spec.stages
                )
                problems.append(
                    f"stages[].resources.concurrency: the actor pools at their (minimum) sizes need {need:g} {key} "
                    f"together ({pools}{', plus a read/write task' if key == 'CPU' else ''}), but the cluster has "
                    f"{have:g}: Ray would wait for them forever. Shrink the pools or their num_cpus/num_gpus"
                )
    return problems


def _bundles(spec: JobSpec) -> list[dict]:
    """What the stages' pools need at their (minimum) sizes, one bundle per actor, for the autoscaler."""
    bundles = []
    for st in spec.stages:
        r = st.resources
        bundle = {k: v for k, v in (("CPU", r.num_cpus), (gpu_stand_in() or "GPU", r.num_gpus)) if v > 0}
        bundles += [bundle] * r.min_pool if bundle else []
    return bundles


def check_resources(spec: JobSpec) -> None:
    """Refuse what the cluster cannot give; with `engine.resource_wait_s`, ask its autoscaler and wait first."""
    problems = resource_problems(spec, _alive_nodes())
    if not problems:
        return
    if spec.engine.resource_wait_s <= 0:
        raise SpecError("; ".join(problems))
    from ray.autoscaler.sdk import request_resources

    log.info(
        "waiting up to %.0fs for the cluster to offer what the job needs: %s",
        spec.engine.resource_wait_s,
        "; ".join(problems),
    )
    request_resources(bundles=_bundles(spec))
    deadline = time.time() + spec.engine.resource_wait_s
    while problems := resource_problems(spec, _alive_nodes()):
        if time.time() >= deadline:
            request_resources(bundles=[])  # withdraw the request: this job will not use it
            raise SpecError(f"after waiting {spec.engine.resource_wait_s:.0f}s: " + "; ".join(problems))
        time.sleep(min(1.0, max(deadline - time.time(), 0.1)))  # a look at the GCS: cheap
    log.info("the cluster now offers what the job needs")


def check_shared_output(spec: JobSpec, store: OutputStore) -> None:
    nodes = len(_alive_nodes())
    if store.is_local() and nodes > 1 and not spec.output.shared_filesystem:
        # Read and write tasks land on any node: their files would scatter over local disks.
        raise SpecError(
            f"output.url: {store.url} is a local path but the Ray cluster has {nodes} nodes; write to object "
            "storage (s3://...), or set output.shared_filesystem: true if every node mounts it at that path"
        )


def row_bytes_per_source(source: Source, rows_per_source: int, probes: int = _SIZE_PROBES) -> int:
    """Bytes a source sample and its rows take in a shard row, from the first good samples of the listing.

    Per pixel: the source's image (3), mask (2 at most) and instances (2) once per source; each row a
    stage makes may carry a new image, mask and instance map (7 more). A bad sample (`BadSample`) says
    nothing about size and is skipped, as the pipeline would record it; any other error is the storage's
    or a bug's and is raised. A listing whose first samples are all bad is refused: nothing could be
    measured, and the job would make nothing either.
    """
    pixels: list[int] = []
    bad: Counter[str] = Counter()
    for sample_id in itertools.islice(source.list_ids(), _PROBE_LIMIT):
        try:
            rec = source.load(sample_id)
        except BadSample as e:
            bad[e.reason] += 1
            continue
        pixels.append(rec.image.shape[0] * rec.image.shape[1])
        if len(pixels) == probes:
            break
    if bad and not pixels:
        reasons = ", ".join(f"{n} {reason}" for reason, n in bad.most_common())
        raise SpecError(
            f"source.path: the first {bad.total()} samples of {source.spec.kind} source {source.spec.path!r} are "
            f"all bad ({reasons}); check that source.path is the dataset's root and source.kind its layout"
        )
    if not pixels:
        return 0
    per_pixel = 7 * (1 + rows_per_source) if rows_per_source else 7
    return int(np.mean(pixels) * per_pixel)


def shard_size_problem(spec: JobSpec, per_source: int, rows_per_source: int, nodes: list[dict]) -> str | None:
    """Why a row of `spec.output.shard_size` sources (`per_source` bytes each) cannot fit the object store
    of the smallest node that works on rows; None if it fits, or if no node works yet."""
    stores = [n.get("object_store_memory", 0) for n in nodes if _runs_work(n)]
    if not stores or not per_source:
        return None
    limit = min(stores) / ROW_SHARE_OF_OBJECT_STORE
    row = per_source * spec.output.shard_size
    if row <= limit:
        return None
    fits = max(1, math.floor(limit / per_source))
    return (
        f"output.shard_size: a shard of {spec.output.shard_size} sources holds about {row / 2**30:.1f} GiB "
        f"in flight ({per_source / 2**20:.1f} MiB per source with its {rows_per_source or 1} rows, measured on "
        f"the first sources); a row may use at most 1/{ROW_SHARE_OF_OBJECT_STORE} of the object store of a "
        f"node that runs reads, stages or writes ({min(stores) / 2**30:.1f} GiB on the smallest here). Use "
        f"shard_size <= {fits}, lower source.max_side, or give the worker nodes a larger object store"
    )


def memory_problem(spec: JobSpec, row_bytes: int, nodes: list[dict]) -> str | None:
    """Why a stage's worker, declaring `worker_memory`, fits no node's memory; None if one fits."""
    largest = max((n.get("memory", 0) for n in nodes if _runs_work(n)), default=0)
    if not largest:
        return None
    for i, st in enumerate(spec.stages):
        need = worker_memory(row_bytes, st.resources.memory_gb)
        if need > largest:
            return (
                f"stages[{i}].resources.memory_gb: a worker of stage {st.label!r} needs {need / 2**30:.1f} GiB "
                f"({st.resources.memory_gb:g} GiB for itself, {ROW_COPIES_IN_A_WORKER} x "
                f"{row_bytes / 2**30:.1f} GiB for a shard row, {WORKER_BASE_MEMORY / 2**30:g} GiB for the "
                f"process), but the largest node offers Ray {largest / 2**30:.1f} GiB: lower memory_gb or "
                "output.shard_size, or use larger nodes"
            )
    return None


def check_shard_size(spec: JobSpec, source: Source, rows_per_source: int) -> int:
    """Refuse a shard size whose row fits no node's object store, or whose workers fit no node's memory;
    returns the bytes a shard row is expected to hold (what workers declare their memory from)."""
    per_source = row_bytes_per_source(source, rows_per_source)
    nodes = _alive_nodes()
    row_bytes = per_source * spec.output.shard_size
    problem = shard_size_problem(spec, per_source, rows_per_source, nodes) or memory_problem(spec, row_bytes, nodes)
    if problem:
        raise SpecError(problem)
    return row_bytes
