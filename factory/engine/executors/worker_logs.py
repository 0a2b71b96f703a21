"""What a worker that died wrote before it died: the fatal signal and the frame, from its Ray log.

Ray tells the driver only that a worker's connection closed; it never reports the signal or the exit
code. Every Ray worker enables Python's faulthandler, which writes `Fatal Python error: Segmentation
fault` (or `Aborted`, `Bus error`, `Floating point exception`) and the stack to the worker's
`worker-*-PID.err` log. The driver reads that log by the node and pid of the shard's watch record: from
its own session folder where the worker ran on the driver's node, else through Ray's state API (which
needs the cluster's dashboard). A SIGKILL, as the OOM killer sends, leaves nothing there.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

log = logging.getLogger("factory")

_FATAL = re.compile(r"Fatal Python error: ([^\n]+)")
_FRAME = re.compile(r'File "([^"]+)", line (\d+) in ([^\s]+)')
_TAIL_BYTES = 64 * 1024


def last_words(node_id: str | None, pid: int | str | None) -> str | None:
    """The worker's fatal error and the two innermost frames it names ("Segmentation fault in
    ctypes/__init__.py:519 string_at, called from support/stages.py:90 process"), "" when its log holds
    none, or None when the log cannot be read from here."""
    text = _worker_log(node_id, pid)
    if text is None:
        return None
    fatal = list(_FATAL.finditer(text))
    if not fatal:
        return ""
    last = fatal[-1]
    # faulthandler lists the most recent call first, after the line naming the thread: the innermost frame
    # (often a library's call into native code) and the one that called it.
    frames = [f"{'/'.join(Path(m[1]).parts[-2:])}:{m[2]} {m[3]}" for m in _FRAME.finditer(text, last.end())][:2]
    where = f" in {frames[0]}" + (f", called from {frames[1]}" if len(frames) > 1 else "") if frames else ""
    return f"{last[1].strip()}{where}"


def _worker_log(node_id: str | None, pid: int | str | None) -> str | None:
    import sys

    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized() or not str(pid or "").isdigit():
        return None
    pid = int(str(pid))
    try:
        if node_id is None or node_id == ray.get_runtime_context().get_node_id():
            logs = Path(ray._private.worker._global_node.get_logs_dir_path())
            found = sorted(logs.glob(f"worker-*-{pid}.err"), key=lambda p: p.stat().st_mtime)
            if not found:
                return None
            with open(found[-1], "rb") as f:
                f.seek(max(f.seek(0, 2) - _TAIL_BYTES, 0))
                return f.read().decode(errors="replace")
        from ray.util.state import get_log

        return "".join(get_log(node_id=node_id, pid=pid, suffix="err", tail=400, timeout=10))
    except Exception:  # no dashboard for the state API, the node gone, a log rotated away
        log.debug("cannot read the log of worker %s on node %s", pid, node_id, exc_info=True)
        return None
