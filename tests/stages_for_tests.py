"""Stages that exist only for tests, loaded by the engine as `module:Class` like any user plug-in."""

from __future__ import annotations

import time

from pydantic import BaseModel, ConfigDict

from factory.stages import Stage


class InvertParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    variants: int = 1
    fail_ids: list[str] = []
    reject_ids: list[str] = []
    sleep: float = 0.0


class InvertStage(Stage):
    """Inverts the image, `variants` times per input, raises on `fail_ids`, and sleeps to look busy."""

    name = "test-invert"
    Params = InvertParams

    def variants_per_input(self) -> int:
        return self.params.variants

    def model_ids(self) -> dict[str, str]:
        return {"invert": "none"}

    def process(self, samples):
        time.sleep(self.params.sleep * len(samples))
        out = []
        for s in samples:
            if s.source_id in self.params.fail_ids:
                raise RuntimeError(f"cannot invert {s.source_id}")
            for v in s.expand(self.params.variants):
                v.image = 255 - v.image
                v.meta["seed"] = v.seed(self.context.job_seed)
                if s.source_id in self.params.reject_ids:
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
