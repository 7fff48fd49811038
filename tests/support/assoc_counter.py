"""Count simultaneous TCP connections to a PACS port, as ``ss -tn state established dport = :PORT``
would, by sampling the kernel's socket tables (``/proc/net/tcp``, ``tcp6``) in a thread.

A PACS that serves one association at a time (dcmtk ``storescp`` without ``--fork``) leaves
a second connection in its listen backlog, where the kernel has already completed the TCP
handshake: the client socket is ESTABLISHED and counted here, although the PACS never saw it.
That is what a test of "never more than max_associations" must catch.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
from types import TracebackType

_ESTABLISHED = "01"


def established_to(port: int) -> int:
    """Client sockets in state ESTABLISHED whose remote port is ``port`` (loopback test peers)."""
    return len(established_sockets(port))


def established_sockets(port: int) -> set[str]:
    """Local address:port (kernel hex notation) of each client socket :func:`established_to` counts."""
    # The kernel prints the table a page at a time; a socket that moves meanwhile can be
    # printed twice. Each client socket has its own local address:port: count those.
    local: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table, encoding="ascii") as fh:
                text = fh.read()
        except FileNotFoundError:
            continue
        for line in text.splitlines()[1:]:
            fields = line.split()
            if fields[3] == _ESTABLISHED and int(fields[2].rsplit(":", 1)[1], 16) == port:
                local.add(fields[1])
    return local


def ss_established_to(port: int) -> int | None:
    """The same count from ``ss`` (iproute2), or None when ss is not installed."""
    ss = shutil.which("ss")
    if ss is None:
        return None
    out = subprocess.run([ss, "-Htn", "state", "established", "dport", "=", f":{port}"],
                         capture_output=True, text=True, timeout=10, check=True).stdout
    return sum(1 for line in out.splitlines() if line.strip())


class EstablishedCounter:
    """Samples :func:`established_to` every ``interval`` seconds; ``peak`` is the maximum seen."""

    def __init__(self, port: int, interval: float = 0.005) -> None:
        self.port = port
        self.interval = interval
        self.peak = 0
        self.samples = 0
        self.busy_samples = 0  # samples with at least one association open
        self.at_peak: set[str] = set()  # the sockets of the first sample at the peak
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"count-{port}", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            found = established_sockets(self.port)
            n = len(found)
            self.samples += 1
            self.busy_samples += n > 0
            if n > self.peak:
                self.peak, self.at_peak = n, found

    def __enter__(self) -> EstablishedCounter:
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
