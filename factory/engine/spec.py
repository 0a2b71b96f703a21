"""The job spec: a YAML file naming the source, the stages with their models, and the output.

Everything is validated before any worker starts; an error names the field (`stages[1].params.steps`)
and the reason. Stage parameters are validated by the stage's own `Params` model, so a new stage brings
its own schema without touching this file.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator

from factory.schema import SpecError, StrictModel, absolute_path, first_error, read_yaml, validated
from factory.sources.spec import SourceSpec
from factory.storage import ENV_PREFIX, Location


class ResourcesSpec(StrictModel):
    """What one worker of a stage needs; the engine maps it to Ray Data's map_batches."""

    num_cpus: float = Field(0.5, ge=0)
    num_gpus: float = Field(0, ge=0)
    batch_size: int = Field(4, gt=0)
    concurrency: int | tuple[int, int] = Field(1, description="actor pool size, or (min, max)")
    memory_gb: float = Field(
        0, ge=0, description="host memory a worker needs besides its shard rows (its model's weights), GiB"
    )

    @field_validator("concurrency")
    @classmethod
    def _positive(cls, v):
        sizes = v if isinstance(v, tuple) else (v,)
        if any(s < 1 for s in sizes) or (isinstance(v, tuple) and v[0] > v[1]):
            raise ValueError("pool size must be >= 1 (and min <= max)")
        return v

    @property
    def min_pool(self) -> int:
        """The pool's size, or its minimum size when it autoscales."""
        return self.concurrency if isinstance(self.concurrency, int) else self.concurrency[0]


class StageSpec(StrictModel):
    kind: str = Field(description="a registered stage name (factory stages) or module:Class")
    name: str | None = None
    model: dict[str, Any] = Field(default_factory=dict)
    params: dict[str, Any] = Field(default_factory=dict)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)

    @property
    def label(self) -> str:
        return self.name or self.kind


class OutputSpec(Location):
    url: str = Field(min_length=1, description="file://, a plain path, or s3://bucket/prefix")
    image_format: Literal["jpg", "png"] = "jpg"
    jpeg_quality: int = Field(95, ge=1, le=100)
    shard_size: int = Field(1000, gt=0, description="source samples per shard: the unit of work, retry and commit")
    keep_rejected: bool = Field(False, description="also write rejected samples, to rejected/shard-N.tar")
    max_failure_fraction: float = Field(
        0.5, ge=0, le=1, description="a shard whose failed rows exceed this fraction is not committed"
    )
    shared_filesystem: bool = Field(
        False, description="a local path that every Ray node mounts at the same place (NFS, Lustre...)"
    )


class EngineSpec(StrictModel):
    read_cpus: float = Field(0.5, ge=0, description="CPUs per read task (one shard: list, load, decode)")
    write_cpus: float = Field(0.5, ge=0, description="CPUs per write task (one shard: encode, tar, commit)")
    retries: int = Field(3, ge=0, description="tries again after an infrastructure failure (not a data problem)")
    retry_backoff_s: float = Field(2.0, ge=0, description="first wait before a retry; doubles each time")
    max_failed_shards: int = Field(
        3, ge=1, description="the job stops once this many shards failed after their retries (a rerun retries them)"
    )
    lease_ttl_s: float = Field(
        60.0, gt=0, description="a run's lease on the output counts as abandoned after this long without heartbeat"
    )
    resource_wait_s: float = Field(
        0.0, ge=0, description="wait this long for an autoscaling cluster to offer the resources a stage needs"
    )
    shard_timeout_s: float | None = Field(
        None,
        gt=0,
        description="a step of one shard (its read, a stage, its write) that runs longer fails as a timeout and "
        "its worker is replaced; default 600 s plus 30 s per row the step handles",
    )
    progress_s: float = Field(5.0, gt=0, description="seconds between progress updates (a line in a log)")
    executor: Literal["auto", "ray_data", "ray_tasks", "in_process"] = Field(
        "auto",
        description="how shards run: ray_data (actor pools per stage), ray_tasks (one task per shard, read to "
        "commit), in_process (no Ray, one shard at a time); auto: ray_data with stages, ray_tasks without",
    )


class JobSpec(StrictModel):
    name: str = Field(description="job name: letters, digits, - and _")
    seed: int = 0
    source: SourceSpec
    stages: list[StageSpec] = Field(default_factory=list)
    output: OutputSpec
    engine: EngineSpec = Field(default_factory=EngineSpec)

    @field_validator("name")
    @classmethod
    def _slug(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}", v):
            raise ValueError("must be 1-64 letters, digits, - or _ (it names Ray jobs and files)")
        return v

    def content_hash(self) -> str:
        """Hash of everything that decides the bytes of the shards: not where they go, not credentials, not
        pool sizes or GPUs, but each stage's batch size, which fixes what is generated together."""
        data = _without_storage_options(self.model_dump(mode="json"))
        for key in ("url", "endpoint_url", "shared_filesystem"):
            data["output"].pop(key)
        data.pop("engine")
        for stage in data["stages"]:
            stage["batch_size"] = stage.pop("resources")["batch_size"]
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


# A field that can carry a credential: a key, secret, token, password or credential by its name (as a word
# of it: `aws_secret_access_key`, `hf_token`, not `max_new_tokens`), or a URL's user:password@ part.
_SECRET = re.compile(
    r"(^|_)(key|secret|token|password|passwd|passphrase|credentials?|session_token|api_key|access_key)($|_)",
    re.IGNORECASE,
)
_USERINFO = re.compile(r"(?<=://)[^/@\s:]+:[^/@\s]+@")


def _inline_secret(key: str, value: Any) -> bool:
    """A credential written into the spec itself, not named as `env:NAME`."""
    return bool(_SECRET.search(key)) and isinstance(value, str) and bool(value) and not value.startswith(ENV_PREFIX)


def inline_credentials(data: Any, where: str = "") -> list[str]:
    """The fields of a spec (as plain data) that hold a credential inline: a secret-named field with a value
    that is not an `env:NAME` reference, or a URL with a password in it."""
    found = []
    if isinstance(data, dict):
        for k, v in data.items():
            path = f"{where}.{k}" if where else str(k)
            found += [path] if _inline_secret(str(k), v) else inline_credentials(v, path)
    elif isinstance(data, list):
        for i, v in enumerate(data):
            found += inline_credentials(v, f"{where}[{i}]")
    elif isinstance(data, str) and _USERINFO.search(data):
        found.append(where)
    return found


def _without_storage_options(data: Any) -> Any:
    """A copy without any `storage_options` section: where data is stored never changes what it is."""
    if isinstance(data, dict):
        return {k: _without_storage_options(v) for k, v in data.items() if k != "storage_options"}
    if isinstance(data, list):
        return [_without_storage_options(v) for v in data]
    return data


def _redact(data: Any) -> Any:
    """A copy with every inline credential replaced (`env:NAME` references stay: they name, not hold)."""
    if isinstance(data, dict):
        return {k: "<redacted>" if _inline_secret(str(k), v) else _redact(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_redact(v) for v in data]
    if isinstance(data, str):
        return _USERINFO.sub("<redacted>@", data)
    return data


def _validate_stage(i: int, stage: StageSpec) -> None:
    from factory.stages import resolve_stage

    where = f"stages[{i}]"
    try:
        cls = resolve_stage(stage.kind)
    except KeyError as e:
        raise SpecError(f"{where}.kind: {e.args[0]}") from None
    for field, model in (("params", cls.Params), ("model", cls.Model)):
        try:
            checked = model.model_validate(getattr(stage, field))
        except ValidationError as e:
            loc, msg = first_error(e)
            raise SpecError(f"{where}.{field}{'.' + loc if loc else ''}: {msg}") from None
        setattr(stage, field, checked.model_dump(mode="json"))
    if stage.resources.num_gpus > 0 and not cls.uses_gpu:
        raise SpecError(f"{where}.resources.num_gpus: stage {stage.kind!r} runs on CPU only")


def require_stage_extras(spec: JobSpec) -> None:
    """Before a job or a stage runs (not when a spec is validated): every stage's extra is installed, or
    one line names it, instead of an ImportError from a worker after the job started."""
    from factory.extras import require
    from factory.stages import resolve_stage

    for i, stage in enumerate(spec.stages):
        extra = resolve_stage(stage.kind).extra
        if extra is not None:
            require(extra, f"stages[{i}] ({stage.kind})")


def parse_spec(data: Any, origin: str = "spec") -> JobSpec:
    """Validate a spec given as plain data; stage params are normalised (defaults filled in)."""
    if not isinstance(data, dict):
        raise SpecError(f"{origin}: a job spec is a mapping, got {type(data).__name__}")
    spec = validated(JobSpec, data, origin)
    for i, stage in enumerate(spec.stages):
        try:
            _validate_stage(i, stage)
        except SpecError as e:
            raise SpecError(f"{origin}: {e}") from None
    labels = [s.label for s in spec.stages]
    dupes = sorted({x for x in labels if labels.count(x) > 1})
    if dupes:
        raise SpecError(f"{origin}: stages: names must be unique, repeated: {', '.join(dupes)} (set `name`)")
    return spec


def _set_field(data: Any, dotted: str, value: Any, origin: str) -> None:
    """Set `stages.0.params.steps`-style fields: names step into mappings, numbers into lists."""
    if not isinstance(data, dict):
        raise SpecError(f"{origin}: a job spec is a mapping, got {type(data).__name__}")
    node = data
    *parents, leaf = dotted.split(".")
    for depth, part in enumerate([*parents, leaf]):
        where = ".".join(dotted.split(".")[: depth + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise SpecError(f"{origin}: --set {dotted}: {where} is not an index of a list of {len(node)}")
            key = int(part)
        elif isinstance(node, dict):
            key = part
        else:
            raise SpecError(f"{origin}: --set {dotted}: {where.rsplit('.', 1)[0]} is not a mapping or list")
        if depth == len(parents):
            node[key] = value
        else:
            if isinstance(node, dict) and key not in node:
                node[key] = {}
            node = node[key]


def load_spec(path: str | Path, overrides: dict[str, Any] | None = None) -> JobSpec:
    """Read and validate a YAML job spec; `overrides` maps dotted fields (output.url) to new values."""
    data = read_yaml(path)
    for dotted, value in (overrides or {}).items():
        _set_field(data, dotted, value, str(path))
    return parse_spec(data, origin=str(path))


def with_absolute_paths(spec: JobSpec) -> JobSpec:
    """The spec with its local source and output paths made absolute against the current directory.

    `run` and `submit` both do this, so the same spec hashes the same whichever way it was started, and a
    job's driver (in a fresh directory on the head node) finds the same files.
    """
    spec.source.path = absolute_path(spec.source.path)
    spec.output.url = absolute_path(spec.output.url)
    return spec


def dump_spec(spec: JobSpec) -> dict:
    """The whole spec as plain data, credentials included: only for handing a job to the cluster."""
    return spec.model_dump(mode="json")


def redacted_spec(spec: JobSpec) -> dict:
    """The spec as plain data with credentials replaced: what may be written into files and logs."""
    return _redact(spec.model_dump(mode="json"))
