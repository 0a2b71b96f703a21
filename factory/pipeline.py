"""The Ray Data pipeline: one row per shard, from its read to its commit.

    pending shards -> read (a task per shard) -> stage 1 .. n (actor pools) -> write (a task per shard)

A row is a whole shard (`ShardWork`, serialized once): the read task loads its samples, every stage
actor runs them in batches of its `batch_size`, and the write task encodes them and commits the shard's
tar and stats from wherever it runs. There is no central writer, no reassembly and no per-sample
accounting: a shard is complete when its row reaches the write step, and what shares a batch depends
only on the shard's contents. The row's one binary column also gives Ray Data exact block sizes, which
its memory back-pressure relies on.
"""

from __future__ import annotations

import logging
import time
from functools import lru_cache, partial

import pyarrow as pa
import ray
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from factory.classes import ClassSet
from factory.errors import describe, one_line, retry
from factory.plan import PLAN_DIR, part_name, read_shard_ids
from factory.runner import StageRunner
from factory.sample import BadSample, Sample, ShardWork
from factory.sources import Source, open_source
from factory.spec import JobSpec, SourceSpec
from factory.store import OutputStore
from factory.writer import WriteSettings, write_shard

log = logging.getLogger("factory")


def _row(work: ShardWork) -> pa.Table:
    # large_binary: a shard row may pass 2 GiB, the limit of Arrow's 32-bit binary offsets.
    return pa.table({"shard": pa.array([work.shard], pa.int64()),
                     "work": pa.array([work.to_bytes()], pa.large_binary())})


def _works(table: pa.Table) -> list[ShardWork]:
    return [ShardWork.from_bytes(raw) for raw in table.column("work").to_pylist()]


@lru_cache(maxsize=4)
def _cached_source(source_json: str) -> Source:
    return open_source(SourceSpec.model_validate_json(source_json))


class ShardReader:
    """The read step: a shard's ids from its plan part, each sample from the source."""

    def __init__(self, source_json: str, plan_url: str, plan_options: dict, retries: int, backoff: float):
        self.source_json = source_json
        self.plan_url = plan_url
        self.plan_options = plan_options
        self.retries = retries
        self.backoff = backoff

    def ids(self, shard: int) -> list[str]:
        import fsspec

        def read() -> list[str]:
            with fsspec.open(f"{self.plan_url}/{part_name(shard)}", "rb", **self.plan_options) as f:
                return read_shard_ids(f, shard)

        return retry(read, f"reading the plan of shard {shard}", self.retries, self.backoff)

    def load(self, source: Source, shard: int, index: int, sample_id: str) -> Sample:
        """One source sample; bad data becomes a failed sample, anything else is retried, then raised."""
        sample = Sample(shard=shard, index=index, source_id=sample_id)
        try:
            rec = retry(lambda: source.load(sample_id), f"reading {sample_id}", self.retries, self.backoff)
        except BadSample as e:
            return sample.fail("read", e.reason, e.detail)
        sample.image, sample.mask, sample.instances = rec.image, rec.mask, rec.instances
        sample.meta.update(rec.meta)
        return sample

    def read(self, shard: int) -> ShardWork:
        work = ShardWork(shard=shard, samples=[], started=time.time())
        try:
            source = _cached_source(self.source_json)
            work.samples = [self.load(source, shard, i, sample_id) for i, sample_id in enumerate(self.ids(shard))]
        except Exception as e:
            log.error("shard %d failed at read: %s", shard, one_line(e))
            work.failure = {"shard": shard, "stage": "read", **describe(e)}
        work.stages["read"] = {"rows_out": len(work.samples), "seconds": round(time.time() - work.started, 3)}
        return work


class ShardWriter:
    """The write step: encode and commit a shard from wherever its row is; returns its summary row."""

    def __init__(self, store_url: str, options: dict, settings: WriteSettings, job_info: dict):
        self.store_url = store_url
        self.options = options
        self.settings = settings
        self.job_info = job_info

    def __call__(self, works: list[ShardWork]) -> pa.Table:
        store = OutputStore(self.store_url, self.options)
        results = [write_shard(work, store, self.settings, self.job_info) for work in works]
        return pa.Table.from_pylist(
            [{"shard": r["shard"], "status": r["status"], "samples": r["samples"], "failed": r["failed"],
              "rejected": r["rejected"], "stage": r.get("stage"), "cause": r.get("cause"), "advice": r.get("advice")}
             for r in results]
        )


class ShardDatasource(Datasource):
    """One read task per pending shard; a task's closure holds only its shard number.

    With no stage in between, the read task writes its shard too (`writer`): one task from read to commit.
    """

    def __init__(self, pending: list[int], reader: ShardReader, writer: ShardWriter | None = None):
        super().__init__()
        self.pending = pending
        self.reader = reader
        self.writer = writer

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list[ReadTask]:
        return [
            ReadTask(partial(_read_shard, self.reader, self.writer, shard), BlockMetadata(1, None, None, None))
            for shard in self.pending
        ]


def _read_shard(reader: ShardReader, writer: ShardWriter | None, shard: int):
    work = reader.read(shard)
    yield _row(work) if writer is None else writer([work])


class StageStep(StageRunner):
    """A stage's Ray Data actor: whole shard rows in, whole shard rows out."""

    def __call__(self, table: pa.Table) -> pa.Table:
        return pa.concat_tables([_row(self.run(work)) for work in _works(table)])


def _write_step(table: pa.Table, writer: ShardWriter) -> pa.Table:
    return writer(_works(table))


def _pool(concurrency: int | tuple[int, int]) -> ray.data.ActorPoolStrategy:
    # Two shard rows per actor: one running, one arriving. More would only hold more rows in memory.
    if isinstance(concurrency, int):
        return ray.data.ActorPoolStrategy(size=concurrency, max_tasks_in_flight_per_actor=2)
    return ray.data.ActorPoolStrategy(min_size=concurrency[0], max_size=concurrency[1],
                                      max_tasks_in_flight_per_actor=2)


def build_pipeline(spec: JobSpec, store: OutputStore, options: dict, classes: ClassSet, pending: list[int],
                   job_info: dict, counter) -> ray.data.Dataset:
    """The lazy dataset whose rows are the summaries of the pending shards' commits."""
    engine = spec.engine
    reader = ShardReader(spec.source.model_dump_json(), store.public_url(PLAN_DIR), options,
                         engine.retries, engine.retry_backoff_s)
    settings = WriteSettings(
        image_format=spec.output.image_format, quality=spec.output.jpeg_quality,
        keep_rejected=spec.output.keep_rejected, max_failure_fraction=spec.output.max_failure_fraction,
        retries=engine.retries, backoff=engine.retry_backoff_s,
    )
    writer = ShardWriter(store.url, options, settings, job_info)
    # One block per shard: without the override, Ray Data splits the output of too few read tasks into
    # empty blocks that every later step would schedule.
    blocks = len(pending)
    if not spec.stages:
        source = ShardDatasource(pending, reader, writer)
        return ray.data.read_datasource(source, override_num_blocks=blocks,
                                        num_cpus=max(engine.read_cpus, engine.write_cpus))
    ds = ray.data.read_datasource(ShardDatasource(pending, reader), override_num_blocks=blocks,
                                  num_cpus=engine.read_cpus)
    for stage in spec.stages:
        r = stage.resources
        ds = ds.map_batches(
            StageStep,
            fn_constructor_kwargs={
                "stage_spec": stage.model_dump(mode="json"), "job_seed": spec.seed, "classes": classes,
                "retries": engine.retries, "backoff": engine.retry_backoff_s, "progress": counter,
            },
            batch_size=1,
            batch_format="pyarrow",
            num_cpus=r.num_cpus,
            num_gpus=r.num_gpus,
            compute=_pool(r.concurrency),
            zero_copy_batch=True,
        )
    return ds.map_batches(
        _write_step,
        fn_kwargs={"writer": writer},
        batch_size=1,
        batch_format="pyarrow",
        num_cpus=engine.write_cpus,
        zero_copy_batch=True,
    )
