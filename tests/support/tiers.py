"""The test tiers, and the check that a test does only what its tier allows.

    unit         no Ray, no other process: the default for a test without a tier marker
    integration  the session's shared local Ray (`ray_local`) and S3 server (`s3_server`), DataLoader
                 worker processes; no Ray or program of its own
    e2e          anything: `factory` CLI subprocesses, `ray start` clusters, the fault matrix, full-size models

`make test-fast` runs unit + integration, `make test` every tier. Unit tests run first (under `make`, in their
own pytest-xdist workers, before the tiers with Ray get two workers of their own; under plain `pytest`, first
in the one process), so no unit test ever finds a Ray that an earlier test started: a unit test that needs Ray
has to start one, and that is what the check catches. It wraps `ray.init`, `subprocess.Popen` and
multiprocessing's `Process.start` for the whole session and fails the running test when its tier does not
allow the call. The shared fixtures start their processes inside `infrastructure()`, which only an integration
or e2e test may enter.
"""

from __future__ import annotations

import multiprocessing.process
import os
import subprocess
import sys
from contextlib import contextmanager

import pytest

TIERS = ("unit", "integration", "e2e")
_current: dict = {"item": None, "infrastructure": 0}
_LIBRARY_LOOKUPS = (os.path.join("ctypes", "util.py"), os.path.join("matplotlib", "font_manager.py"))


def tier_of(item: pytest.Item) -> str:
    found = {m.name for m in item.iter_markers() if m.name in TIERS}
    if len(found) > 1:
        raise pytest.UsageError(f"{item.nodeid}: more than one tier marker: {sorted(found)}")
    return found.pop() if found else "unit"


def _violation(what: str, allowed_from: str) -> None:
    item = _current["item"]
    if item is None:
        return
    tier = tier_of(item)
    if TIERS.index(tier) < TIERS.index(allowed_from):
        pytest.fail(
            f"{item.nodeid} is a {tier} test but {what}: mark it "
            f"@pytest.mark.{allowed_from} (or use the shared fixtures; see tests/support/tiers.py)",
            pytrace=False,
        )


@contextmanager
def infrastructure(what: str):
    """The shared session fixtures start their processes here: allowed from integration tests on."""
    _violation(f"starts {what}", "integration")
    _current["infrastructure"] += 1
    try:
        yield
    finally:
        _current["infrastructure"] -= 1


def install() -> None:
    import ray

    popen_init = subprocess.Popen.__init__
    process_start = multiprocessing.process.BaseProcess.start
    ray_init = ray.init

    def checked_popen_init(self, *args, **kwargs):
        # Lookups a library makes once, in whichever test first needs them, not a test's own process:
        # ctypes.util.find_library runs `ldconfig -p` (torch's first import), and matplotlib builds its font
        # cache with `fc-list` on a machine where it never ran.
        by_lookup, frame = False, sys._getframe(1)
        for _ in range(4):  # through subprocess.run and check_output
            if frame is None or (by_lookup := frame.f_code.co_filename.endswith(_LIBRARY_LOOKUPS)):
                break
            frame = frame.f_back
        if not _current["infrastructure"] and not by_lookup:
            _violation(f"starts a subprocess ({str(args[0] if args else kwargs.get('args'))[:120]})", "e2e")
        popen_init(self, *args, **kwargs)

    def checked_process_start(self):
        if not _current["infrastructure"]:
            _violation("starts a worker process (multiprocessing)", "integration")
        return process_start(self)

    def checked_ray_init(*args, **kwargs):
        if not _current["infrastructure"] and not ray.is_initialized():
            _violation("starts a Ray of its own (use the shared `ray_local` fixture)", "e2e")
        _current["infrastructure"] += 1
        try:
            return ray_init(*args, **kwargs)
        finally:
            _current["infrastructure"] -= 1

    subprocess.Popen.__init__ = checked_popen_init
    multiprocessing.process.BaseProcess.start = checked_process_start
    ray.init = checked_ray_init


# The modules whose tests with Ray take longest (one process, 2026-12-07: the fault matrix 178 s, the
# several-raylet clusters 93 s, `factory eval`'s controls 85 s, SegGen training 78 s, submit 61 s, the
# executors 59 s), longest first. Under `make`, pytest-xdist hands whole modules to two workers in this
# order (`--dist loadfile --no-loadscope-reorder`): started first, they do not leave one worker running a
# long module alone at the end while the other has nothing left.
LONGEST_FIRST = (
    "engine/test_faults.py",
    "downstream/test_eval.py",
    "cluster/test_several_nodes.py",
    "seggen/test_train.py",
    "engine/test_submit.py",
    "engine/test_executors.py",
)


def order(items: list[pytest.Item]) -> None:
    """Unit tests first; then module by module (`LONGEST_FIRST`, then the others in collection order) its
    integration tests before its e2e tests, so a module's fixtures, built once, serve both tiers."""
    modules: dict[str, int] = {}
    for item in items:
        path = item.nodeid.split("::")[0]
        longest = next((i for i, suffix in enumerate(LONGEST_FIRST) if path.endswith(suffix)), None)
        modules.setdefault(path, len(LONGEST_FIRST) + len(modules) if longest is None else longest)

    def key(item: pytest.Item) -> tuple[int, int, int]:
        tier = TIERS.index(tier_of(item))
        return (0, 0, 0) if tier == 0 else (1, modules[item.nodeid.split("::")[0]], tier)

    items.sort(key=key)


@contextmanager
def running(item: pytest.Item):
    _current["item"] = item
    try:
        yield
    finally:
        _current["item"] = None
