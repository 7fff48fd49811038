"""What operators and ``status`` read about jobs: counts, per-destination details, job lists,
one job's state and history. Reads only; codes, times and ids, never a tag value."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, TypedDict

from sqlalchemy import func, select

from deid_router.db.engine import Store
from deid_router.db.job_events import JobEvent, read_events
from deid_router.db.models import Instance, Job
from deid_router.db.predicates import PENDING
from deid_router.db.quarantine import open_entries
from deid_router.jobs.states import ALL_STATES, JobState

__all__ = ["DestinationDetail", "JobReports", "JobSummary", "StatusCounts"]


@dataclass(frozen=True)
class JobSummary:
    """One job as operators see it (``jobs list``, retry plans): ids, states and codes only."""

    id: int
    instance_id: str
    destination: str
    state: str
    attempts: int
    last_status: int | None
    last_reason: str
    created_at: datetime
    updated_at: datetime
    run_after: datetime
    raw_held: bool


@dataclass(frozen=True)
class DestinationDetail:
    oldest_job_at: datetime | None  # oldest job not yet done (queued, running, retrying)
    next_retry_at: datetime | None
    last_error_reason: str | None
    last_error_status: int | None
    last_error_at: datetime | None


class StatusCounts(TypedDict):
    jobs: dict[str, int]
    destinations: dict[str, dict[str, int]]
    quarantined: int


def _zero_counts() -> dict[str, int]:
    return {s.value: 0 for s in ALL_STATES}


def _aware(value: Any) -> datetime | None:
    """Aggregates (min/max) bypass the column type on SQLite: attach UTC to a naive result."""
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    assert isinstance(value, datetime)
    return value if value.tzinfo is not None else value.replace(tzinfo=timezone.utc)


_SUMMARY_COLS = (
    Job.id, Job.instance_id, Job.destination, Job.state, Job.attempts, Job.last_status, Job.last_reason,
    Job.created_at, Job.updated_at, Job.run_after, Instance.raw_deleted_at,
)


def _summary(r: Any) -> JobSummary:
    return JobSummary(
        id=r.id, instance_id=r.instance_id, destination=r.destination, state=r.state, attempts=r.attempts,
        last_status=r.last_status, last_reason=r.last_reason or "", created_at=r.created_at,
        updated_at=r.updated_at, run_after=r.run_after, raw_held=r.raw_deleted_at is None,
    )


class JobReports(Store):
    """Read-only views of the jobs."""

    def status_counts(self, destinations: Sequence[str] = ()) -> StatusCounts:
        """Counts for ``deid-router status``: every state present (0 when none).

        ``destinations`` lists configured names that should appear even with no jobs.
        """
        with self._read("status_counts") as conn:
            rows = conn.execute(
                select(Job.destination, Job.state, func.count())
                .where(Job.state.in_([s.value for s in ALL_STATES]))  # purged jobs are closed
                .group_by(Job.destination, Job.state)
            ).all()
            quarantined = open_entries(conn)
        jobs = _zero_counts()
        per: dict[str, dict[str, int]] = {d: _zero_counts() for d in destinations}
        for dest, state, n in rows:
            jobs[state] = jobs.get(state, 0) + int(n)
            per.setdefault(dest, _zero_counts())[state] = int(n)
        return {"jobs": jobs, "destinations": dict(sorted(per.items())), "quarantined": quarantined}

    def destination_details(self) -> dict[str, DestinationDetail]:
        """Per destination with jobs: oldest pending job, next retry, last error (codes only)."""
        out: dict[str, DestinationDetail] = {}
        with self._read("destination_details") as conn:
            names = list(conn.execute(select(Job.destination).distinct().order_by(Job.destination)).scalars())
            for name in names:
                oldest = conn.execute(
                    select(func.min(Job.created_at)).where(Job.destination == name, PENDING)
                ).scalar()
                next_retry = conn.execute(
                    select(func.min(Job.run_after))
                    .where(Job.destination == name, Job.state == JobState.RETRYING.value)
                ).scalar()
                err = conn.execute(
                    select(Job.last_reason, Job.last_status, Job.updated_at)
                    .where(Job.destination == name,
                           Job.state.in_([JobState.RETRYING.value, JobState.FAILED.value]))
                    .order_by(Job.updated_at.desc(), Job.id.desc()).limit(1)
                ).first()
                out[name] = DestinationDetail(
                    oldest_job_at=_aware(oldest), next_retry_at=_aware(next_retry),
                    last_error_reason=err.last_reason if err else None,
                    last_error_status=err.last_status if err else None,
                    last_error_at=err.updated_at if err else None,
                )
        return out

    def list_jobs(
        self, states: Sequence[str] = (), destination: str | None = None, ids: Sequence[int] = (),
        limit: int | None = None, oldest_first: bool = False,
    ) -> list[JobSummary]:
        """Jobs filtered by state, destination and ids; newest first unless ``oldest_first``."""
        query = select(*_SUMMARY_COLS).join(Instance, Instance.id == Job.instance_id)
        if states:
            query = query.where(Job.state.in_(list(states)))
        if destination is not None:
            query = query.where(Job.destination == destination)
        if ids:
            query = query.where(Job.id.in_(list(ids)))
        query = query.order_by(Job.id if oldest_first else Job.id.desc())
        if limit is not None:
            query = query.limit(limit)
        with self._read("list_jobs") as conn:
            return [_summary(r) for r in conn.execute(query).all()]

    def job_events(self, job_id: int) -> list[JobEvent]:
        """The job's history, oldest first."""
        with self._read("job_events") as conn:
            return read_events(conn, [job_id])

    def job_state(self, job_id: int) -> tuple[str, int] | None:
        """``(state, attempts)`` of one job, for operators and tests."""
        with self._read("job_state") as conn:
            row = conn.execute(select(Job.state, Job.attempts).where(Job.id == job_id)).first()
        return None if row is None else (row.state, row.attempts)
