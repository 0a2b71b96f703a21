"""The executor contract: pending shards in, one `ShardResult` per shard out, as each finishes.

Every executor keeps one failure contract:
- A step's own failure (storage, a model's exception) is retried inside the step (`errors.retry`,
  `StageRunner`); if it persists, the shard comes back failed with the step and the cause.
- A worker that dies (a crash in native code, the OOM killer, a lost node, a step past its deadline) is
  replaced and its shard tried again, at most `engine.retries` times. After that the shard fails alone,
  named by the step and node it died on (its watch record), and the job goes on.
- Every step runs under its watch (`factory/engine/watch.py`): a record of where it is and a deadline.

`choice.executor_class` is the one place that picks an executor for a job.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any, ClassVar

from factory.engine.executors.worker_logs import last_words
from factory.engine.reader import ShardReader
from factory.engine.records import Failure, ShardResult, ShardWork
from factory.engine.runner import StageRunner
from factory.engine.spec import JobSpec
from factory.engine.watch import ShardTimeout, Watch, place, read_attempt
from factory.engine.writer import ShardWriter
from factory.models.weights import WeightsPin
from factory.output.layout import OutputStore
from factory.sources.classes import ClassSet

TIMEOUT_ADVICE = (
    "if the step is slow rather than hung, raise engine.shard_timeout_s; else run the stage alone on the "
    "shard's samples (factory stage SPEC NAME) to find the sample it hangs on"
)


@dataclass(frozen=True)
class ShardJob:
    """Everything a worker needs to take a shard from its read to its commit: picklable, sent once."""

    reader: ShardReader
    writer: ShardWriter | None  # None: samples stay in memory (`factory stage`)
    stages: tuple[dict, ...]  # the stage specs, as JSON
    job_seed: int
    classes: ClassSet
    retries: int
    backoff: float
    shard_size: int
    watch: Watch
    progress: Any = field(default=None, compare=False)  # the job's StageRows actor (progress.py), or None
    # A custom resource that stands in for GPUs (tests of several nodes on a machine without one): GPU
    # stages ask for it instead, and run on the CPU. Never set from a spec: see runner.stage_device.
    gpu_stand_in: str | None = None
    name: str = ""  # the job's name: tags its metrics
    pins: dict[str, tuple[WeightsPin, ...]] = field(default_factory=dict)  # stage label -> its models' pins

    def runner(self, stage: dict) -> StageRunner:
        return StageRunner(
            stage,
            self.job_seed,
            self.classes,
            self.retries,
            self.backoff,
            self.progress,
            self.gpu_stand_in,
            job_name=self.name,
            pins=self.pins,
        )

    def read(self, shard: int) -> ShardWork:
        with self.watch.step(shard, "read", self.shard_size):
            return self.reader.read(shard)

    def run_stage(self, runner: StageRunner, work: ShardWork) -> ShardWork:
        if work.failure is not None:
            return work
        with self.watch.step(work.shard, runner.label, len(work.samples) * runner.k):
            return runner.run(work)

    def commit(self, work: ShardWork) -> ShardResult:
        if self.writer is None:
            raise ValueError("this job has no writer: its samples stay in memory")
        with self.watch.step(work.shard, "write", len(work.samples)):
            return self.writer.commit(work)

    def through_stages(self, shard: int, runners: list[StageRunner]) -> ShardWork:
        """A shard read and run through every stage, in this process; a step past its deadline (in-process:
        `ShardTimeout`) fails the shard at that step."""
        step = "read"
        try:
            work = self.read(shard)
            for runner in runners:
                step = runner.label
                work = self.run_stage(runner, work)
        except ShardTimeout as e:
            work = ShardWork(shard=shard, samples=[], started=0.0)
            work.failure = Failure(stage=step, cause=str(e), advice=TIMEOUT_ADVICE)
        return work

    def process(self, shard: int, runners: list[StageRunner]) -> ShardResult:
        """One shard from its read to its commit, in this process."""
        work = self.through_stages(shard, runners)
        try:
            return self.commit(work)
        except ShardTimeout as e:
            return ShardResult.failed_at(shard, Failure(stage="write", cause=str(e), advice=TIMEOUT_ADVICE))


def lost_shard(store: OutputStore, shard: int, tries: int, error: BaseException | None = None) -> ShardResult:
    """The result of a shard whose worker died on every try, told from its watch record."""
    from factory.engine.errors import one_line

    seen = read_attempt(store, shard) or {}
    step, node = seen.get("step", "worker"), seen.get("node", "an unknown node")
    if "timeout" in seen:
        cause = f"{seen['timeout']} on node {node}, on each of {tries} tries; the worker was replaced each time"
        return ShardResult.failed_at(shard, Failure(stage=step, cause=cause, advice=TIMEOUT_ADVICE))
    node_id = seen.get("node_id")
    where = place(node, node_id, seen.get("pid", "?"))
    gone = node_id in dead_nodes() if node_id else node in dead_nodes("NodeManagerAddress")
    said = None if gone else last_words(node_id, seen.get("pid"))
    if gone:
        why = "its node left the cluster"
    elif said:
        why = said  # the fatal error its faulthandler wrote: the signal and the frame
    elif said == "":
        why = "its log shows no fatal error: a SIGKILL (as the OOM killer sends) or an exit from native code"
    else:
        why = "a crash in native code, the OOM killer or a lost node"
    cause = f"the worker running step {step} on {where} died on each of {tries} tries: {why}" + (
        f" ({one_line(error)})" if error is not None else ""
    )
    advice = (
        "a rerun retries it; if it dies again, the shard holds a sample that crashes the step: "
        f"see the Ray logs of node {node} (worker-*-{seen.get('pid', 'PID')}.err, dmesg for the OOM killer)"
    )
    return ShardResult.failed_at(shard, Failure(stage=step, cause=cause, advice=advice))


def dead_nodes(key: str = "NodeID") -> set[str]:
    """The nodes Ray knows as dead, by `key` of `ray.nodes()` (their ids, or addresses); none without Ray."""
    import sys

    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return set()
    from factory.engine.ray_session import node_table

    return {n[key] for n in node_table() if not n["Alive"]}


# A worker's heap holds a shard's pixels about twice: the samples it makes and the row it writes them into
# (the row it was given stays in the object store: factory/engine/executors/rows.py). Measured: 2.3 rows
# at the peak of a hop (the `rows` part of bench/bench_scale.py); declared with room above that.
ROW_COPIES_IN_A_WORKER = 2.5
# A worker process before it holds any shard: the interpreter, pyarrow and Ray (a read task measured 140 MiB).
WORKER_BASE_MEMORY = 256 * 2**20


def worker_memory(row_bytes: int, memory_gb: float = 0.0) -> int:
    """The memory (bytes) a worker declares to Ray: its process, its shard rows' copies and what its stage
    says it needs besides."""
    return int(WORKER_BASE_MEMORY + ROW_COPIES_IN_A_WORKER * row_bytes + memory_gb * 2**30)


class Executor(ABC):
    """Runs a job's pending shards; see the module's docstring for the contract all of them keep."""

    name: ClassVar[str]
    uses_ray: ClassVar[bool] = True

    def __init__(self, spec: JobSpec, job: ShardJob, store: OutputStore, row_bytes: int = 0):
        self.spec = spec
        self.job = job
        self.store = store
        self.row_bytes = row_bytes  # expected bytes of a shard row; 0: not measured (no memory declared)

    def remote_options(self, num_cpus: float, num_gpus: float, memory_gb: float = 0.0) -> dict[str, Any]:
        """Ray options of a task or actor asking for these CPUs and GPUs, and the memory of its shard rows
        plus `memory_gb` (`checks.worker_memory`): Ray then places no more workers on a node than its memory
        holds, instead of letting the OOM killer choose among them.

        A node-local output (`output.shared_filesystem` false) keeps all work on the driver's node, so a
        node that joins later never writes to its own disk. A GPU stand-in (`gpu_stand_in`, tests only)
        asks for that custom resource in place of GPUs.
        """
        options: dict[str, Any] = {"num_cpus": num_cpus, "num_gpus": num_gpus}
        memory = worker_memory(self.row_bytes, memory_gb) if self.row_bytes else 0
        if memory:
            options["memory"] = memory
        if self.store.is_local() and not self.spec.output.shared_filesystem:
            import ray
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            # By node id, not address: nodes may share an address (containers, several raylets on a host).
            node = ray.get_runtime_context().get_node_id()
            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_id=node, soft=False)
        if self.job.gpu_stand_in and num_gpus > 0:
            options["resources"] = {self.job.gpu_stand_in: num_gpus}
            options["num_gpus"] = 0.0
        return options

    @abstractmethod
    def run(self, pending: list[int]) -> Generator[ShardResult, None, None]:
        """Each pending shard's result, in the order they finish; closing the iterator stops the work."""
