"""The one place that picks the executor of a job."""

from __future__ import annotations

from factory.engine.executors.base import Executor
from factory.engine.executors.in_process import InProcessExecutor
from factory.engine.executors.ray_data import RayDataExecutor
from factory.engine.executors.ray_tasks import RayTasksExecutor
from factory.engine.spec import JobSpec

EXECUTORS: dict[str, type[Executor]] = {c.name: c for c in (RayDataExecutor, RayTasksExecutor, InProcessExecutor)}


def executor_class(spec: JobSpec) -> type[Executor]:
    """The executor of a job: `engine.executor`, or by default Ray Data for stages (actor pools that load
    their models once) and plain Ray tasks for a job without stages (nothing to pipeline)."""
    name: str = spec.engine.executor
    if name == "auto":
        name = RayDataExecutor.name if spec.stages else RayTasksExecutor.name
    return EXECUTORS[name]
