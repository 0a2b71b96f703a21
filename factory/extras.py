"""The optional parts of the install (pyproject.toml's extras) and the one line that names a missing one.

The core reads and mixes outputs; the engine, the model stages, training and reports each come with an
extra. A command or stage says which extra it needs (`require`) before it does any work; the extras'
contents are read from the installed package's metadata, so pyproject.toml stays the one place they are
written. A module that is missing anyway (`ModuleNotFoundError`) is traced back to its extra by name.
"""

from __future__ import annotations

import re
from functools import cache
from importlib import metadata

DISTRIBUTION = "factory"


class MissingExtra(ImportError):
    """What is missing, for the CLI's one line."""


def _dist_name(requirement: str) -> str:
    """`ray[data]>=2.40; extra == "engine"` -> `ray`."""
    match = re.match(r"[A-Za-z0-9._-]+", requirement)
    return _normal(match.group(0) if match else requirement)


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _extras_of(dist: str) -> dict[str, list[str]]:
    """A distribution's extras and their requirements, from its installed metadata."""
    try:
        requires = metadata.requires(dist) or []
    except metadata.PackageNotFoundError:
        return {}
    found: dict[str, list[str]] = {}
    for line in requires:
        requirement, _, marker = line.partition(";")
        # Only requirements whose one condition is the extra: the rest depend on the platform (not checked).
        extra = re.fullmatch(r"""\s*extra\s*==\s*["']([^"']+)["']\s*""", marker)
        if extra:
            found.setdefault(_normal(extra.group(1)), []).append(requirement.strip())
    return found


@cache
def extras() -> dict[str, list[str]]:
    """Each of factory's extras and its requirements, as installed (empty if factory is not installed)."""
    return _extras_of(DISTRIBUTION)


def _requested_extras(requirement: str) -> list[str]:
    """`ray[data,train]>=2.40` -> ["data", "train"]."""
    inner = re.search(r"\[(.*?)\]", requirement.split(";")[0])
    return [_normal(e.strip()) for e in inner.group(1).split(",")] if inner else []


def requirements(extra: str) -> list[str]:
    """The requirements an extra brings, its references to other extras (`factory[engine]`) expanded."""
    found: list[str] = []
    for requirement in extras().get(extra, []):
        if _dist_name(requirement) == DISTRIBUTION:
            for other in _requested_extras(requirement):
                found += [r for r in requirements(other) if r not in found]
        elif requirement not in found:
            found.append(requirement)
    return found


def distributions(extra: str) -> list[str]:
    """The distributions an extra brings."""
    return list(dict.fromkeys(_dist_name(r) for r in requirements(extra)))


def _installed(dist: str) -> bool:
    try:
        metadata.version(dist)
    except metadata.PackageNotFoundError:
        return False
    return True


def _missing(requirement: str) -> list[str]:
    """What of a requirement is not installed: the distribution, or what its own extras need
    (`ray[default]` needs aiohttp and more besides ray)."""
    name = _dist_name(requirement)
    if not _installed(name):
        return [name]
    own = _extras_of(name)
    return [
        f"{_dist_name(inner)} (for {name}[{e}])"
        for e in _requested_extras(requirement)
        for inner in own.get(e, [])
        if not _installed(_dist_name(inner))
    ]


def install_line(extra: str) -> str:
    return f"pip install 'factory[{extra}]'"


def require(extra: str, what: str) -> None:
    """Raise MissingExtra naming the extra if any of its distributions is not installed."""
    missing = [m for r in requirements(extra) for m in _missing(r)]
    if missing:
        raise MissingExtra(
            f"{what} needs the '{extra}' extra ({', '.join(missing)} not installed): {install_line(extra)}"
        )


def extra_for_module(module: str) -> str | None:
    """The first extra (in pyproject's order) that brings an importable module (`segment_anything` ->
    `models`), if any does."""
    wanted = _normal(module.split(".")[0])
    return next((name for name in extras() if wanted in distributions(name)), None)
