"""The same stages without Ray: one process, one batch at a time.

For running a stage alone on a folder while debugging it (`factory stage`), and as the engine-free
reference the benchmark compares the Ray pipeline with. It reuses the engine's `StageRunner`, so a stage
behaves exactly as it does on a cluster (failure isolation, row contract) minus the distribution.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from pathlib import Path

from factory.engine import StageRunner, load_sample, pack
from factory.sample import Sample
from factory.sources import open_source
from factory.spec import JobSpec
from factory.writer import encode_sample


def run_in_process(spec: JobSpec, limit: int | None = None, batch_size: int = 4) -> Iterator[Sample]:
    """Every sample the spec's stages make from the first `limit` source samples, in order."""
    source = open_source(spec.source)
    runners = [
        StageRunner(st.model_dump(mode="json"), spec.seed, source.classes, spec.engine.stop_after_failures)
        for st in spec.stages
    ]
    ids = itertools.islice(source.list_ids(), limit)
    index = 0
    while chunk := list(itertools.islice(ids, batch_size)):
        batch = pack([load_sample(source, 0, index + i, sample_id) for i, sample_id in enumerate(chunk)])
        index += len(chunk)
        for runner in runners:
            batch = runner(batch)
        yield from (Sample.from_bytes(b) for b in batch["sample"])


def write_files(samples: Iterator[Sample], out_dir: str | Path, image_format: str = "png") -> dict:
    """Write samples as loose files (`KEY.png`, `KEY.seg.png`, `KEY.json`); failures go to failures.jsonl."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    counts = {"written": 0, "failed": 0, "rejected": 0}
    with open(out / "failures.jsonl", "w") as failures:
        for sample in samples:
            rec = encode_sample(sample, image_format, 95, {}, keep_rejected=True)
            if rec.error is not None:
                failures.write(json.dumps({"key": rec.key, "source_id": rec.source_id, **rec.error}) + "\n")
                counts["failed"] += 1
                continue
            counts["rejected" if rec.rejected else "written"] += 1
            for ext, data in rec.files.items():
                (out / f"{rec.key}.{ext}").write_bytes(data)
    return counts
