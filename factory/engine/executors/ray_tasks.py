"""Plain Ray tasks: one task per shard takes it from its read through every stage to its commit.

The default for a job without stages, and `engine.executor: ray_tasks` for any job. Ray Data adds
nothing to a single step but latency: its executor notices a finished task on its next 0.1 s poll and
only then submits the next one, which left each worker idle 0.1-0.2 s per shard (a third of the time
of a 100-sample shard at 128 px). Ray's own task queue hands a queued task to a worker the moment it
is free, so the driver keeps up to two tasks per slot submitted, and no more: the queue stays bounded
however many shards the job has. A worker process keeps its stages (and their models) from one shard
to the next, as an actor would.
"""

from __future__ import annotations

import json
from collections.abc import Generator

import ray

from factory.engine.errors import root_cause
from factory.engine.executors.base import Executor, ShardJob, lost_shard
from factory.engine.records import Failure, ShardResult
from factory.engine.runner import StageRunner

TASKS_PER_SLOT = 2

_RUNNERS: dict[str, list[StageRunner]] = {}  # per worker process: this job's stages, set up once


def _runners(job: ShardJob) -> list[StageRunner]:
    key = json.dumps([job.reader.plan_url, job.job_seed, job.stages], sort_keys=True)
    if key not in _RUNNERS:
        _RUNNERS.clear()  # another job's models: not needed again by this worker
        _RUNNERS[key] = [job.runner(stage) for stage in job.stages]
    return _RUNNERS[key]


def process_shard(job: ShardJob, shard: int) -> ShardResult:
    return job.process(shard, _runners(job))


def _in_flight_limit(num_cpus: float) -> int:
    # Read again as results come in: an autoscaling cluster that grows gets more tasks.
    cpus = ray.cluster_resources().get("CPU", 1.0)
    slots = cpus / num_cpus if num_cpus > 0 else cpus
    return max(TASKS_PER_SLOT, int(TASKS_PER_SLOT * slots))


class RayTasksExecutor(Executor):
    name = "ray_tasks"

    def run(self, pending: list[int]) -> Generator[ShardResult, None, None]:
        """A worker that dies is replaced and its task retried by Ray (`engine.retries` times, then the shard
        fails alone). Closing the iterator cancels what is queued."""
        engine = self.spec.engine
        # A task runs every step of a shard: it asks for the most any step needs.
        stages = [s.resources for s in self.spec.stages]
        num_cpus = max([engine.read_cpus, engine.write_cpus, *(r.num_cpus for r in stages)])
        num_gpus = max([0.0, *(r.num_gpus for r in stages)])
        task = ray.remote(process_shard).options(
            **self.remote_options(num_cpus, num_gpus, sum(r.memory_gb for r in stages)),
            max_retries=engine.retries,
            retry_exceptions=False,
            name="factory.process_shard",
        )
        job_ref = ray.put(self.job)
        todo = iter(pending)
        in_flight: dict[ray.ObjectRef, int] = {}
        try:
            while True:
                for _ in range(_in_flight_limit(num_cpus) - len(in_flight)):
                    shard = next(todo, None)
                    if shard is None:
                        break
                    in_flight[task.remote(job_ref, shard)] = shard
                if not in_flight:
                    return
                [ref], _ = ray.wait(list(in_flight), num_returns=1)
                shard = in_flight.pop(ref)
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayTaskError as e:  # past every step's own handling: a bug, a set-up
                    step = getattr(root_cause(e), "stage", "worker")
                    result = ShardResult.failed_at(shard, Failure.of(step, e))
                except ray.exceptions.RayError as e:  # the worker died on every try
                    result = lost_shard(self.store, shard, engine.retries + 1, e)
                yield result
        finally:
            for ref in in_flight:
                ray.cancel(ref)
