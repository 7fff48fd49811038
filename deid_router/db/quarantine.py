"""The quarantine store: instances and jobs that must not be sent until an operator acts.

An entry is written in exactly one way (:func:`insert_entries`), by the queue when a job
fails for good or a re-send conflicts with what was received first. It stays open
(``predicates.OPEN_ENTRY``) until an operator releases it (its jobs are queued again by
:func:`requeue_failed`) or purges it (its failed jobs are closed and its raw file may go).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Table, exists, func, insert, or_, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.sql import Select

from deid_router.db.batches import chunks
from deid_router.db.engine import Store
from deid_router.db.job_events import JobEvent, event_row, insert_events, read_events
from deid_router.db.models import Instance, Job, QuarantineRow
from deid_router.db.predicates import OPEN_ENTRY, PENDING, RAW_HELD
from deid_router.jobs.states import JobState

CONFLICT_REASON = "conflict_same_sop_instance_uid"
CONFLICT_DETAIL = "a different instance with the same SOP Instance UID was received earlier"

_INSERT_ENTRY = insert(cast(Table, QuarantineRow.__table__))
_Q_COLS = (
    QuarantineRow.id, QuarantineRow.instance_id, QuarantineRow.job_id, QuarantineRow.reason, QuarantineRow.detail,
    QuarantineRow.created_at, QuarantineRow.released_at, QuarantineRow.purged_at,
)


@dataclass(frozen=True)
class NewEntry:
    """A quarantine entry to write: of one job, or of a whole instance (``job_id`` None)."""

    instance_id: str
    job_id: int | None
    reason: str
    detail: str = ""

    @classmethod
    def of_job(cls, instance_id: str, job_id: int, reason: str, attempts: int) -> NewEntry:
        """The entry of a job that failed for good after ``attempts`` attempts."""
        return cls(instance_id, job_id, reason, f"attempt {attempts}")


@dataclass(frozen=True)
class QuarantineEntry:
    id: int
    instance_id: str
    job_id: int | None
    destination: str | None
    reason: str
    detail: str
    created_at: datetime
    released_at: datetime | None
    purged_at: datetime | None
    raw_path: str
    events: tuple[JobEvent, ...] = field(default=())
    # What the database holds about the instance (no tag value but the registered SOP class,
    # the modality code and the network's AE titles).
    modality: str = ""
    sop_class_uid: str = ""
    transfer_syntax: str = ""
    calling_aet: str = ""
    called_aet: str = ""
    size: int = 0
    received_at: datetime | None = None
    raw_deleted_at: datetime | None = None


@dataclass(frozen=True)
class PurgeResult:
    entries: int  # quarantine entries purged by this call
    jobs_closed: int  # failed jobs moved to ``purged``
    raw_paths: list[str]  # raw files the caller deletes, then marks with ``mark_raw_path_deleted``


def insert_entries(conn: Connection, entries: Sequence[NewEntry], now: datetime) -> None:
    """Write ``entries`` in the caller's transaction (the only insert into the quarantine)."""
    if entries:
        conn.execute(_INSERT_ENTRY, [
            {"instance_id": e.instance_id, "job_id": e.job_id, "reason": e.reason, "detail": e.detail,
             "created_at": now}
            for e in entries
        ])


def retryable() -> Select[int, str, str]:
    """Jobs whose raw file is still held: a purged instance cannot be sent again."""
    return select(Job.id, Job.state, Job.instance_id).join(Instance, Instance.id == Job.instance_id).where(RAW_HELD)


def requeue_failed(conn: Connection, job_rows: Sequence[Any], reason: str, now: datetime) -> list[int]:
    """failed/retrying -> queued with attempts reset; release their quarantine entries.

    ``job_rows`` (id, state, instance_id; from :func:`retryable`) are locked by the caller.
    """
    ids: list[int] = []
    events = []
    for r in job_rows:
        events.append(event_row(r.id, now, r.state, JobState.QUEUED.value, 0, None, reason))
        ids.append(r.id)
    if not ids:
        return []
    instance_ids = sorted({r.instance_id for r in job_rows})
    for chunk in chunks(ids):
        conn.execute(
            update(Job).where(Job.id.in_(chunk)).values(
                state=JobState.QUEUED.value, attempts=0, run_after=now, lease_owner=None,
                lease_expires_at=None, last_reason=reason, updated_at=now,
            )
        )
        conn.execute(update(QuarantineRow).where(QuarantineRow.job_id.in_(chunk), OPEN_ENTRY).values(released_at=now))
    insert_events(conn, events)
    # Instance-level entries (conflicts) are released once no job of the instance is failed.
    still_failed = exists().where(Job.instance_id == QuarantineRow.instance_id, Job.state == JobState.FAILED.value)
    for ichunk in chunks(instance_ids):
        conn.execute(
            update(QuarantineRow)
            .where(QuarantineRow.instance_id.in_(ichunk), QuarantineRow.job_id.is_(None), OPEN_ENTRY, ~still_failed)
            .values(released_at=now)
        )
    return ids


class QuarantineStore(Store):
    """Listing, releasing and purging quarantine entries."""

    def _entry(self, conn: Connection, where: Any) -> list[QuarantineEntry]:
        rows = conn.execute(
            select(*_Q_COLS, Job.destination, Instance.raw_path, Instance.modality, Instance.sop_class_uid,
                   Instance.transfer_syntax, Instance.calling_aet, Instance.called_aet, Instance.size,
                   Instance.received_at, Instance.raw_deleted_at)
            .join(Instance, Instance.id == QuarantineRow.instance_id)
            .outerjoin(Job, Job.id == QuarantineRow.job_id)
            .where(where)
            .order_by(QuarantineRow.id)
        ).all()
        return [
            QuarantineEntry(
                id=q.id, instance_id=q.instance_id, job_id=q.job_id, destination=q.destination, reason=q.reason,
                detail=q.detail, created_at=q.created_at, released_at=q.released_at, purged_at=q.purged_at,
                raw_path=q.raw_path, modality=q.modality, sop_class_uid=q.sop_class_uid,
                transfer_syntax=q.transfer_syntax, calling_aet=q.calling_aet, called_aet=q.called_aet,
                size=q.size, received_at=q.received_at, raw_deleted_at=q.raw_deleted_at,
            )
            for q in rows
        ]

    def quarantine_list(self, include_closed: bool = False) -> list[QuarantineEntry]:
        """Open entries (neither released nor purged), oldest first; all with ``include_closed``."""
        with self._read("quarantine_list") as conn:
            return self._entry(conn, True if include_closed else OPEN_ENTRY)

    def quarantine_get(self, qid: int) -> QuarantineEntry | None:
        """One entry with the event history of its job (or of all the instance's jobs)."""
        with self._read("quarantine_get") as conn:
            found = self._entry(conn, QuarantineRow.id == qid)
            if not found:
                return None
            e = found[0]
            if e.job_id is not None:
                job_ids = [e.job_id]
            else:
                job_ids = list(conn.execute(select(Job.id).where(Job.instance_id == e.instance_id)).scalars())
            events = read_events(conn, job_ids)
        return QuarantineEntry(**{**e.__dict__, "events": tuple(events)})

    def quarantine_release(self, qid: int) -> bool:
        """Re-queue the entry's job (or every failed job of its instance); idempotent.

        False when the entry does not exist or was purged (its raw file is gone).
        """
        now = self._clock()
        with self._tx("quarantine_release") as conn:
            q = conn.execute(select(*_Q_COLS).where(QuarantineRow.id == qid).with_for_update()).first()
            if q is None or q.purged_at is not None:
                return False
            if q.released_at is not None:
                return True
            where = Job.id == q.job_id if q.job_id is not None else Job.instance_id == q.instance_id
            rows = conn.execute(
                retryable().where(where, Job.state.in_([JobState.FAILED.value, JobState.RETRYING.value]))
            ).all()
            requeue_failed(conn, rows, "quarantine_release", now)
            conn.execute(
                update(QuarantineRow).where(QuarantineRow.id == qid, QuarantineRow.released_at.is_(None))
                .values(released_at=now)
            )
            return True

    def quarantine_purge(self) -> list[str]:
        """Mark open entries purged; return raw paths the caller should now delete.

        The paths are of instances with a purged entry, no pending job and a raw file not yet
        marked deleted: calling again before ``mark_raw_deleted`` returns them again, so a
        crash between purge and unlink never leaks an identified file.
        """
        now = self._clock()
        with self._tx("quarantine_purge") as conn:
            conn.execute(update(QuarantineRow).where(OPEN_ENTRY).values(purged_at=now))
            pending = exists().where(Job.instance_id == Instance.id, PENDING)
            purged = exists().where(QuarantineRow.instance_id == Instance.id, QuarantineRow.purged_at.is_not(None))
            return list(
                conn.execute(
                    select(Instance.raw_path).where(RAW_HELD, purged, ~pending).order_by(Instance.raw_path)
                ).scalars()
            )

    def purge_quarantine_entries(self, entry_ids: Sequence[int]) -> PurgeResult:
        """Purge open entries: mark them purged and close their failed jobs (``purged``).

        An entry of one job closes that job; an instance-level entry (a conflict) closes every
        failed job of its instance. Returns, with the counts, the raw files that may now go:
        of instances with a purged entry whose every job is done or purged and whose raw file
        is not yet marked deleted (so a crash between purge and unlink is finished next time).
        """
        now = self._clock()
        entries = jobs_closed = 0
        with self._tx("purge_quarantine_entries") as conn:
            for chunk in chunks(sorted(set(entry_ids))):
                rows = conn.execute(
                    select(QuarantineRow.id, QuarantineRow.job_id, QuarantineRow.instance_id)
                    .where(QuarantineRow.id.in_(list(chunk)), OPEN_ENTRY)
                    .order_by(QuarantineRow.id).with_for_update()
                ).all()
                if not rows:
                    continue
                entries += len(rows)
                conn.execute(
                    update(QuarantineRow).where(QuarantineRow.id.in_([r.id for r in rows])).values(purged_at=now)
                )
                job_ids = [r.job_id for r in rows if r.job_id is not None]
                instance_ids = [r.instance_id for r in rows if r.job_id is None]
                where = or_(Job.id.in_(job_ids), Job.instance_id.in_(instance_ids))
                failed = conn.execute(
                    select(Job.id, Job.state, Job.attempts)
                    .where(where, Job.state == JobState.FAILED.value).order_by(Job.id).with_for_update()
                ).all()
                if failed:
                    events = [
                        event_row(r.id, now, r.state, JobState.PURGED.value, r.attempts, None, "quarantine_purge")
                        for r in failed
                    ]
                    conn.execute(
                        update(Job).where(Job.id.in_([r.id for r in failed])).values(
                            state=JobState.PURGED.value, updated_at=now, last_reason="quarantine_purge",
                        )
                    )
                    insert_events(conn, events)
                    jobs_closed += len(failed)
            open_work = exists().where(
                Job.instance_id == Instance.id, Job.state.not_in([JobState.DONE.value, JobState.PURGED.value])
            )
            purged = exists().where(QuarantineRow.instance_id == Instance.id, QuarantineRow.purged_at.is_not(None))
            paths = list(
                conn.execute(
                    select(Instance.raw_path).where(RAW_HELD, purged, ~open_work).order_by(Instance.raw_path)
                ).scalars()
            )
        return PurgeResult(entries, jobs_closed, paths)

    def quarantine_size(self) -> int:
        """Number of open quarantine entries."""
        with self._read("quarantine_size") as conn:
            return open_entries(conn)


def open_entries(conn: Connection) -> int:
    """The number of open entries (status counts, metrics)."""
    return int(conn.execute(select(func.count()).select_from(QuarantineRow).where(OPEN_ENTRY)).scalar_one())
