"""The job's weights: pinned when the job is planned, recorded in its manifest, held to on every resume.

A spec names models by hub id, local path or URL, which can come to hold other weights from one day to
the next while the spec, and so its hash, stays the same. `pin_job` resolves each model every stage loads
to the exact weights it names (factory/models/weights.py). When the output already has a manifest, a hub
model keeps the commit recorded there (a branch moves on, the job does not), and a local path or URL
whose files differ from the recorded ones refuses the resume, naming the stage, the model and the file,
like a changed spec. Workers then load under these pins and check them (runner.py).
"""

from __future__ import annotations

from collections.abc import Iterable

from factory.engine.errors import ResumeError
from factory.models.weights import WeightsPin, is_hub_id, pin, plain_ref
from factory.schema import SpecError
from factory.stages import Stage

JobPins = dict[str, dict[str, WeightsPin]]  # stage label -> model name (as in its model_ids) -> pin


def pin_job(stages: Iterable[tuple[str, Stage]], recorded: dict | None, output: str) -> JobPins:
    """The pins of every stage's real-weight models; `recorded`: the manifest's, when the job resumes."""
    pins: JobPins = {}
    for i, (label, stage) in enumerate(stages):
        try:
            sources = stage.weight_sources()
        except ValueError as e:
            raise SpecError(f"stages[{i}].model.{e}") from None
        for name, source in sources.items():
            known = (recorded or {}).get(label, {}).get(name)
            was = WeightsPin.from_json(known) if known is not None else None
            if was is not None and was.ref == source.ref and is_hub_id(plain_ref(source.ref)):
                now = was
            else:
                try:
                    now = pin(source)
                except FileNotFoundError as e:
                    raise SpecError(f"stages[{i}] ({label}), model {name}: {e}") from None
            if was is not None and was.digest != now.digest:
                raise ResumeError(
                    f"{output} was planned with other weights for model {name} of stage {label} ({source.ref}): "
                    f"{was.difference(now)}. Restore those weights to resume the job, pass --output URL to run "
                    f"this spec elsewhere, or --overwrite to delete {output} and start over."
                )
            pins.setdefault(label, {})[name] = now
    return pins


def pins_to_json(pins: JobPins) -> dict:
    """The manifest's `weights`: every file of every model, which a resume and the workers check."""
    return {label: {name: p.to_json() for name, p in models.items()} for label, models in pins.items()}


def pins_record(pins: JobPins) -> dict:
    """What every shard's stats and every sample's json carry (`WeightsPin.record`)."""
    return {label: {name: p.record() for name, p in models.items()} for label, models in pins.items()}
