"""Readiness: the listener accepts, the queue database answers, the holding disk is above its reserve."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.engine import make_url

from deid_router.db.operations import Reports
from deid_router.errors import QueueError


def sqlite_file(url: str) -> Path | None:
    """The database file of a ``sqlite:///`` URL (None for PostgreSQL or in-memory)."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:":
        return None
    return Path(parsed.database)


@dataclass
class Readiness:
    reports: Reports
    queue_url: str
    listener_up: Callable[[], bool]
    free_bytes: Callable[[], int]
    min_free_bytes: int

    def problems(self) -> list[str]:
        """Why the node is not ready (empty: ready). Reasons name parts, never values."""
        out: list[str] = []
        if not self.listener_up():
            out.append("DICOM listener is not accepting associations")
        db_file = sqlite_file(self.queue_url)
        if db_file is not None and not db_file.is_file():
            # Pooled connections would still answer from the moved or deleted file.
            out.append("queue database file is missing")
        else:
            try:
                self.reports.ping()
            except QueueError:
                out.append("queue database is unreachable")
        try:
            if self.free_bytes() < self.min_free_bytes:
                out.append("holding disk is below its reserve (storage.min_free_mb)")
        except OSError:
            out.append("holding disk is unreadable")
        return out
