"""The read step: a shard's ids from its plan part, then each sample from the source.

Imported by every worker that reads a shard, so it stays free of Ray Data: a fresh worker of a
zero-stage job (`factory/engine/executors/ray_tasks.py`) starts without its second of imports.
"""

from __future__ import annotations

import logging
import time
from functools import lru_cache

from factory.engine.errors import one_line, retry
from factory.engine.records import Failure, ShardWork, StepStats
from factory.engine.shard_plan import read_shard_ids
from factory.output.layout import plan_part_name
from factory.sample import BadSample, Sample
from factory.sources import open_source
from factory.sources.base import Source
from factory.sources.spec import SourceSpec
from factory.storage import open_url

log = logging.getLogger("factory")


@lru_cache(maxsize=4)
def _cached_source(source_json: str) -> Source:
    return open_source(SourceSpec.model_validate_json(source_json))


class ShardReader:
    """Reads whole shards: picklable, and opens its source once per worker process."""

    def __init__(self, source_json: str, plan_url: str, plan_options: dict, retries: int, backoff: float):
        self.source_json = source_json
        self.plan_url = plan_url
        self.plan_options = plan_options
        self.retries = retries
        self.backoff = backoff

    def ids(self, shard: int) -> list[str]:

        def read() -> list[str]:
            with open_url(f"{self.plan_url}/{plan_part_name(shard)}", "rb", self.plan_options) as f:
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
            work.failure = Failure.of("read", e)
        work.stages["read"] = StepStats(rows_out=len(work.samples), seconds=round(time.time() - work.started, 3))
        return work
