"""Fault injection for tests: kill this process at a named step.

Enabled only by the environment variable ``DEID_ROUTER_FAULT=<point>[@<n>]`` (kill on the n-th
time the point is reached, default 1). Unset, :func:`fault_point` is a dictionary lookup and
nothing else. The points are the steps where a crash must not lose an acknowledged instance.
"""

from __future__ import annotations

import os
import signal
import threading

ENV = "DEID_ROUTER_FAULT"
POINTS = (
    "after_raw_write_before_fsync",
    "after_fsync_before_commit",
    "after_commit_before_response",
    "after_claim",
    "during_deid",
    "after_send_before_done",
    "during_folder_write",
)


def _parse(spec: str) -> tuple[str, int]:
    name, _, n = spec.partition("@")
    if name not in POINTS:
        raise ValueError(f"{ENV}: unknown fault point {name!r} (known: {', '.join(POINTS)})")
    return name, int(n or "1")


_TARGET = _parse(os.environ[ENV]) if os.environ.get(ENV) else None
_hits = 0
_lock = threading.Lock()


def fault_point(name: str) -> None:
    """SIGKILL this process here if the test asked for it."""
    global _hits
    if _TARGET is None or _TARGET[0] != name:
        return
    with _lock:
        _hits += 1
        if _hits >= _TARGET[1]:
            os.kill(os.getpid(), signal.SIGKILL)
