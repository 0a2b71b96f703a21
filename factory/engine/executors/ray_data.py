"""The Ray Data pipeline: one row per shard, from its read to its commit.

    pending shards -> read (a task per shard) -> stage 1 .. n (actor pools) -> write (a task per shard)

A row is a whole shard (`ShardWork`, carried as `rows.py` describes: its pixels copied once into the
block, read back without a copy): the read task loads its samples, every stage
actor runs them in batches of its `batch_size`, and the write task encodes them and commits the shard's
tar and stats from wherever it runs. There is no central writer, no reassembly and no per-sample
accounting: a shard is complete when its row reaches the write step, and what shares a batch depends
only on the shard's contents. The row's one binary column also gives Ray Data exact block sizes, which
its memory back-pressure relies on. A job without stages has nothing to pipeline: each shard is one
plain Ray task from read to commit (`factory/engine/executors/ray_tasks.py`).
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Generator
from functools import partial

import pyarrow as pa
import ray
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from factory.engine.executors.base import Executor, ShardJob, dead_nodes, lost_shard
from factory.engine.executors.rows import shard_row, shard_works
from factory.engine.records import ShardResult
from factory.engine.runner import StageRunner

log = logging.getLogger("factory")


class ShardDatasource(Datasource):
    """One read task per pending shard; a task's closure holds only its shard number."""

    def __init__(self, pending: list[int], job: ShardJob):
        super().__init__()
        self.pending = pending
        self.job = job

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list[ReadTask]:
        return [
            ReadTask(partial(_read_shard, self.job, shard), BlockMetadata(1, None, None, None))
            for shard in self.pending
        ]


def _read_shard(job: ShardJob, shard: int):
    yield shard_row(job.read(shard))


class StageActor:
    """A stage's Ray Data actor: whole shard rows in, whole shard rows out, each under its watch."""

    def __init__(self, job: ShardJob, stage: int):
        self.job = job
        self.runner: StageRunner = job.runner(job.stages[stage])

    def __call__(self, table: pa.Table) -> pa.Table:
        return pa.concat_tables([shard_row(self.job.run_stage(self.runner, work)) for work in shard_works(table)])


def _write_step(table: pa.Table, job: ShardJob) -> pa.Table:
    return pa.Table.from_pylist([job.commit(work).to_row() for work in shard_works(table)])


def _pool(concurrency: int | tuple[int, int]) -> ray.data.ActorPoolStrategy:
    # One shard row per actor at a time: a second row queued on an actor would fail with it when a poison
    # shard ends the actor, and be charged a try it did not cause. The next row waits in the object store.
    if isinstance(concurrency, int):
        return ray.data.ActorPoolStrategy(size=concurrency, max_tasks_in_flight_per_actor=1)
    return ray.data.ActorPoolStrategy(min_size=concurrency[0], max_size=concurrency[1], max_tasks_in_flight_per_actor=1)


class RayDataExecutor(Executor):
    """Read tasks, an actor pool per stage, write tasks (Ray Data); the default for a job with stages."""

    name = "ray_data"
    # Ray Data ends an actor pool by dropping its handles, not by killing its actors, and a task that failed
    # keeps its actor's handle in a reference cycle: that actor (one Ray restarted after a poison shard or a
    # deadline) holds its CPUs and GPUs until Python's collector happens to run, and the next job in the
    # same driver may wait for them for ever (or the second pass after a lost node, whose new pool needs
    # the same GPUs: it waited 17 s for the collector on a test cluster). After a pass that did not end
    # clean the collector runs, and again before the next run. (A full collection costs up to seconds in a
    # large process: not after every run.)
    collect_before_next_run = False

    def run(self, pending: list[int]) -> Generator[ShardResult, None, None]:
        """The pipeline over the pending shards; then once more over the shards it dropped, if a node left
        the cluster meanwhile: a lost node takes the objects it held with it, and Ray Data drops a block
        whose lineage cannot be rebuilt within its retries. That is the cluster's fault, not the shard's."""
        left = set(pending)
        gone_before = dead_nodes()
        if RayDataExecutor.collect_before_next_run:
            gc.collect()
            RayDataExecutor.collect_before_next_run = False
        try:
            yield from self._pass(pending, left)
            if left and dead_nodes() - gone_before:
                gc.collect()  # the first pass's actors give their resources back before the second asks
                log.warning("a node left the cluster: running the %d shards it dropped once more", len(left))
                yield from self._pass(sorted(left), left)
        finally:
            if left:  # a shard whose tasks failed, or a run that stopped early
                gc.collect()
                RayDataExecutor.collect_before_next_run = True  # in case something held a handle meanwhile
        for shard in sorted(left):
            yield lost_shard(self.store, shard, self.spec.engine.retries + 1)

    def _pass(self, shards: list[int], left: set[int]) -> Generator[ShardResult, None, None]:
        """One pipeline over `shards`; each shard it returns is taken off `left`."""
        for result in self._rows(shards):
            left.discard(result.shard)
            yield result

    def _rows(self, pending: list[int]) -> Generator[ShardResult, None, None]:
        engine = self.spec.engine
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.execution_options.preserve_order = False
        # A shard whose worker died on every try is dropped by Ray Data, not the job: the shards that never
        # come out are told apart by `run`, from their watch records.
        ctx.max_errored_blocks = -1
        # An actor that cannot start (a GPU node without CUDA, a model that fails to load) is replaced this
        # many times in a row before the job stops with its error.
        ctx.max_consecutive_actor_init_deaths = engine.retries
        retries = {"max_retries": engine.retries, "retry_exceptions": False}
        # One block per shard: without the override, Ray Data splits the output of too few read tasks into
        # empty blocks that every later step would schedule.
        ds = ray.data.read_datasource(
            ShardDatasource(pending, self.job),
            override_num_blocks=len(pending),
            ray_remote_args={**self.remote_options(engine.read_cpus, 0.0), **retries},
        )
        for i, stage in enumerate(self.spec.stages):
            r = stage.resources
            ds = ds.map_batches(
                StageActor,
                fn_constructor_kwargs={"job": self.job, "stage": i},
                batch_size=1,
                batch_format="pyarrow",
                compute=_pool(r.concurrency),
                zero_copy_batch=True,
                # A running actor that dies (its node lost, a crash, a deadline) is always replaced: the
                # pool would otherwise keep the dead one's slot and wait for it. What bounds the tries is
                # the shard's: its task is retried engine.retries times, then dropped.
                max_restarts=-1,
                max_task_retries=engine.retries,
                **self.remote_options(r.num_cpus, r.num_gpus, r.memory_gb),
            )
        rows = ds.map_batches(
            _write_step,
            fn_kwargs={"job": self.job},
            batch_size=1,
            batch_format="pyarrow",
            zero_copy_batch=True,
            **self.remote_options(engine.write_cpus, 0.0),
            **retries,
        ).iter_rows()
        # Closing this generator drops Ray Data's iterator, which shuts its execution down.
        for row in rows:
            yield ShardResult.from_row(row)
