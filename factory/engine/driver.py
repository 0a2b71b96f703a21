"""The engine's driver: a validated job spec becomes committed shards, or a clear reason why not.

    checks -> lease -> plan (or the stored plan) -> pending shards -> executor (factory/engine/executors) -> index

Everything that can refuse the job (a bad spec, another job in the output, resources the cluster cannot
give, a shard too large to hold) does so before anything is planned or written. The driver then holds
only shard numbers: sample ids stay in the plan files, pixels in the pipeline's rows, stats in the
output. Shards that fail after their retries stay uncommitted; the job ends with `JobIncomplete`, naming
them, and the same command retries them.
"""

from __future__ import annotations

import json
import logging
import math
import time
from contextlib import closing

from factory import __version__
from factory.engine import metrics
from factory.engine.errors import JobIncomplete, ResumeError
from factory.engine.executors.base import Executor, ShardJob
from factory.engine.executors.choice import executor_class
from factory.engine.lease import Lease
from factory.engine.pinning import JobPins, pin_job, pins_record, pins_to_json
from factory.engine.progress import Progress, counter_snapshot, start_counter
from factory.engine.reader import ShardReader
from factory.engine.records import JobInfo, ShardResult
from factory.engine.runner import gpu_stand_in
from factory.engine.shard_plan import Plan, plan_shards
from factory.engine.spec import JobSpec, redacted_spec, require_stage_extras
from factory.engine.watch import Watch
from factory.engine.writer import ShardWriter, WriteSettings
from factory.output.layout import LEASE_FILE, PLAN_DIR, OutputStore
from factory.schema import SpecError
from factory.sources import open_source
from factory.sources.base import Source
from factory.sources.classes import ClassSet
from factory.stages import StageContext, resolve_stage

log = logging.getLogger("factory")

MANIFEST = "manifest.json"


def _driver_stages(spec: JobSpec, classes: ClassSet):
    """The spec's stages built on the driver, without their models, for checks and model ids."""
    for st in spec.stages:
        cls = resolve_stage(st.kind)
        ctx = StageContext(label=st.label, job_seed=spec.seed, classes=classes, device="cpu")
        yield st, cls(cls.Params.model_validate(st.params), cls.Model.model_validate(st.model), ctx)


def check_stages(spec: JobSpec, classes: ClassSet) -> None:
    """Stage checks that need the source's classes, before anything is written."""
    for i, (_, stage) in enumerate(_driver_stages(spec, classes)):
        try:
            stage.check()
        except ValueError as e:
            raise SpecError(f"stages[{i}].params.{e}" if ":" in str(e) else f"stages[{i}]: {e}") from None


def rows_per_source(spec: JobSpec, classes: ClassSet) -> int:
    """Rows a source sample becomes through all the stages (0 without stages)."""
    if not spec.stages:
        return 0
    return math.prod(stage.variants_per_input() for _, stage in _driver_stages(spec, classes))


def _check_resume(store: OutputStore, spec: JobSpec) -> dict | None:
    manifest = store.read_json(MANIFEST)
    if manifest is not None and manifest["spec_hash"] != spec.content_hash():
        raise ResumeError(
            f"{store.url} already holds job {manifest['name']!r} with spec hash {manifest['spec_hash']}; "
            f"this spec hashes to {spec.content_hash()}. Rerun the original spec to resume it, pass "
            f"--output URL to run this spec elsewhere, or --overwrite to delete {store.url} and start over."
        )
    return manifest


def _plan(spec: JobSpec, store: OutputStore, source: Source, pins: JobPins) -> dict:
    """Stream the listing into plan parts, then write the manifest last: a job without one is planned again."""
    store.fs.makedirs(store.path(PLAN_DIR), exist_ok=True)
    plan = plan_shards(
        source.list_ids(), spec.output.shard_size, lambda name: store.fs.open(store.path(PLAN_DIR, name), "wb")
    )
    manifest = {
        "name": spec.name,
        "spec": redacted_spec(spec),
        "spec_hash": spec.content_hash(),
        "plan": plan.summary(),
        "weights": pins_to_json(pins),
        "classes": list(source.classes.names),
        "ignore_index": source.classes.ignore_index,
        "factory_version": __version__,
        "created": time.time(),
    }
    store.write_json(manifest, MANIFEST)
    return manifest


def run_job(spec: JobSpec, address: str | None = None, overwrite: bool = False) -> dict:
    """Run (or resume) a job; return its index (committed shards and totals), or raise JobIncomplete."""
    require_stage_extras(spec)
    store = OutputStore.at(spec.output)
    store.check_writable()  # before Ray starts: a path no rerun can use is told in a moment
    source = open_source(spec.source)
    check_stages(spec, source.classes)
    pins = _pin_weights(spec, store, source.classes, None if overwrite else _check_resume(store, spec))
    executor = executor_class(spec)
    row_bytes = _check_cluster(spec, store, source, address) if executor.uses_ray else 0
    lease = Lease(store, spec.engine.lease_ttl_s)
    lease.acquire()
    try:
        if overwrite:
            with lease.renewals_held():  # `_tmp/`, which the renewals write through, goes too
                store.remove_all(keep={LEASE_FILE})
        manifest = _check_resume(store, spec) or _plan(spec, store, source, pins)
        plan = Plan(num_samples=manifest["plan"]["num_samples"], shard_size=manifest["plan"]["shard_size"])
        done = set(store.committed_shards())
        pending = [s for s in range(plan.num_shards) if s not in done]
        log.info(
            "job %s: %d samples in %d shards, %d already committed, %d to do -> %s",
            spec.name,
            plan.num_samples,
            plan.num_shards,
            len(done),
            len(pending),
            store.url,
        )
        failed: list[ShardResult] = []
        if pending:
            with lease.renewals_held():
                store.clear_tmp()
            failed = _run_pipeline(spec, store, source.classes, plan, pending, lease, executor, row_bytes, pins)
            with lease.renewals_held():
                store.clear_tmp()
        index = write_index(store, plan)
    finally:
        lease.release()
    if failed:
        raise JobIncomplete(_failure_message(failed, len(pending)))
    return index


def _pin_weights(spec: JobSpec, store: OutputStore, classes: ClassSet, manifest: dict | None) -> JobPins:
    """The weights every stage loads, pinned now or, on a resume, checked against the manifest's."""
    recorded = manifest.get("weights") if manifest is not None else None
    if manifest is not None and recorded is None:
        log.warning("%s was planned before weights were pinned: this run's weights are not compared", store.url)
    return pin_job(((st.label, stage) for st, stage in _driver_stages(spec, classes)), recorded, store.url)


def _check_cluster(spec: JobSpec, store: OutputStore, source: Source, address: str | None) -> int:
    """Connect to Ray and refuse what this cluster cannot run; returns the expected bytes of a shard row.
    The output's check comes after the wait for resources: an autoscaling cluster may have grown past one
    node by then."""
    from factory.engine.checks import check_resources, check_shard_size, check_shared_output
    from factory.engine.ray_session import init_ray

    init_ray(address)
    check_resources(spec)
    check_shared_output(spec, store)
    return check_shard_size(spec, source, rows_per_source(spec, source.classes))


def shard_job(
    spec: JobSpec,
    store: OutputStore,
    classes: ClassSet,
    job: JobInfo,
    executor_cls: type[Executor],
    progress=None,
    pins: JobPins | None = None,
) -> ShardJob:
    """What every worker of this job needs, from the spec: the reader, the writer, the stages, the watch."""
    engine, options = spec.engine, spec.output.options()
    settings = WriteSettings(
        image_format=spec.output.image_format,
        quality=spec.output.jpeg_quality,
        keep_rejected=spec.output.keep_rejected,
        max_failure_fraction=spec.output.max_failure_fraction,
        retries=engine.retries,
        backoff=engine.retry_backoff_s,
    )
    return ShardJob(
        reader=ShardReader(
            spec.source.model_dump_json(), store.public_url(PLAN_DIR), options, engine.retries, engine.retry_backoff_s
        ),
        writer=ShardWriter(store.url, options, settings, job),
        stages=tuple(st.model_dump(mode="json") for st in spec.stages),
        job_seed=spec.seed,
        classes=classes,
        retries=engine.retries,
        backoff=engine.retry_backoff_s,
        shard_size=spec.output.shard_size,
        watch=Watch(store.url, options, engine.shard_timeout_s, end_process=executor_cls.uses_ray),
        progress=progress,
        gpu_stand_in=gpu_stand_in(),
        name=spec.name,
        pins={label: tuple(models.values()) for label, models in (pins or {}).items()},
    )


def _failure_message(failed: list[ShardResult], attempted: int, causes: int = 3) -> str:
    """One line: each distinct failure (stage, cause, advice) with its shards, the first `causes` of them."""
    by_cause: dict[tuple[str, str, str], list[int]] = {}
    for result in failed:
        why = result.why
        by_cause.setdefault((why.stage, why.cause, why.advice), []).append(result.shard)
    told = []
    for (stage, cause, advice), shards in list(by_cause.items())[:causes]:
        named = ", ".join(map(str, shards[:5])) + (" ..." if len(shards) > 5 else "")
        told.append(f"shard{'s' if len(shards) > 1 else ''} {named} at stage {stage}: {cause}; {advice}")
    more = len(by_cause) - causes
    return (
        f"{len(failed)} of {attempted} shards failed and stay uncommitted: "
        + " | ".join(told)
        + (f" | and {more} other causes (the log has each)" if more > 0 else "")
    )


def _run_pipeline(
    spec: JobSpec,
    store: OutputStore,
    classes: ClassSet,
    plan: Plan,
    pending: list[int],
    lease: Lease,
    executor_cls: type[Executor],
    row_bytes: int,
    pins: JobPins,
) -> list[ShardResult]:
    """Run the pending shards on the job's executor; returns the shards that failed. `row_bytes`: what a
    shard row is expected to hold (0: not measured), which its workers declare their memory from."""
    models = {st.label: stage.model_ids() for st, stage in _driver_stages(spec, classes)}
    job = JobInfo(job=spec.name, spec_hash=spec.content_hash(), models=models, weights=pins_record(pins))
    # Only stage runners report rows to the counter; a zero-stage job spares its worker process.
    counter = start_counter() if spec.stages and executor_cls.uses_ray else None
    labels, to_do = [s.label for s in spec.stages], sum(plan.shard_count(shard) for shard in pending)
    progress = Progress(
        plan.num_shards,
        plan.num_shards - len(pending),
        labels,
        sources_to_do=to_do,
        snapshot=counter_snapshot(counter) if counter is not None else None,
        every=spec.engine.progress_s,
        on_rows=lambda rows: metrics.rows_waiting(spec.name, labels, rows, to_do),
    )
    work = shard_job(spec, store, classes, job, executor_cls, counter, pins)
    executor = executor_cls(spec, work, store, row_bytes)
    failed: list[ShardResult] = []
    progress.start()
    # Closed on any exit: what is still queued or running is cancelled, not left to the garbage collector.
    try:
        with closing(executor.run(pending)) as results:
            for result in results:
                progress.shard_done(result)
                lease.check()
                if not result.committed:
                    failed.append(result)
                    log.error("shard %d failed at stage %s: %s", result.shard, result.why.stage, result.why.cause)
                    if len(failed) >= spec.engine.max_failed_shards:
                        log.error("stopping: %d shards failed (engine.max_failed_shards)", len(failed))
                        break
    finally:
        progress.stop()
        if counter is not None:
            import ray

            ray.kill(counter)
    return failed


def write_index(store: OutputStore, plan: Plan) -> dict:
    """index.json: every committed shard and the totals, streamed from the stats; returns the totals."""
    totals = {"samples": 0, "failed": 0, "rejected": 0}
    shards = 0
    with store.open_atomic("index.json") as f:
        f.write(b'{"shards": [')
        for _, stats in store.iter_stats():
            entry = json.dumps({"url": stats["url"], "samples": stats["samples"]})
            f.write(f"{',' if shards else ''}\n  {entry}".encode())
            for k in totals:
                totals[k] += stats[k]
            shards += 1
        index = {"num_shards": plan.num_shards, "committed": shards, "complete": shards == plan.num_shards, **totals}
        f.write(f"\n],\n{json.dumps(index, sort_keys=True)[1:]}".encode())
    return index
