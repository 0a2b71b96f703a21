"""The stage runner: one worker of a stage, running whole shards through it in fixed batches.

It builds the stage and loads its models once (`setup`), then takes one shard at a time and calls
`process` on consecutive batches of `resources.batch_size` live samples, in shard order: what shares a
batch depends only on the shard's contents, never on scheduling, so a regenerated shard is the same.

Failures by kind (factory/engine/errors.py): a `BadSample` raised by a batch is traced to its sample, which
fails alone; CUDA out-of-memory splits the batch in halves and tries again; any other exception is
retried with backoff, and if it persists the shard is marked failed and passes on untouched.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import time
from dataclasses import dataclass, replace

import numpy as np

from factory.engine import metrics
from factory.engine.errors import ShardFailed, StageSetupFailed, is_cuda_oom, one_line
from factory.engine.records import Failure, ShardWork, StepStats
from factory.engine.spec import StageSpec
from factory.engine.watch import whereabouts
from factory.models.weights import WeightsPin, loading_pinned
from factory.sample import BadSample, Sample
from factory.sources.classes import ClassSet
from factory.stages import StageContext, resolve_stage

log = logging.getLogger("factory")


# Names a custom Ray resource that stands in for GPUs, for tests of several nodes on a machine without
# one (tests/support/several_nodes.py). Read from the environment, never a spec: no job can ask to run its
# GPU stages on CPUs. Where it is named, a node's GPUs are its units of that resource, in the cluster checks
# (checks.py) and in what the stages ask Ray for (executors/base.py).
GPU_STAND_IN_ENV = "FACTORY_TEST_GPU_RESOURCE"


def gpu_stand_in() -> str | None:
    return os.environ.get(GPU_STAND_IN_ENV) or None


def stage_device(spec: StageSpec, gpu_stand_in: str | None = None) -> str:
    """ "cuda" for a stage given GPUs, which then must see one: a GPU stage never falls back to the CPU,
    but where the job names a stand-in resource for GPUs (tests of several nodes on one machine)."""
    if spec.resources.num_gpus <= 0:
        return "cpu"
    if gpu_stand_in:
        log.warning("stage %s runs on the CPU: the job stands %r in for GPUs", spec.label, gpu_stand_in)
        return "cpu"
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError(
            f"stage {spec.label!r} asks for resources.num_gpus={spec.resources.num_gpus} but this worker sees no "
            "CUDA device; run it on a GPU node, or set num_gpus: 0 to run it on CPU"
        )
    return "cuda"


def reset_peak_rss() -> None:
    """Start this process's peak resident set over (Linux: clear_refs 5 resets VmHWM). Where /proc lacks the
    file or refuses the write (other kernels, sandboxes such as gVisor), the peak stays the process's own
    since it started, which `peak_private_mib` then reports: a figure too high, never a failed shard."""
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_private_mib() -> float | None:
    """This process's peak resident set since `reset_peak_rss` (VmHWM) less the shared pages resident now
    (libraries, and the object-store blocks it maps: its input row), in MiB: about the peak of its own
    memory, what its declared `memory` is for. None where /proc does not say."""
    try:
        with open("/proc/self/status") as f:
            fields = (line.partition(":") for line in f)
            kib = {k: int(v.split()[0]) for k, _, v in fields if k in ("VmHWM", "RssFile", "RssShmem")}
        return round((kib["VmHWM"] - kib["RssFile"] - kib["RssShmem"]) / 1024, 1)
    except (OSError, KeyError, ValueError, IndexError):
        return None


@dataclass
class RetryTally:
    """What the failure policy cost on one shard: counted while its batches run, then put in its StepStats."""

    retries: int = 0
    oom_splits: int = 0


class StageRunner:
    def __init__(
        self,
        stage_spec: dict,
        job_seed: int,
        classes: ClassSet,
        retries: int = 3,
        backoff: float = 2.0,
        progress=None,
        gpu_stand_in: str | None = None,
        job_name: str = "",
        pins: dict[str, tuple[WeightsPin, ...]] | None = None,
    ):
        spec = StageSpec.model_validate(stage_spec)
        self.job_name = job_name  # tags its metrics
        self.label = spec.label
        self.batch_size = spec.resources.batch_size
        self.retries = retries
        self.backoff = backoff
        self.progress = progress  # the job's StageRows actor, or None
        started = time.time()
        try:
            cls = resolve_stage(spec.kind)
            self.stage = cls(
                cls.Params.model_validate(spec.params),
                cls.Model.model_validate(spec.model),
                StageContext(
                    label=spec.label, job_seed=job_seed, classes=classes, device=stage_device(spec, gpu_stand_in)
                ),
            )
            # Models load under the job's pins: other weights than the job planned with fail the set-up.
            with loading_pinned((pins or {}).get(spec.label, ())):
                self.stage.setup()
        except Exception as e:
            # Named here, where the node and the stage are known: under Ray the driver would otherwise see
            # only that an actor died.
            raise StageSetupFailed(spec.label, whereabouts(), one_line(e)) from e
        self.k = self.stage.variants_per_input()
        # Set-up (model loading) happens once per actor: reported with the first shard it processes.
        self.setup_s: float | None = round(time.time() - started, 3)
        log.info("stage %s ready in %.1fs (models loaded once per worker)", self.label, self.setup_s)

    def run(self, work: ShardWork) -> ShardWork:
        """Every live sample of the shard through the stage; failed and rejected ones pass untouched."""
        if work.failure is not None:
            return work
        started = time.time()
        reset_peak_rss()
        tally = RetryTally()
        batches = 0
        live = [i for i, s in enumerate(work.samples) if s.ok]
        produced: dict[int, list[Sample]] = {}
        try:
            for start in range(0, len(live), self.batch_size):
                positions = live[start : start + self.batch_size]
                batch_started = time.time()
                rows = self.process_batch([work.samples[i] for i in positions], tally)
                metrics.stage_batch(self.job_name, self.label, time.time() - batch_started, rows)
                for n, i in enumerate(positions):
                    produced[i] = rows[n * self.k : (n + 1) * self.k]
                batches += 1
                if self.progress is not None:  # rows out: those the stage kept (not failed, not rejected)
                    self.progress.stage_rows.remote(self.label, len(positions), sum(r.ok for r in rows))
        except ShardFailed as e:
            log.error("shard %d failed at stage %s: %s", work.shard, self.label, one_line(e.cause))
            work.failure = Failure.of(self.label, e.cause)
            return work
        work.samples = [row for i, s in enumerate(work.samples) for row in produced.get(i, (s,))]
        work.stages[self.label] = StepStats(
            rows_out=sum(len(rows) for rows in produced.values()),
            seconds=round(time.time() - started, 3),
            rows_in=len(live),
            batches=batches,
            retries=tally.retries,
            oom_splits=tally.oom_splits,
            worker_setup_s=self.setup_s,
            peak_private_mib=peak_private_mib(),
        )
        self.setup_s = None
        return work

    def process_batch(self, inputs: list[Sample], tally: RetryTally) -> list[Sample]:
        """`process` one batch under the failure policy; returns `k` rows per input, in order."""
        for attempt in range(self.retries + 1):
            try:
                # Fresh copies each try: a failed call may have filled or marked some of its inputs.
                produced = self.stage.process([replace(s, meta=copy.deepcopy(s.meta)) for s in inputs])
                self._check_contract(inputs, produced)
                return [self._check_output(s) for s in produced]
            except BadSample as e:
                if len(inputs) > 1:  # find the sample the data problem belongs to
                    return [row for s in inputs for row in self.process_batch([s], tally)]
                return [v.fail(self.label, e.reason, e.detail) for v in inputs[0].expand(self.k)]
            except Exception as e:
                if is_cuda_oom(e) and len(inputs) > 1:
                    import torch

                    torch.cuda.empty_cache()
                    tally.oom_splits += 1
                    half = len(inputs) // 2
                    log.warning(
                        "stage %s: CUDA out of memory on %d samples; splitting the batch", self.label, len(inputs)
                    )
                    return self.process_batch(inputs[:half], tally) + self.process_batch(inputs[half:], tally)
                if attempt == self.retries:
                    raise ShardFailed(self.label, e) from e
                tally.retries += 1
                delay = self.backoff * 2**attempt
                log.warning(
                    "stage %s failed on a batch of %d (%s); retry %d of %d in %.1fs",
                    self.label,
                    len(inputs),
                    one_line(e),
                    attempt + 1,
                    self.retries,
                    delay,
                )
                time.sleep(delay)
        raise AssertionError("unreachable")

    def _check_output(self, s: Sample) -> Sample:
        """A sample the writer could not encode fails here, with a reason: it is bad data, not a crash."""
        if not s.ok:
            return s
        image, mask = s.image, s.mask
        problem = None
        if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3):
            problem = (
                f"image must be an (H, W, 3) uint8 array, got {getattr(image, 'dtype', type(image))} "
                f"{getattr(image, 'shape', '')}"
            )
        elif mask is not None and (mask.shape != image.shape[:2] or mask.dtype not in (np.uint8, np.uint16)):
            problem = (
                f"mask must be (H, W) uint8/uint16 matching the image {image.shape[:2]}, got {mask.dtype} {mask.shape}"
            )
        elif s.instances is not None and (
            s.instances.shape != image.shape[:2]
            or s.instances.dtype.kind not in "ui"
            or (s.instances.size and int(s.instances.max()) > np.iinfo(np.uint16).max)
        ):
            problem = (
                f"instances must be (H, W) integer ids below 65536 matching the image (stored as uint16), "
                f"got {s.instances.dtype} {s.instances.shape}"
            )
        return s.fail(self.label, "bad_output", problem) if problem else s

    def _check_contract(self, inputs: list[Sample], produced: list[Sample]) -> None:
        """k rows per input, in order, each with the key `expand` gives it: a stage never drops a sample."""
        if len(produced) != len(inputs) * self.k:
            raise RuntimeError(
                f"stage {self.label!r} returned {len(produced)} samples for {len(inputs)} inputs; it declares "
                f"{self.k} per input (a stage must never drop a sample: mark it failed or rejected instead)"
            )
        for n, src in enumerate(inputs):
            expected = [(src.shard, src.index, v.variant) for v in src.expand(self.k)]
            got = [(s.shard, s.index, s.variant) for s in produced[n * self.k : (n + 1) * self.k]]
            if got != expected:
                raise RuntimeError(
                    f"stage {self.label!r} returned rows {got} for input {src.key}; expected {expected} "
                    "(build variants with sample.expand(k), in input order)"
                )
