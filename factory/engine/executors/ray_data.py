"""The Ray Data pipeline: one row per shard, from its read to its commit.

    pending shards -> read (a task per shard) -> stage 1 .. n (actor pools) -> write (a task per shard)

A row is a whole shard (`ShardWork`, serialized once): the read task loads its samples, every stage
actor runs them in batches of its `batch_size`, and the write task encodes them and commits the shard's
tar and stats from wherever it runs. There is no central writer, no reassembly and no per-sample
accounting: a shard is complete when its row reaches the write step, and what shares a batch depends
only on the shard's contents. The row's one binary column also gives Ray Data exact block sizes, which
its memory back-pressure relies on. A job without stages has nothing to pipeline: each shard is one
plain Ray task from read to commit (`factory/engine/executors/ray_tasks.py`).
"""

from __future__ import annotations

from collections.abc import Generator
from functools import partial

import pyarrow as pa
import ray
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from factory.engine.executors.ray_tasks import commit_shards
from factory.engine.reader import ShardReader
from factory.engine.records import JobInfo, ShardResult, ShardWork
from factory.engine.runner import StageRunner
from factory.engine.spec import JobSpec
from factory.engine.writer import ShardWriter, WriteSettings
from factory.output.layout import PLAN_DIR, OutputStore
from factory.sources.classes import ClassSet


def _row(work: ShardWork) -> pa.Table:
    # large_binary: a shard row may pass 2 GiB, the limit of Arrow's 32-bit binary offsets.
    return pa.table(
        {"shard": pa.array([work.shard], pa.int64()), "work": pa.array([work.to_bytes()], pa.large_binary())}
    )


def _works(table: pa.Table) -> list[ShardWork]:
    return [ShardWork.from_bytes(raw) for raw in table.column("work").to_pylist()]


class ShardDatasource(Datasource):
    """One read task per pending shard; a task's closure holds only its shard number."""

    def __init__(self, pending: list[int], reader: ShardReader):
        super().__init__()
        self.pending = pending
        self.reader = reader

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list[ReadTask]:
        return [
            ReadTask(partial(_read_shard, self.reader, shard), BlockMetadata(1, None, None, None))
            for shard in self.pending
        ]


def _read_shard(reader: ShardReader, shard: int):
    yield _row(reader.read(shard))


class StageActor(StageRunner):
    """A stage's Ray Data actor: whole shard rows in, whole shard rows out."""

    def __call__(self, table: pa.Table) -> pa.Table:
        return pa.concat_tables([_row(self.run(work)) for work in _works(table)])


def _write_step(table: pa.Table, writer: ShardWriter) -> pa.Table:
    return pa.Table.from_pylist([writer.commit(work).to_row() for work in _works(table)])


def _pool(concurrency: int | tuple[int, int]) -> ray.data.ActorPoolStrategy:
    # Two shard rows per actor: one running, one arriving. More would only hold more rows in memory.
    if isinstance(concurrency, int):
        return ray.data.ActorPoolStrategy(size=concurrency, max_tasks_in_flight_per_actor=2)
    return ray.data.ActorPoolStrategy(min_size=concurrency[0], max_size=concurrency[1], max_tasks_in_flight_per_actor=2)


def shard_results(
    spec: JobSpec, store: OutputStore, options: dict, classes: ClassSet, pending: list[int], job: JobInfo, counter
) -> Generator[ShardResult, None, None]:
    """Run the pending shards; yields each one's result (committed or failed) as it finishes."""
    engine = spec.engine
    reader = ShardReader(
        spec.source.model_dump_json(), store.public_url(PLAN_DIR), options, engine.retries, engine.retry_backoff_s
    )
    settings = WriteSettings(
        image_format=spec.output.image_format,
        quality=spec.output.jpeg_quality,
        keep_rejected=spec.output.keep_rejected,
        max_failure_fraction=spec.output.max_failure_fraction,
        retries=engine.retries,
        backoff=engine.retry_backoff_s,
    )
    writer = ShardWriter(store.url, options, settings, job)
    if not spec.stages:
        # One step from read to commit: plain Ray tasks (factory/engine/executors/ray_tasks.py says why not Ray Data).
        yield from commit_shards(pending, reader, writer, max(engine.read_cpus, engine.write_cpus))
        return
    # One block per shard: without the override, Ray Data splits the output of too few read tasks into
    # empty blocks that every later step would schedule.
    ds = ray.data.read_datasource(
        ShardDatasource(pending, reader), override_num_blocks=len(pending), num_cpus=engine.read_cpus
    )
    for stage in spec.stages:
        r = stage.resources
        ds = ds.map_batches(
            StageActor,
            fn_constructor_kwargs={
                "stage_spec": stage.model_dump(mode="json"),
                "job_seed": spec.seed,
                "classes": classes,
                "retries": engine.retries,
                "backoff": engine.retry_backoff_s,
                "progress": counter,
            },
            batch_size=1,
            batch_format="pyarrow",
            num_cpus=r.num_cpus,
            num_gpus=r.num_gpus,
            compute=_pool(r.concurrency),
            zero_copy_batch=True,
        )
    rows = ds.map_batches(
        _write_step,
        fn_kwargs={"writer": writer},
        batch_size=1,
        batch_format="pyarrow",
        num_cpus=engine.write_cpus,
        zero_copy_batch=True,
    ).iter_rows()
    yield from map(ShardResult.from_row, rows)
