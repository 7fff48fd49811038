"""What operators read and change beside the job queue: console users, destination pause
state, and the read-only reports behind ``status``, the console and ``/metrics``.

Same rules as the job queue (``db.job_queue``): short transactions, database trouble leaves as
:class:`deid_router.errors.QueueError` naming the operation only, and no column read here holds
a tag value (instances carry registered SOP class UIDs, modality codes and AE titles only).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import Engine, and_, delete, exists, func, insert, select, update
from sqlalchemy.exc import DBAPIError, IntegrityError

from deid_router.db.engine import Store, utc_now
from deid_router.db.models import AuditEvent, DestinationState, Instance, Job, JobEvent, QuarantineRow, User
from deid_router.db.predicates import OPEN_ENTRY, PENDING, RAW_HELD
from deid_router.db.repository import JobRepository, StatusCounts
from deid_router.errors import QueueError
from deid_router.jobs.states import JobState

ROLES = ("admin", "viewer")


# --------------------------------------------------------------------------- users


@dataclass(frozen=True)
class UserRow:
    name: str
    role: str
    password_hash: str
    created_at: datetime


class UserExists(Exception):
    """``add`` of a name that is taken."""


class UserStore(Store):
    """Console and API users (passwords arrive hashed: see ``http.passwords``)."""

    def add(self, name: str, role: str, password_hash: str) -> None:
        if role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}")
        try:
            with self._engine.begin() as conn:
                conn.execute(
                    insert(User).values(name=name, role=role, password_hash=password_hash, created_at=self._clock())
                )
        except IntegrityError as exc:
            raise UserExists(name) from exc
        except DBAPIError as exc:
            raise QueueError("queue database error during user_add") from exc

    def remove(self, name: str) -> bool:
        with self._tx("user_remove") as conn:
            return bool(conn.execute(delete(User).where(User.name == name)).rowcount)

    def get(self, name: str) -> UserRow | None:
        with self._read("user_get") as conn:
            r = conn.execute(select(User.name, User.role, User.password_hash, User.created_at)
                             .where(User.name == name)).first()
        return None if r is None else UserRow(r.name, r.role, r.password_hash, r.created_at)

    def list(self) -> list[UserRow]:
        with self._read("user_list") as conn:
            rows = conn.execute(
                select(User.name, User.role, User.password_hash, User.created_at).order_by(User.name)
            ).all()
        return [UserRow(r.name, r.role, r.password_hash, r.created_at) for r in rows]


# --------------------------------------------------------------------------- destination state


@dataclass(frozen=True)
class PauseState:
    destination: str
    paused: bool
    reason: str
    updated_at: datetime
    updated_by: str


class DestinationStates(Store):
    """Pause and resume; a claim (``db.predicates.due``) skips the jobs of a paused destination."""

    def set_paused(self, destination: str, paused: bool, actor: str, reason: str = "") -> None:
        now = self._clock()
        values = {"paused": paused, "reason": reason, "updated_at": now, "updated_by": actor}
        with self._tx("destination_pause") as conn:
            done = conn.execute(
                update(DestinationState).where(DestinationState.destination == destination).values(**values)
            ).rowcount
            if not done:
                conn.execute(insert(DestinationState).values(destination=destination, **values))

    def all(self) -> dict[str, PauseState]:
        with self._read("destination_states") as conn:
            rows = conn.execute(
                select(DestinationState.destination, DestinationState.paused, DestinationState.reason,
                       DestinationState.updated_at, DestinationState.updated_by)
            ).all()
        return {r.destination: PauseState(**r._asdict()) for r in rows}

    def paused(self) -> list[str]:
        return sorted(d for d, s in self.all().items() if s.paused)


# --------------------------------------------------------------------------- reports


@dataclass(frozen=True)
class QueueMetrics:
    """One consistent read of what ``/metrics`` and the textfile report."""

    jobs: dict[str, dict[str, int]]  # destination -> state -> count
    quarantined: int  # open entries
    received_total: int
    quarantined_total: dict[str, int]  # destination ("" for instance-level entries) -> entries ever
    oldest_pending: dict[str, datetime]  # destination -> created_at of its oldest pending job
    paused: set[str]


@dataclass(frozen=True)
class JobRow:
    id: int
    destination: str
    state: str
    attempts: int
    last_status: int | None
    last_reason: str
    created_at: datetime
    updated_at: datetime
    run_after: datetime
    modality: str
    sop_class_uid: str
    calling_aet: str


@dataclass(frozen=True)
class QuarantineRowView:
    id: int
    job_id: int | None
    destination: str | None
    reason: str
    detail: str
    created_at: datetime
    released_at: datetime | None
    purged_at: datetime | None
    modality: str
    sop_class_uid: str
    calling_aet: str
    received_at: datetime
    events: tuple[Any, ...] = field(default=())


@dataclass(frozen=True)
class AuditRecord:
    """One audit trail entry: who (``user``: a console/API user or the shell user of a
    command) did what; ``detail`` holds ids, counts and names, never a tag value."""

    at: datetime
    action: str
    user: str
    detail: str


@dataclass(frozen=True)
class DestinationSummary:
    last_error: str  # reason of the most recent retrying/failed job ("" when none)
    last_status: int | None
    next_retry: datetime | None


class Reports(Store):
    """Read-only queries for the console, the API and the metrics."""

    def __init__(self, engine: Engine, repo: JobRepository, clock: Callable[[], datetime] = utc_now) -> None:
        super().__init__(engine, clock)
        self.repo = repo

    def ping(self) -> None:
        """Raise QueueError unless the database answers a read of the queue schema."""
        with self._read("ping") as conn:
            conn.execute(select(func.count()).select_from(DestinationState)).scalar_one()

    def status(self, states: DestinationStates) -> dict[str, Any]:
        """The ``deid-router status --json`` object (v1 keys, plus ``paused`` and
        ``destination_details``: oldest pending job and its age, next retry, last error)."""
        counts: StatusCounts = self.repo.status_counts()
        doc: dict[str, Any] = dict(counts)
        doc["paused"] = states.paused()
        doc["destination_details"] = destination_details_doc(self.repo)
        return doc

    def metrics(self) -> QueueMetrics:
        counts = self.repo.status_counts()
        with self._read("metrics") as conn:
            received = int(conn.execute(select(func.count()).select_from(Instance)).scalar_one())
            q_rows = conn.execute(
                select(Job.destination, func.count())
                .select_from(QuarantineRow).outerjoin(Job, Job.id == QuarantineRow.job_id)
                .group_by(Job.destination)
            ).all()
            oldest = conn.execute(
                select(Job.destination, func.min(Job.created_at))
                .where(PENDING).group_by(Job.destination)
            ).all()
            paused = set(conn.execute(
                select(DestinationState.destination).where(DestinationState.paused.is_(True))
            ).scalars())
        return QueueMetrics(
            jobs=counts["destinations"],
            quarantined=counts["quarantined"],
            received_total=received,
            quarantined_total={(d or ""): int(n) for d, n in q_rows},
            oldest_pending={d: _utc(t) for d, t in oldest if t is not None},
            paused=paused,
        )

    def jobs(
        self, state: str | None = None, destination: str | None = None, limit: int = 100, before_id: int | None = None,
        since: datetime | None = None,
    ) -> list[JobRow]:
        """Newest first, filtered by state, destination and creation time; ``before_id`` pages back."""
        q = (
            select(Job.id, Job.destination, Job.state, Job.attempts, Job.last_status, Job.last_reason,
                   Job.created_at, Job.updated_at, Job.run_after, Instance.modality, Instance.sop_class_uid,
                   Instance.calling_aet)
            .join(Instance, Instance.id == Job.instance_id)
            .order_by(Job.id.desc()).limit(limit)
        )
        if state:
            q = q.where(Job.state == state)
        if destination:
            q = q.where(Job.destination == destination)
        if before_id is not None:
            q = q.where(Job.id < before_id)
        if since is not None:
            q = q.where(Job.created_at >= since)
        with self._read("jobs_list") as conn:
            return [JobRow(**r._asdict()) for r in conn.execute(q).all()]

    def job_events(self, job_id: int) -> list[Any]:
        return list(self.repo.job_events(job_id))

    def quarantine(self, include_closed: bool = False, qid: int | None = None) -> list[QuarantineRowView]:
        q = (
            select(QuarantineRow.id, QuarantineRow.job_id, Job.destination, QuarantineRow.reason, QuarantineRow.detail,
                   QuarantineRow.created_at, QuarantineRow.released_at, QuarantineRow.purged_at,
                   Instance.modality, Instance.sop_class_uid, Instance.calling_aet, Instance.received_at)
            .join(Instance, Instance.id == QuarantineRow.instance_id)
            .outerjoin(Job, Job.id == QuarantineRow.job_id)
            .order_by(QuarantineRow.id)
        )
        if qid is not None:
            q = q.where(QuarantineRow.id == qid)
        elif not include_closed:
            q = q.where(OPEN_ENTRY)
        with self._read("quarantine_view") as conn:
            rows = [QuarantineRowView(**r._asdict()) for r in conn.execute(q).all()]
        if qid is not None and rows:
            entry = self.repo.quarantine_get(qid)
            events = entry.events if entry is not None else ()
            rows = [QuarantineRowView(**{**rows[0].__dict__, "events": tuple(events)})]
        return rows

    def destination_summaries(self) -> dict[str, DestinationSummary]:
        """Per destination: the last error and the next retry of its retrying jobs."""
        out: dict[str, DestinationSummary] = {}
        with self._read("destination_summaries") as conn:
            latest = (
                select(Job.destination, func.max(Job.id).label("id"))
                .where(Job.state.in_((JobState.RETRYING.value, JobState.FAILED.value)))
                .group_by(Job.destination).subquery()
            )
            for r in conn.execute(
                select(Job.destination, Job.last_reason, Job.last_status).join(latest, latest.c.id == Job.id)
            ).all():
                out[r.destination] = DestinationSummary(r.last_reason, r.last_status, None)
            for d, t in conn.execute(
                select(Job.destination, func.min(Job.run_after))
                .where(Job.state == JobState.RETRYING.value).group_by(Job.destination)
            ).all():
                prev = out.get(d, DestinationSummary("", None, None))
                out[d] = DestinationSummary(prev.last_error, prev.last_status, _utc(t) if t is not None else None)
        return out

    def throughput(self, minutes: int = 60) -> dict[str, list[int]]:
        """Per minute of the last ``minutes``: instances received, jobs delivered, entries quarantined."""
        now = self._clock()
        since = now - timedelta(minutes=minutes)
        series = {"received": [0] * minutes, "delivered": [0] * minutes, "quarantined": [0] * minutes}
        queries = {
            "received": select(Instance.received_at).where(Instance.received_at >= since),
            "delivered": select(JobEvent.at).where(JobEvent.to_state == JobState.DONE.value, JobEvent.at >= since),
            "quarantined": select(QuarantineRow.created_at).where(QuarantineRow.created_at >= since),
        }
        with self._read("throughput") as conn:
            for name, q in queries.items():
                for (t,) in conn.execute(q):
                    i = int((_utc(t) - since).total_seconds() // 60)
                    if 0 <= i < minutes:
                        series[name][i] += 1
        return series

    def purge_entry(self, qid: int) -> tuple[bool, list[str]]:
        """Purge one open entry: ``(purged, raw paths the caller deletes now)``.

        Like ``JobRepository.quarantine_purge`` for one entry: the raw file goes once its
        instance has no pending job and no other open entry. Purging again returns False.
        """
        now = self._clock()
        with self._tx("quarantine_purge_entry") as conn:
            q = conn.execute(
                select(QuarantineRow.instance_id).where(QuarantineRow.id == qid, OPEN_ENTRY)
            ).first()
            if q is None:  # no such entry, or already released or purged
                return False, []
            conn.execute(update(QuarantineRow).where(QuarantineRow.id == qid).values(purged_at=now))
            pending = exists().where(Job.instance_id == Instance.id, PENDING)
            other_open = exists().where(QuarantineRow.instance_id == Instance.id, OPEN_ENTRY)
            paths = list(conn.execute(
                select(Instance.raw_path).where(
                    and_(Instance.id == q.instance_id, RAW_HELD, ~pending, ~other_open)
                )
            ).scalars())
        return True, paths

    def audit(self, limit: int | None = 200) -> list[AuditRecord]:
        """The newest audit records, newest first (``limit`` None: all): the console's audit
        page, ``GET /api/v1/audit`` and ``deid-router audit list``."""
        with self._read("audit_recent") as conn:
            rows = conn.execute(
                select(AuditEvent.at, AuditEvent.action, AuditEvent.actor, AuditEvent.detail)
                .order_by(AuditEvent.id.desc()).limit(limit)
            ).all()
        return [AuditRecord(r.at, r.action, r.actor, r.detail) for r in rows]


def _utc(t: datetime) -> datetime:
    return t if t.tzinfo is not None else t.replace(tzinfo=timezone.utc)


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def destination_details_doc(repo: JobRepository) -> dict[str, Any]:
    """Per destination with jobs: oldest pending job, next retry, and the last error's reason
    and status code. Codes and times only, never a tag value; no age (the same document at
    any moment of one state: the CLI and ``/api/v1/status`` agree)."""
    out: dict[str, Any] = {}
    for name, d in repo.destination_details().items():
        out[name] = {
            "oldest_job_at": _iso(d.oldest_job_at),
            "next_retry_at": _iso(d.next_retry_at),
            "last_error": (
                {"reason": d.last_error_reason,
                 "status": None if d.last_error_status is None else f"0x{d.last_error_status:04X}",
                 "at": _iso(d.last_error_at)}
                if d.last_error_at is not None else None
            ),
        }
    return out
