"""Where a training run keeps its state: checkpoints and the final model folder, on any fsspec filesystem.

    train.json                   kind, spec and spec hash: a rerun with another spec is refused
    checkpoints/step-000500/     a model folder plus optimizer.pt and state.json
    final/                       the model folder the generation stages load (`weights:`)

A folder is usable once its `_COMPLETE` marker exists: it is uploaded last, so a run killed mid-upload
leaves a folder the next run ignores (and deletes).
"""

from __future__ import annotations

from factory.storage import Folder

COMPLETE = "_COMPLETE"
RECORD = "train.json"
CHECKPOINTS = "checkpoints"
FINAL = "final"


def step_dir(step: int) -> str:
    return f"step-{step:06d}"


class TrainingStore(Folder):
    """A training run's output folder, by the layout above."""

    def complete(self, *parts: str) -> bool:
        return self.exists(*parts, COMPLETE)

    def checkpoint_steps(self) -> dict[int, bool]:
        """step -> whether that checkpoint is complete."""
        self.fs.invalidate_cache()
        try:
            names = [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.path(CHECKPOINTS), detail=False)]
        except FileNotFoundError:
            return {}
        steps = [int(n[len("step-") :]) for n in names if n.startswith("step-") and n[len("step-") :].isdigit()]
        return {s: self.complete(CHECKPOINTS, step_dir(s)) for s in steps}

    def latest(self) -> int | None:
        done = [s for s, ok in self.checkpoint_steps().items() if ok]
        return max(done) if done else None

    def prune(self, newest: int, keep: int) -> None:
        """Delete all but the `keep` newest complete checkpoints, and any incomplete one before `newest`."""
        steps = self.checkpoint_steps()
        complete = sorted(s for s, ok in steps.items() if ok)
        doomed = complete[:-keep] + [s for s, ok in steps.items() if not ok and s < newest]
        for s in doomed:
            try:
                self.fs.rm(self.path(CHECKPOINTS, step_dir(s)), recursive=True)
            except FileNotFoundError:  # an object store may list a folder whose files are already gone
                pass
