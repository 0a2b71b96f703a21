"""Storage faults for the fault-matrix tests (tests/engine/test_faults.py), in every process of a run.

A test puts this folder first on PYTHONPATH and names a fault in FACTORY_TEST_FAULT; Python imports
this module at start-up in the driver and in every Ray worker, and it wraps fsspec's local file
opening so that writes of shard tars (written under the job's `_tmp/`, then renamed) misbehave:

    fail-once:MARKER_DIR   the first write (across all processes) raises EIO, later ones work
    slow:SECONDS           every write sleeps first, so a write task is easy to catch mid-way
    enospc                 every write raises ENOSPC: a full disk, where a test cannot mount one

Several faults, separated by `|`, act in the order given (e.g. `slow:0.5|fail-once:DIR`).

With FACTORY_TEST_PIDS=DIR as well, every process that starts such a write creates DIR/writer-PID first:
the test finds the process writing a tar by what it does, not by how Ray names its processes.
"""

import errno
import os
import time


def _install(faults: str) -> None:
    from fsspec.implementations.local import LocalFileSystem

    original = LocalFileSystem._open

    def _open(self, path, mode="rb", *args, **kwargs):
        if "w" in mode and "/_tmp/" in str(path) and str(path).endswith(".tar"):
            if os.environ.get("FACTORY_TEST_PIDS"):
                open(os.path.join(os.environ["FACTORY_TEST_PIDS"], f"writer-{os.getpid()}"), "a").close()
            for fault in faults.split("|"):
                _misbehave(fault, path)
        return original(self, path, mode, *args, **kwargs)

    LocalFileSystem._open = _open


def _misbehave(fault: str, path) -> None:
    kind, _, arg = fault.partition(":")
    if kind == "fail-once":
        try:
            os.close(os.open(os.path.join(arg, "failed-once"), os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            pass
        else:
            raise OSError(errno.EIO, f"injected I/O error writing {path}")
    elif kind == "slow":
        time.sleep(float(arg))
    elif kind == "enospc":
        raise OSError(errno.ENOSPC, "No space left on device", str(path))


if os.environ.get("FACTORY_TEST_FAULT"):
    _install(os.environ["FACTORY_TEST_FAULT"])
