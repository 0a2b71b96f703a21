"""What every spec of the factory shares: the strict model base, errors that name the field, YAML, paths.

The job spec, the mixing loader's spec, `factory eval`'s and `factory train`'s all build on `StrictModel`
(an unknown field is an error, never ignored) and report the first problem as a `SpecError` naming
the field (`stages[1].params.steps: ...`). Local paths are made absolute before a spec leaves this
process, because workers run in other directories.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar, overload

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

M = TypeVar("M", bound=BaseModel)


class SpecError(ValueError):
    """A spec that cannot run; the message names the field and the reason."""


class StrictModel(BaseModel):
    """A spec section: unknown fields are errors, so a typo never silently means a default."""

    model_config = ConfigDict(extra="forbid")


def format_loc(loc: tuple) -> str:
    """pydantic's error location as the dotted path a user writes: `stages[1].params.steps`."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def first_error(e: ValidationError) -> tuple[str, str]:
    """(field path, message) of the first problem pydantic found."""
    err = e.errors()[0]
    return format_loc(err["loc"]), err["msg"]


def validated(model: type[M], data: Any, origin: str) -> M:
    """`model` validated from plain data; the first error as a SpecError naming the field."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        where, msg = first_error(e)
        raise SpecError(f"{origin}: {where or 'spec'}: {msg}") from None


def read_yaml(path: str | Path) -> Any:
    """A spec file's plain data, with a SpecError naming the file when it is missing or not YAML."""
    path = Path(path)
    try:
        return yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise SpecError(f"{path}: no such file") from None
    except yaml.YAMLError as e:
        raise SpecError(f"{path}: not valid YAML: {e}") from None


@overload
def absolute_path(path: str) -> str: ...
@overload
def absolute_path(path: None) -> None: ...
def absolute_path(path: str | None) -> str | None:
    """A local path made absolute against the current directory; URLs (`s3://...`) and None unchanged."""
    return path if path is None or "://" in path else str(Path(path).expanduser().resolve())
