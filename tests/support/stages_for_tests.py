"""Stages that exist only for tests, loaded by the engine as `module:Class` like any user plug-in.

Two environment variables (never part of a spec, so they change no spec hash and no output byte) let the
fault tests steer `InvertStage` from outside the job:
    FACTORY_TEST_PIDS=DIR    each stage worker creates DIR/stage-PID when it is set up (the process to kill)
    FACTORY_TEST_GATE=FILE   while FILE exists, every shard but shard 0 waits before its first batch
    FACTORY_TEST_NODES=DIR   each batch writes DIR/<Ray node id>.<shard> (where the work ran), holding the
                             worker's FACTORY_MODEL_CACHE
"""

from __future__ import annotations

import ctypes
import os
import time
from pathlib import Path

import numpy as np

from factory.models.loading import ModelConfig, from_pretrained, resolve_model_path
from factory.sample import BadSample
from factory.schema import StrictModel
from factory.sources.classes import ade150_palette
from factory.stages import Stage


def record_pid(role: str) -> None:
    """Create FACTORY_TEST_PIDS/<role>-<pid>, when the variable is set."""
    folder = os.environ.get("FACTORY_TEST_PIDS")
    if folder:
        Path(folder, f"{role}-{os.getpid()}").touch()


def record_node(samples) -> None:
    """Write FACTORY_TEST_NODES/<node id>.<shard>, when the variable is set."""
    folder = os.environ.get("FACTORY_TEST_NODES")
    if folder and samples:
        import ray

        # Holds the model cache the worker sees: each node's own, from the environment it was started with.
        mark = Path(folder, f"{ray.get_runtime_context().get_node_id()}.{samples[0].shard}")
        mark.write_text(os.environ.get("FACTORY_MODEL_CACHE", ""))


class InvertParams(StrictModel):
    variants: int = 1
    bad_ids: list[str] = []  # raise BadSample: a data problem the engine pins on the sample
    reject_ids: list[str] = []
    reject_variants: list[str] = []  # reject only the variants with these paths
    sleep: float = 0.0
    sleep_ids: list[str] = []  # sleep `sleep` seconds on these ids only (else on every sample)
    crash_ids: list[str] = []  # the worker process exits on these, every time, and says nothing (os._exit)
    segfault_ids: list[str] = []  # the worker process dies of a segmentation fault on these (a poison sample)
    hang_ids: list[str] = []  # the call hangs on these (a model call that never returns)
    oom_over: int = 0  # a batch of more samples raises CUDA's out-of-memory error (a GPU too small for it)
    setup_error: str = ""  # set up fails with this RuntimeError (a model that cannot load, no CUDA device)


class InvertStage(Stage):
    """Inverts the image, `variants` times per input; data problems and rejections on chosen ids."""

    name = "test-invert"
    Params = InvertParams
    uses_gpu = True  # may be given a GPU: the several-node tests pin it to nodes with a stand-in for one

    def setup(self) -> None:
        record_pid("stage")
        if self.params.setup_error:
            raise RuntimeError(self.params.setup_error)

    def variants_per_input(self) -> int:
        return self.params.variants

    def model_ids(self) -> dict[str, str]:
        return {"invert": "none"}

    def process(self, samples):
        record_node(samples)
        gate = os.environ.get("FACTORY_TEST_GATE")
        while gate and samples and samples[0].shard > 0 and os.path.exists(gate):
            time.sleep(0.05)
        if self.params.oom_over and len(samples) > self.params.oom_over:
            import torch

            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        out = []
        for s in samples:
            if s.source_id in self.params.crash_ids:
                os._exit(139)
            if s.source_id in self.params.segfault_ids:
                ctypes.string_at(0)  # reads address 0: SIGSEGV, as a crash in a decoder or a CUDA library
            while s.source_id in self.params.hang_ids:
                time.sleep(1)
            if not self.params.sleep_ids or s.source_id in self.params.sleep_ids:
                time.sleep(self.params.sleep)
            if s.source_id in self.params.bad_ids:
                raise BadSample("uninvertible", f"cannot invert {s.source_id}")
            for v in s.expand(self.params.variants):
                v.image = 255 - v.image
                v.meta["seed"] = v.seed(self.context.job_seed)
                if s.source_id in self.params.reject_ids or v.variant in self.params.reject_variants:
                    v.reject(self.context.label, "too_dark", "test rejection")
                out.append(v)
        return out


class AlwaysFailStage(Stage):
    name = "test-always-fail"

    def process(self, samples):
        raise RuntimeError("model weights are garbage")


class FloatImageStage(Stage):
    """Returns float images, which the writer cannot encode: the engine must fail them, not the job."""

    name = "test-float-image"

    def process(self, samples):
        for s in samples:
            s.image = s.image.astype("float32") / 255
        return samples


class FlakyParams(StrictModel):
    marker_dir: str
    failures: int = 1


class FlakyStage(Stage):
    """Raises a transient error on its first `failures` calls, counted across processes in `marker_dir`."""

    name = "test-flaky"
    Params = FlakyParams

    def process(self, samples):
        for n in range(self.params.failures):
            try:
                fd = os.open(Path(self.params.marker_dir) / f"failure-{n}", os.O_CREAT | os.O_EXCL)
            except FileExistsError:
                continue
            os.close(fd)
            raise ConnectionError("the model server went away for a moment")
        return samples


class OomOverTwoStage(Stage):
    """Runs out of (pretend) GPU memory on batches of more than two samples."""

    name = "test-oom"

    def process(self, samples):
        import torch

        if len(samples) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return [s.expand(1)[0] for s in samples]


class PaletteLabelerParams(StrictModel):
    fail_ids: list[str] = []  # refused as bad data (BadSample)
    broken: bool = False  # every call fails like a broken model or device would (RuntimeError)


class PaletteLabeler(Stage):
    """Nearest ADE150 palette colour per pixel; refuses `fail_ids`, and every call when `broken`."""

    name = "test-palette-labeler"
    Params = PaletteLabelerParams

    def model_ids(self):
        return {"labeler": "palette"}

    def process(self, samples):
        if self.params.broken:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        palette = ade150_palette().astype(np.int32)
        for s in samples:
            if s.source_id in self.params.fail_ids:
                raise BadSample("unlabelable", f"cannot label {s.source_id}")
            d = ((s.image.astype(np.int32)[:, :, None, :] - palette[None, None]) ** 2).sum(-1)
            s.mask = d.argmin(-1).astype(np.uint8)
            s.meta["pseudo_label"] = True
        return samples


class BrightenModel(ModelConfig):
    config: str  # a model folder, file URL or hub id holding a config.json with an `offset`


class BrightenStage(Stage):
    """Adds the `offset` of a model's config.json to every pixel: a stage that loads real weights through
    the loading code every model stage uses (local path, object-store URL, hub id), for the pinning tests."""

    name = "test-brighten"
    Model = BrightenModel

    def setup(self) -> None:
        from transformers import PretrainedConfig

        path = resolve_model_path(self.model.config, self.model.storage_options)
        self.offset = int(from_pretrained(PretrainedConfig, self.model.config, path).offset)

    def model_ids(self) -> dict[str, str]:
        return {"config": self.model.config}

    def process(self, samples):
        for s in samples:
            s.image = np.clip(s.image.astype(np.int16) + self.offset, 0, 255).astype(np.uint8)
            s.meta["offset"] = self.offset
        return samples
