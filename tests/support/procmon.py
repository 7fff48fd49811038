"""Peak memory of a process tree, sampled from /proc (Linux only, no psutil needed).

``RssSampler(pid)`` samples VmRSS of ``pid`` and all its descendants every ``interval``
seconds in a background thread and keeps the peak of the SUM (what the node costs the host)
and the per-process peaks. ``VmHWM`` (each process's own high-water mark, kept by the kernel)
is also read at every sample, so a spike between two samples is still seen per process.
"""

from __future__ import annotations

import threading
import time
import os
from pathlib import Path


def _status_kb(pid: int, field: str) -> int:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return 0
    for line in text.splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except FileNotFoundError:
        return out
    for task in tasks:
        try:
            out.extend(int(c) for c in (task / "children").read_text().split())
        except (FileNotFoundError, ValueError):
            pass
    return out


def process_tree(pid: int) -> list[int]:
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(children(p))
    return tree


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time consumed so far by these (live) processes."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        total += int(fields[11]) + int(fields[12])
    return total / tick


def nice(pid: int) -> int:
    """The scheduling nice value of a live process (/proc/PID/stat field 19)."""
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[16])


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError):
        return ""


class RssSampler:
    def __init__(self, pid: int, interval: float = 0.1) -> None:
        self.pid = pid
        self.interval = interval
        self.peak_sum_kb = 0
        self.hwm_kb: dict[int, int] = {}  # pid -> VmHWM last seen (per-process peak)
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _sample(self) -> None:
        total = 0
        for p in process_tree(self.pid):
            total += _status_kb(p, "VmRSS")
            hwm = _status_kb(p, "VmHWM")
            if hwm:
                self.hwm_kb[p] = max(self.hwm_kb.get(p, 0), hwm)
        self.peak_sum_kb = max(self.peak_sum_kb, total)
        self.samples += 1

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def start(self) -> RssSampler:
        self._thread.start()
        return self

    def stop(self) -> RssSampler:
        self._stop.set()
        self._thread.join(timeout=5)
        return self

    @property
    def peak_sum_mb(self) -> float:
        return self.peak_sum_kb / 1024

    @property
    def hwm_sum_mb(self) -> float:
        """Sum of per-process high-water marks: an upper bound of the true peak of the sum."""
        return sum(self.hwm_kb.values()) / 1024

    def __enter__(self) -> RssSampler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_for(predicate, timeout: float, interval: float = 0.05) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False
