"""The same stages without Ray, in this process.

`InProcessExecutor` runs a job's shards one after another (`engine.executor: in_process`), for a job
small enough for one process or a debugger. `run_in_process` runs one slice of samples at a time
without a plan or an output: for running a stage alone on a folder (`factory stage`), and as the
engine-free reference the benchmarks compare the Ray pipeline with. Both use the pipeline's reader,
`StageRunner` and watch, so a stage behaves exactly as it does on a cluster (batches, failure policy,
row contract, deadline) minus the distribution.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Generator, Iterator
from pathlib import Path

from factory.engine.executors.base import Executor, ShardJob
from factory.engine.reader import ShardReader
from factory.engine.records import ShardResult, ShardWork
from factory.engine.spec import JobSpec, require_stage_extras
from factory.engine.watch import ShardTimeout, Watch
from factory.engine.writer import encode_files, failure_records
from factory.sample import Sample
from factory.schema import SpecError
from factory.sources import open_source


class InProcessExecutor(Executor):
    """A job's shards one after another in this process (`engine.executor: in_process`): no Ray, no
    worker to replace, so a worker's death is the job's, and a deadline raises in the main thread."""

    name = "in_process"
    uses_ray = False

    def run(self, pending: list[int]) -> Generator[ShardResult, None, None]:
        runners = [self.job.runner(stage) for stage in self.job.stages]
        for shard in pending:
            yield self.job.process(shard, runners)


def run_in_process(spec: JobSpec, limit: int | None = None, slice_size: int = 4) -> Iterator[Sample]:
    """Every sample the spec's stages make from the first `limit` source samples, in order."""
    source = open_source(spec.source)
    engine = spec.engine
    reader = ShardReader(spec.source.model_dump_json(), "", {}, engine.retries, engine.retry_backoff_s)
    job = ShardJob(
        reader=reader,
        writer=None,
        stages=tuple(st.model_dump(mode="json") for st in spec.stages),
        job_seed=spec.seed,
        classes=source.classes,
        retries=engine.retries,
        backoff=engine.retry_backoff_s,
        shard_size=slice_size,
        watch=Watch(store_url=None, store_options={}, timeout_s=engine.shard_timeout_s, end_process=False),
    )
    runners = [job.runner(stage) for stage in job.stages]
    ids = itertools.islice(source.list_ids(), limit)
    index = 0
    while chunk := list(itertools.islice(ids, slice_size)):
        work = ShardWork(
            0, [reader.load(source, 0, index + i, sample_id) for i, sample_id in enumerate(chunk)], time.time()
        )
        index += len(chunk)
        for runner in runners:
            try:
                work = job.run_stage(runner, work)
            except ShardTimeout as e:
                raise RuntimeError(f"stage {runner.label} failed: {e}") from None
            if work.failure is not None:
                raise RuntimeError(f"stage {work.failure.stage} failed: {work.failure.cause}")
        yield from work.samples


def run_stage_alone(spec: JobSpec, label: str, out_dir: str | Path, limit: int, origin: str = "spec") -> dict:
    """`factory stage`: the stage named `label` of the spec alone, on the spec's source, written as files."""
    chosen = [s for s in spec.stages if s.label == label]
    if not chosen:
        raise SpecError(f"{origin}: no stage named {label!r}; stages: {[s.label for s in spec.stages]}")
    alone = spec.model_copy(update={"stages": chosen})
    require_stage_extras(alone)
    return write_files(run_in_process(alone, limit=limit), out_dir)


def write_files(samples: Iterator[Sample], out_dir: str | Path, image_format: str = "png") -> dict:
    """Write samples as loose files (`KEY.png`, `KEY.seg.png`, `KEY.json`); failures go to failures.jsonl."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    counts = {"written": 0, "failed": 0, "rejected": 0}
    with open(out / "failures.jsonl", "w") as failures:
        for sample in samples:
            if sample.error is not None:
                failures.write(json.dumps(failure_records([sample])[0]) + "\n")
                counts["failed"] += 1
                continue
            counts["rejected" if sample.rejected else "written"] += 1
            for ext, data in encode_files(sample, image_format, 95, {}).items():
                (out / f"{sample.key}.{ext}").write_bytes(data)
    return counts
