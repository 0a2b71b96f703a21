"""The same stages without Ray: one process, one slice of samples at a time.

For running a stage alone on a folder while debugging it (`factory stage`), and as the engine-free
reference the benchmarks compare the Ray pipeline with. It reuses the pipeline's reader and the
`StageRunner`, so a stage behaves exactly as it does on a cluster (batches, failure policy, row
contract) minus the distribution.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Iterator
from pathlib import Path

from factory.engine.reader import ShardReader
from factory.engine.records import ShardWork
from factory.engine.runner import StageRunner
from factory.engine.spec import JobSpec, require_stage_extras
from factory.engine.writer import encode_files, failure_records
from factory.sample import Sample
from factory.schema import SpecError
from factory.sources import open_source


def run_in_process(spec: JobSpec, limit: int | None = None, slice_size: int = 4) -> Iterator[Sample]:
    """Every sample the spec's stages make from the first `limit` source samples, in order."""
    source = open_source(spec.source)
    engine = spec.engine
    reader = ShardReader(spec.source.model_dump_json(), "", {}, engine.retries, engine.retry_backoff_s)
    runners = [
        StageRunner(st.model_dump(mode="json"), spec.seed, source.classes, engine.retries, engine.retry_backoff_s)
        for st in spec.stages
    ]
    ids = itertools.islice(source.list_ids(), limit)
    index = 0
    while chunk := list(itertools.islice(ids, slice_size)):
        work = ShardWork(
            0, [reader.load(source, 0, index + i, sample_id) for i, sample_id in enumerate(chunk)], time.time()
        )
        index += len(chunk)
        for runner in runners:
            work = runner.run(work)
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
