"""The engine: a validated job spec runs as one Ray Data pipeline that writes resumable shards.

    pending shards -> read (tasks) -> stage 1 .. stage n (actor pools) -> encode (tasks) -> shard writers

The driver plans once (or reloads the stored plan), lists committed shards once, and streams only the
pending ones through the pipeline. Rows are pickled `Sample`s, so any stage can add fields without a
schema change. Shard writers are plain actors: shard i always goes to writer i % n, which is what lets a
writer know when a shard is complete and commit it while the rest of the job is still running.
"""

from __future__ import annotations

import logging
import os
import time
import traceback
from functools import lru_cache

import numpy as np
import ray

from factory import __version__
from factory.classes import ClassSet
from factory.plan import PLAN_FILE, Plan, plan_shards, read_shard_ids
from factory.sample import BadSample, Sample
from factory.sources import open_source
from factory.spec import JobSpec, SourceSpec, SpecError, StageSpec, dump_spec
from factory.stages import StageContext, resolve_stage
from factory.store import OutputStore, storage_options
from factory.writer import ShardWriter, encode_sample

log = logging.getLogger("factory")


class ResumeError(RuntimeError):
    """The output already holds a different job."""


class StageFailed(RuntimeError):
    """A stage failed on every sample it was given at the start: the job stops instead of writing empties."""


# ---------------------------------------------------------------- planning and resume


def prepare_output(spec: JobSpec, overwrite: bool = False) -> tuple[OutputStore, Plan, ClassSet, dict]:
    """Open the output, then either plan the job or check that it is the same job and reload its plan."""
    store = OutputStore.for_output(spec.output)
    if overwrite:
        store.remove_all()
    spec_hash = spec.content_hash()
    manifest = store.read_json("manifest.json")
    source = open_source(spec.source)
    check_stages(spec, source.classes)
    if manifest is not None:
        if manifest["spec_hash"] != spec_hash:
            raise ResumeError(
                f"{store.url} already holds job {manifest['name']!r} with spec hash {manifest['spec_hash']}; "
                f"this spec hashes to {spec_hash}. Rerun the original spec to resume it, pass "
                f"--output URL to run this spec elsewhere, or --overwrite to delete {store.url} and start over."
            )
        plan = Plan(**{k: manifest["plan"][k] for k in ("num_samples", "shard_size")})
        return store, plan, source.classes, manifest
    store.ensure_root()
    with store.fs.open(store.path(PLAN_FILE), "wb") as sink:
        plan = plan_shards(source.list_ids(), spec.output.shard_size, sink)
    manifest = {
        "name": spec.name,
        "spec": dump_spec(spec),
        "spec_hash": spec_hash,
        "plan": {**plan.summary(), "file": PLAN_FILE},
        "classes": list(source.classes.names),
        "ignore_index": source.classes.ignore_index,
        "factory_version": __version__,
        "created": time.time(),
    }
    # Written last: a job whose manifest is missing was never planned, and is planned again.
    store.write_json(manifest, "manifest.json")
    return store, plan, source.classes, manifest


# ---------------------------------------------------------------- pipeline pieces (run on workers)


@lru_cache(maxsize=4)
def _cached_source(source_json: str):
    return open_source(SourceSpec.model_validate_json(source_json))


def load_sample(source, shard: int, index: int, sample_id: str) -> Sample:
    """One source sample as a Sample; a bad input becomes a failed sample instead of an exception."""
    sample = Sample(shard=shard, index=index, source_id=sample_id)
    try:
        rec = source.load(sample_id)
    except BadSample as e:
        return sample.fail("read", e.reason, e.detail)
    except Exception as e:  # an unreadable file is one bad sample, not a dead job
        return sample.fail("read", "read_error", f"{type(e).__name__}: {e}")
    sample.image, sample.mask, sample.instances = rec.image, rec.mask, rec.instances
    sample.meta.update(rec.meta)
    return sample


def read_shards(batch: dict, source_json: str, plan_url: str, plan_options: dict, chunk: int):
    """Expand shard rows into samples: ids from the plan, pixels from the source, `chunk` at a time.

    Yielding chunks keeps a read task's memory at `chunk` decoded samples, not a whole shard.
    """
    import fsspec

    source = _cached_source(source_json)
    with fsspec.open(plan_url, "rb", **plan_options) as f:
        for shard in batch["shard"]:
            ids = read_shard_ids(f, int(shard))
            for start in range(0, len(ids), chunk):
                yield pack([
                    load_sample(source, int(shard), index, ids[index])
                    for index in range(start, min(start + chunk, len(ids)))
                ])


def pack(samples: list[Sample]) -> dict:
    return {
        "sample": np.array([s.to_bytes() for s in samples], dtype=object),
        "shard": np.array([s.shard for s in samples], dtype=np.int64),
    }


class StageRunner:
    """One worker of a stage: builds the stage, loads its models once, and guards the row contract."""

    def __init__(self, stage_spec: dict, job_seed: int, classes: ClassSet, stop_after_failures: int):
        spec = StageSpec.model_validate(stage_spec)
        cls = resolve_stage(spec.kind)
        device = "cpu"
        if spec.resources.num_gpus > 0:
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.label = spec.label
        self.stage = cls(
            cls.Params.model_validate(spec.params),
            cls.Model.model_validate(spec.model),
            StageContext(label=spec.label, job_seed=job_seed, classes=classes, device=device),
        )
        self.stage.setup()
        self.k = self.stage.variants_per_input()
        self.stop_after_failures = stop_after_failures
        self.succeeded = 0
        self.failed = 0

    def __call__(self, batch: dict) -> dict:
        out, live = [], []
        for raw in batch["sample"]:
            sample = Sample.from_bytes(raw)
            if sample.ok:
                live.append(raw)
            else:
                out.append(sample)  # failed or rejected upstream: passed on untouched
        produced = self._process(live)
        self._count_and_check_stop(produced)
        out.extend(produced)
        return pack(out)

    def _process(self, live_bytes: list[bytes]) -> list[Sample]:
        if not live_bytes:
            return []
        inputs = [Sample.from_bytes(b) for b in live_bytes]
        try:
            produced = self.stage.process([Sample.from_bytes(b) for b in live_bytes])
        except Exception as e:
            if len(live_bytes) > 1:  # find the sample that broke the batch
                return [s for b in live_bytes for s in self._process([b])]
            detail = f"{type(e).__name__}: {e}"
            log.warning("stage %s failed on %s: %s", self.label, inputs[0].source_id, traceback.format_exc())
            produced = [s.fail(self.label, "model_error", detail) for s in inputs[0].expand(self.k)]
        self._check_contract(inputs, produced)
        for s in produced:
            self._check_output(s)
        return produced

    def _count_and_check_stop(self, produced: list[Sample]) -> None:
        """Count inputs (not rows) that this stage made something of, or failed on; stop if it never works."""
        for i in range(0, len(produced), self.k):
            group = produced[i : i + self.k]
            if any(s.error is None for s in group):  # written or rejected: the stage did its work
                self.succeeded += 1
            elif any(s.error.get("stage") == self.label for s in group):
                self.failed += 1
        if self.succeeded == 0 and self.failed >= self.stop_after_failures:
            first = next(s.error for s in produced if s.error is not None)
            raise StageFailed(
                f"stage {self.label!r} failed on each of its first {self.failed} samples and succeeded on "
                f"none; stopping the job rather than writing empty shards. Last error: "
                f"{first['reason']}: {first['detail']}"
            )

    def _check_output(self, s: Sample) -> None:
        """A sample the writer could not encode fails here, with a reason, instead of killing the job."""
        if not s.ok:
            return
        image, mask = s.image, s.mask
        problem = None
        if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3):
            problem = f"image must be an (H, W, 3) uint8 array, got {getattr(image, 'dtype', type(image))} " \
                      f"{getattr(image, 'shape', '')}"
        elif mask is not None and (mask.shape != image.shape[:2] or mask.dtype not in (np.uint8, np.uint16)):
            problem = f"mask must be (H, W) uint8/uint16 matching the image {image.shape[:2]}, got {mask.dtype} {mask.shape}"
        if problem:
            s.fail(self.label, "bad_output", problem)

    def _check_contract(self, inputs: list[Sample], produced: list[Sample]) -> None:
        if len(produced) != len(inputs) * self.k:
            raise RuntimeError(
                f"stage {self.label!r} returned {len(produced)} samples for {len(inputs)} inputs; "
                f"it declares {self.k} per input (a stage must never drop a sample: mark it instead)"
            )
        for i, src in enumerate(inputs):
            for s in produced[i * self.k : (i + 1) * self.k]:
                if (s.shard, s.index, s.variants) != (src.shard, src.index, src.variants * self.k):
                    raise RuntimeError(f"stage {self.label!r} returned its samples out of order")


@ray.remote(num_cpus=0, max_restarts=0)
class ShardWriterActor:
    def __init__(self, url: str, options: dict, shard_sources: dict[int, int], job_info: dict):
        self.writer = ShardWriter(OutputStore(url, options), shard_sources, job_info)

    def add(self, records) -> list[int]:
        return self.writer.add(records)

    def incomplete(self) -> dict:
        return self.writer.incomplete()

    def abort(self) -> None:
        self.writer.abort()


def encode_and_write(
    batch: dict, writers: list, image_format: str, quality: int, meta_extra: dict, keep_rejected: bool
) -> dict:
    """Encode pixels to file bytes here, on CPU tasks, so writers only move bytes; route shard i to i % n."""
    by_writer: dict[int, list] = {}
    ok = failed = rejected = 0
    for raw in batch["sample"]:
        sample = Sample.from_bytes(raw)
        ok += sample.ok
        failed += sample.error is not None
        rejected += sample.error is None and sample.rejected is not None
        rec = encode_sample(sample, image_format, quality, meta_extra, keep_rejected)
        by_writer.setdefault(sample.shard % len(writers), []).append(rec)
    # Waiting for the writers is the back-pressure that keeps encoded bytes from piling up in memory.
    committed = [s for done in ray.get([writers[w].add.remote(r) for w, r in by_writer.items()]) for s in done]
    return {
        "ok": np.array([ok]),
        "failed": np.array([failed]),
        "rejected": np.array([rejected]),
        "committed": np.array([len(committed)]),
    }


# ---------------------------------------------------------------- the driver


class Progress:
    """Shards and samples done, rate and ETA, logged at most every `every` seconds."""

    def __init__(self, total_shards: int, done_before: int, every: float = 5.0):
        self.total_shards = total_shards
        self.done_before = done_before
        self.committed = 0
        self.rows = {"ok": 0, "failed": 0, "rejected": 0}
        self.start = time.time()
        self.every = every
        self.last = self.start

    def update(self, row: dict) -> None:
        for k in self.rows:
            self.rows[k] += int(row[k])
        self.committed += int(row["committed"])
        now = time.time()
        if now - self.last >= self.every:
            self.last = now
            log.info(self.line())

    def line(self) -> str:
        elapsed = max(time.time() - self.start, 1e-9)
        done = self.done_before + self.committed
        remaining = self.total_shards - done
        eta = f"{elapsed / self.committed * remaining:.0f}s" if self.committed else "?"
        return (
            f"shards {done}/{self.total_shards}  samples {self.rows['ok']} (failed {self.rows['failed']}, "
            f"rejected {self.rows['rejected']})  {self.rows['ok'] / elapsed:.2f} samples/s  ETA {eta}"
        )


def _init_ray(address: str | None) -> None:
    if ray.is_initialized():
        return
    env = {k: os.environ[k] for k in ("FACTORY_MODEL_CACHE", "HF_HUB_OFFLINE") if k in os.environ}
    ray.init(address=address, runtime_env={"env_vars": env} if env else None, log_to_driver=True)


def run_job(spec: JobSpec, address: str | None = None, overwrite: bool = False) -> dict:
    """Run (or resume) a job; return its index: committed shards and totals."""
    store, plan, classes, manifest = prepare_output(spec, overwrite=overwrite)
    done = store.committed_shards()
    pending = [s for s in range(plan.num_shards) if s not in done]
    log.info(
        "job %s: %d samples in %d shards, %d already committed, %d to do -> %s",
        spec.name, plan.num_samples, plan.num_shards, len(done), len(pending), store.url,
    )
    if pending:
        store.clear_tmp()
        _run_pipeline(spec, store, plan, classes, pending, address)
        store.clear_tmp()
    return write_index(store, plan)


def _driver_stages(spec: JobSpec, classes: ClassSet):
    """The spec's stages built on the driver, without their models, for checks and model ids."""
    for st in spec.stages:
        cls = resolve_stage(st.kind)
        ctx = StageContext(label=st.label, job_seed=spec.seed, classes=classes, device="cpu")
        yield st, cls(cls.Params.model_validate(st.params), cls.Model.model_validate(st.model), ctx)


def check_stages(spec: JobSpec, classes: ClassSet) -> None:
    """Stage checks that need the source's classes, before anything is written."""
    for i, (st, stage) in enumerate(_driver_stages(spec, classes)):
        try:
            stage.check()
        except ValueError as e:
            raise SpecError(f"stages[{i}].params.{e}" if ":" in str(e) else f"stages[{i}]: {e}") from None


def stage_model_ids(spec: JobSpec, classes: ClassSet) -> dict[str, dict]:
    return {st.label: stage.model_ids() for st, stage in _driver_stages(spec, classes)}


def _run_pipeline(
    spec: JobSpec, store: OutputStore, plan: Plan, classes: ClassSet, pending: list[int], address: str | None
) -> None:
    _init_ray(address)
    nodes = sum(1 for n in ray.nodes() if n["Alive"])
    if store.is_local() and nodes > 1 and not spec.output.shared_filesystem:
        # Writers and read tasks land on any node: their files would scatter over local disks.
        raise RuntimeError(
            f"output.url {store.url} is a local path but the Ray cluster has {nodes} nodes; write to object "
            "storage (s3://...), or set output.shared_filesystem: true if every node mounts it at that path"
        )
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.execution_options.preserve_order = False

    models = stage_model_ids(spec, classes)
    job_info = {"job": spec.name, "spec_hash": spec.content_hash(), "models": models}
    options = storage_options(spec.output)
    shard_sources = {s: plan.shard_count(s) for s in pending}
    n_writers = min(spec.output.writers, len(pending))
    writers = [
        ShardWriterActor.remote(
            store.url, options, {s: n for s, n in shard_sources.items() if s % n_writers == w}, job_info
        )
        for w in range(n_writers)
    ]

    ds = ray.data.from_items([{"shard": s} for s in pending], override_num_blocks=len(pending))
    ds = ds.map_batches(
        read_shards,
        fn_kwargs={
            "source_json": spec.source.model_dump_json(),
            "plan_url": store.public_url(PLAN_FILE),
            "plan_options": options,
            "chunk": spec.engine.read_chunk,
        },
        batch_size=1,
        num_cpus=spec.engine.read_cpus,
        batch_format="numpy",
    )
    for stage in spec.stages:
        r = stage.resources
        ds = ds.map_batches(
            StageRunner,
            fn_constructor_kwargs={
                "stage_spec": stage.model_dump(mode="json"),
                "job_seed": spec.seed,
                "classes": classes,
                "stop_after_failures": spec.engine.stop_after_failures,
            },
            batch_size=r.batch_size,
            num_cpus=r.num_cpus,
            num_gpus=r.num_gpus,
            concurrency=r.concurrency,
            batch_format="numpy",
        )
    ds = ds.map_batches(
        encode_and_write,
        fn_kwargs={
            "writers": writers,
            "image_format": spec.output.image_format,
            "quality": spec.output.jpeg_quality,
            "meta_extra": {"job": spec.name, "spec_hash": spec.content_hash(), "models": models},
            "keep_rejected": spec.output.keep_rejected,
        },
        batch_size=spec.engine.encode_batch_size,
        num_cpus=spec.engine.encode_cpus,
        batch_format="numpy",
    )

    progress = Progress(plan.num_shards, plan.num_shards - len(pending))
    try:
        for row in ds.iter_rows():
            progress.update(row)
        incomplete = {}
        for w in writers:
            incomplete.update(ray.get(w.incomplete.remote()))
        if incomplete:
            raise RuntimeError(f"the pipeline drained with shards still incomplete: {incomplete}")
    except BaseException:
        for w in writers:
            try:
                ray.get(w.abort.remote())
            except Exception:  # the writer may be what died; its shards stay uncommitted either way
                pass
        raise
    finally:
        for w in writers:
            ray.kill(w)
    log.info(progress.line())


def write_index(store: OutputStore, plan: Plan) -> dict:
    stats = dict(store.iter_stats())
    index = {
        "num_shards": plan.num_shards,
        "complete": len(stats) == plan.num_shards,
        "samples": sum(s["samples"] for s in stats.values()),
        "failed": sum(s["failed"] for s in stats.values()),
        "rejected": sum(s["rejected"] for s in stats.values()),
        "shards": [{"url": s["url"], "samples": s["samples"]} for _, s in sorted(stats.items())],
    }
    store.write_json(index, "index.json")
    return index
