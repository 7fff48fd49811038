"""The history of jobs (``job_events``): one row per state write, checked against the lifecycle.

Every store that moves a job builds its rows with :func:`event_row`, which asserts the move
against ``jobs.states.TRANSITIONS`` before anything is written, and writes them with
:func:`insert_events` in the same transaction as the state itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Table, insert, select
from sqlalchemy.engine import Connection

from deid_router.db.models import JobEvent as JobEventRow
from deid_router.jobs.states import assert_transition

EVENTS = cast(Table, JobEventRow.__table__)
INSERT_EVENT = insert(EVENTS)
EVENT_KEYS = ("job_id", "at", "from_state", "to_state", "attempt", "status_code", "reason")


@dataclass(frozen=True)
class JobEvent:
    at: datetime
    from_state: str | None
    to_state: str
    attempt: int
    status_code: int | None
    reason: str


def event_row(
    job_id: int, at: datetime, src: str | None, dst: str, attempt: int,
    status: int | None = None, reason: str = "",
) -> dict[str, Any]:
    """The row recording ``src -> dst``; IllegalTransitionError when the table forbids it."""
    assert_transition(src, dst)
    return {"job_id": job_id, "at": at, "from_state": src, "to_state": dst, "attempt": attempt,
            "status_code": status, "reason": reason}


def insert_events(conn: Connection, rows: Sequence[dict[str, Any]]) -> None:
    """Write ``rows`` (from :func:`event_row`) in the caller's transaction."""
    if rows:
        conn.execute(INSERT_EVENT, list(rows))


def read_events(conn: Connection, job_ids: Sequence[int]) -> list[JobEvent]:
    """The history of ``job_ids``, oldest first."""
    if not job_ids:
        return []
    rows = conn.execute(
        select(JobEventRow.at, JobEventRow.from_state, JobEventRow.to_state, JobEventRow.attempt,
               JobEventRow.status_code, JobEventRow.reason)
        .where(JobEventRow.job_id.in_(list(job_ids))).order_by(JobEventRow.id)
    ).all()
    return [JobEvent(r.at, r.from_state, r.to_state, r.attempt, r.status_code, r.reason) for r in rows]
