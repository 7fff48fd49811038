"""systemd readiness notification (``Type=notify``), without a dependency.

sd_notify(3) is one datagram to the Unix socket named by ``$NOTIFY_SOCKET`` (a leading ``@``
means the abstract namespace). Outside systemd the variable is unset and this does nothing.
"""

from __future__ import annotations

import os
import socket

from deid_router.observability.logging import get_logger

log = get_logger("systemd")


def notify(state: str) -> bool:
    """Send ``state`` (``READY=1``, ``STOPPING=1``, ``STATUS=...``); True if it was sent."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    target = "\0" + address[1:] if address.startswith("@") else address
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode("utf-8"), target)
    except OSError as exc:
        log.warning("systemd_notify_failed", error=type(exc).__name__)
        return False
    return True
