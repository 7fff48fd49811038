"""The job repository: the only code that writes SQL for the queue.

Every method is one short transaction (``engine.begin()``; the enqueue of a new instance, on
the acknowledgement path, runs the same Core statements on the driver's cursor, see
``db.driver``); every state write goes through
``jobs.states.assert_transition`` and leaves a ``job_events`` row. Database trouble leaves
this module as :class:`deid_router.errors.QueueError` with the driver error as ``__cause__``
and a message that names the operation only (never a value).

Concurrency: on PostgreSQL claims use ``FOR UPDATE SKIP LOCKED``; on SQLite every write
transaction starts with ``BEGIN IMMEDIATE`` (see ``db.engine``) so the select-then-update
of a claim is serialised by the database write lock.

Owners (``lease_owner``) must be unique per worker (host, pid and a random suffix): the
lease is what lets a stale worker be ignored.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import cast, Any, TypedDict

from sqlalchemy import Engine, Table, and_, bindparam, case, exists, func, insert, or_, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Dialect

from deid_router.db.driver import DriverStatement, driver_transaction
from deid_router.db.engine import read_tx, write_tx
from deid_router.db.models import (
    AuditEvent, Crosswalk, DestinationState, Instance, Job, QuarantineRow, SecretFingerprint, utc_now,
)
from deid_router.db.models import JobEvent as JobEventRow
from deid_router.errors import QueueError
from deid_router.jobs.outcome import Outcome, OutcomeKind
from deid_router.jobs.policy import Decision, RetryPolicy, decide
from deid_router.jobs.states import ALL_STATES, LIVE_STATES, JobState, assert_transition

__all__ = [
    "ClaimedJob",
    "EnqueueResult",
    "DestinationDetail",
    "JobEvent",
    "JobRepository",
    "JobSummary",
    "PurgeResult",
    "NewInstance",
    "QuarantineEntry",
    "StatusCounts",
    "new_instance_id",
]

CONFLICT_REASON = "conflict_same_sop_instance_uid"
_NON_TERMINAL = (JobState.QUEUED.value, JobState.RUNNING.value, JobState.RETRYING.value)
_IN_CHUNK = 500  # keep IN (...) lists well under SQLite's variable limit


_Q_COLS = (
    QuarantineRow.id, QuarantineRow.instance_id, QuarantineRow.job_id, QuarantineRow.reason, QuarantineRow.detail,
    QuarantineRow.created_at, QuarantineRow.released_at, QuarantineRow.purged_at,
)


def new_instance_id() -> str:
    """A fresh instance id (uuid4 hex): also the raw file's name, never derived from a UID."""
    return uuid.uuid4().hex


@dataclass(frozen=True)
class NewInstance:
    instance_id: str
    sop_key: str
    content_sha256: str
    raw_path: str
    size: int
    sop_class_uid: str
    transfer_syntax: str
    calling_aet: str
    called_aet: str
    modality: str


@dataclass(frozen=True)
class EnqueueResult:
    instance_id: str
    job_ids: list[int]
    duplicate: bool  # nothing new to do: the caller deletes its new raw file
    conflict: bool  # same SOP Instance UID, different content: quarantined, never sent


@dataclass(frozen=True)
class ClaimedJob:
    job_id: int
    instance_id: str
    destination: str
    attempts: int
    raw_path: str
    sop_class_uid: str
    transfer_syntax: str
    sop_key: str
    profile: str = ""  # the de-identification profile; "": [deid]


@dataclass(frozen=True)
class JobEvent:
    at: datetime
    from_state: str | None
    to_state: str
    attempt: int
    status_code: int | None
    reason: str


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
class PurgeResult:
    entries: int  # quarantine entries purged by this call
    jobs_closed: int  # failed jobs moved to ``purged``
    raw_paths: list[str]  # raw files the caller deletes, then marks with ``mark_raw_path_deleted``


@dataclass(frozen=True)
class DestinationDetail:
    oldest_job_at: datetime | None  # oldest job not yet done (queued, running, retrying)
    next_retry_at: datetime | None
    last_error_reason: str | None
    last_error_status: int | None
    last_error_at: datetime | None


@dataclass(frozen=True)
class CommitState:
    """What the queue knows of one SOP instance, for storage commitment."""

    sop_class_uid: str
    delivered: bool  # every job of it is done
    failed: bool  # some job of it failed (quarantined)


class StatusCounts(TypedDict):
    jobs: dict[str, int]
    destinations: dict[str, dict[str, int]]
    quarantined: int


def _zero_counts() -> dict[str, int]:
    return {s.value: 0 for s in ALL_STATES}


def _chunks(ids: Sequence[int]) -> Iterator[Sequence[int]]:
    for i in range(0, len(ids), _IN_CHUNK):
        yield ids[i : i + _IN_CHUNK]


# Hot-path statements, built once: Core inserts on the tables with parameters at execute time
# are compiled once and cached, where ORM ``insert(Model).values(...)`` is rebuilt per call.
_INSTANCES = cast(Table, Instance.__table__)
_SELECT_BY_SOP_KEY = select(_INSTANCES.c.id, _INSTANCES.c.content_sha256).where(
    _INSTANCES.c.sop_key == bindparam("sop_key")
)
_INSERT_INSTANCE = insert(_INSTANCES)
_JOBS = cast(Table, Job.__table__)
_INSERT_JOB = insert(_JOBS).returning(_JOBS.c.id)
_INSERT_EVENT = insert(cast(Table, JobEventRow.__table__))
_ADVISORY_LOCK = "SELECT pg_advisory_xact_lock(hashtextextended(:k, 0))"


class _EnqueueStatements:
    """The enqueue of a new instance, compiled once for the engine (see ``db.driver``)."""

    def __init__(self, dialect: Dialect) -> None:
        instance_keys = [c.key for c in _INSTANCES.columns]
        job_keys = [c.key for c in _JOBS.columns if c.key != "id"]
        event_keys = ["job_id", "at", "from_state", "to_state", "attempt", "status_code", "reason"]
        self.lock = DriverStatement(text(_ADVISORY_LOCK), dialect)
        self.by_sop_key = DriverStatement(_SELECT_BY_SOP_KEY, dialect)
        self.instance = DriverStatement(_INSERT_INSTANCE, dialect, instance_keys)
        self.job = DriverStatement(_INSERT_JOB, dialect, job_keys)
        self.event = DriverStatement(_INSERT_EVENT, dialect, event_keys)

# The claim a worker lane makes many times a second: due jobs of one destination.
_J = _JOBS.c
# An operator paused the destination (console / API): none of its jobs is due until resumed.
_NOT_PAUSED = ~exists().where(DestinationState.destination == _J.destination, DestinationState.paused.is_(True))
_DUE_FOR_DESTINATION = (
    or_(_J.state == JobState.QUEUED.value, and_(_J.state == JobState.RETRYING.value, _J.run_after <= bindparam("now"))),
    _J.destination == bindparam("destination"),
    _NOT_PAUSED,
)
_CLAIM_PROBE = select(_J.id).where(*_DUE_FOR_DESTINATION).limit(1)
_CLAIM_PICK = (
    select(_J.id, _J.state, _J.attempts).where(*_DUE_FOR_DESTINATION)
    .order_by(_J.run_after, _J.id).limit(bindparam("limit")).with_for_update(skip_locked=True)
)
_CLAIM_TAKE = (
    update(_JOBS).where(_J.id.in_(bindparam("ids", expanding=True)))
    .values(state=JobState.RUNNING.value, attempts=_J.attempts + 1, lease_owner=bindparam("b_owner"),
            lease_expires_at=bindparam("b_expires"), updated_at=bindparam("b_now"))
)
_FINISH_LOCK = (
    select(_J.id, _J.state, _J.attempts, _J.instance_id)
    .where(_J.id.in_(bindparam("ids", expanding=True)), _J.lease_owner == bindparam("owner"),
           _J.state == JobState.RUNNING.value)
    .order_by(_J.id).with_for_update()
)
_FINISH_SET = (
    update(_JOBS).where(_J.id.in_(bindparam("ids", expanding=True)))
    .values(state=bindparam("b_state"), run_after=bindparam("b_run_after"), lease_owner=None,
            lease_expires_at=None, last_status=bindparam("b_status"), last_reason=bindparam("b_reason"),
            updated_at=bindparam("b_now"), attempts=bindparam("b_attempts"))
)
_CLAIMED_ROWS = (
    select(_J.id, _J.instance_id, _J.destination, _J.attempts, _INSTANCES.c.raw_path, _INSTANCES.c.sop_class_uid,
           _INSTANCES.c.transfer_syntax, _INSTANCES.c.sop_key, _J.profile)
    .join(_INSTANCES, _INSTANCES.c.id == _J.instance_id)
    .where(_J.id.in_(bindparam("ids", expanding=True)))
    .order_by(_J.run_after, _J.id)
)


class JobRepository:
    """Durable queue operations on an engine made by ``db.engine.make_engine``."""

    def __init__(self, engine: Engine, clock: Callable[[], datetime] = utc_now) -> None:
        self._engine = engine
        self._clock = clock
        self._pg = engine.dialect.name == "postgresql"
        self._fast = _EnqueueStatements(engine.dialect)

    @property
    def engine(self) -> Engine:
        return self._engine

    # ------------------------------------------------------------------ plumbing

    def _tx(self, op: str) -> AbstractContextManager[Connection]:
        """One write transaction (``db.engine.write_tx``)."""
        return write_tx(self._engine, op)

    def _read(self, op: str) -> AbstractContextManager[Connection]:
        """A read-only transaction (``db.engine.read_tx``)."""
        return read_tx(self._engine, op)

    @staticmethod
    def _event(
        conn: Connection,
        rows: Sequence[dict[str, Any]],
    ) -> None:
        if rows:
            conn.execute(_INSERT_EVENT, list(rows))

    @staticmethod
    def _ev(
        job_id: int, at: datetime, src: str | None, dst: str, attempt: int,
        status: int | None = None, reason: str = "",
    ) -> dict[str, Any]:
        assert_transition(src, dst)
        return {"job_id": job_id, "at": at, "from_state": src, "to_state": dst, "attempt": attempt,
                "status_code": status, "reason": reason}

    # ------------------------------------------------------------------ enqueue

    def enqueue(self, inst: NewInstance, destinations: Sequence[str | tuple[str, str]]) -> EnqueueResult:
        """Insert the instance and one queued job per destination, in ONE transaction.

        A destination is a name, or a (name, profile) pair: one job per pair, so one instance
        can go de-identified two ways to two places (a bare name is profile "", [deid]).

        A re-send of identical content that already has live (or delivered) jobs creates
        nothing (``duplicate``); a re-send with the same SOP key but different content is
        kept and quarantined (``conflict``), never overwriting what was received first.

        The acknowledgement waits for this: the usual case, an instance never seen before,
        runs on the driver's cursor (:mod:`deid_router.db.driver`); a re-send is decided in a
        second transaction by :meth:`_enqueue_again`.
        """
        dests = list(dict.fromkeys((d, "") if isinstance(d, str) else (d[0], d[1]) for d in destinations))
        if not dests:
            raise ValueError("enqueue needs at least one destination (an unrouted raw file would never be purged)")
        now = self._clock()
        fast = self._fast
        with driver_transaction(self._engine, "enqueue") as cur:
            if self._pg:
                # Serialise concurrent re-sends of the same instance (SQLite: BEGIN IMMEDIATE).
                cur.execute(fast.lock.sql, fast.lock.args({"k": inst.sop_key}))
            cur.execute(fast.by_sop_key.sql, fast.by_sop_key.args({"sop_key": inst.sop_key}))
            seen = bool(cur.fetchall())
            if not seen:
                job_ids = []
                cur.execute(fast.instance.sql, fast.instance.args(self._instance_row(inst, now)))
                for dest in dests:
                    cur.execute(fast.job.sql, fast.job.args(self._job_row(inst, dest, JobState.QUEUED, "", now)))
                    job_ids.append(int(cur.fetchone()[0]))
                self._events_on_cursor(
                    cur, [self._ev(j, now, None, JobState.QUEUED.value, 0, None, "received") for j in job_ids]
                )
        if seen:
            return self._enqueue_again(inst, dests, now)
        return EnqueueResult(instance_id=inst.instance_id, job_ids=job_ids, duplicate=False, conflict=False)

    def _events_on_cursor(self, cur: Any, rows: Sequence[dict[str, Any]]) -> None:
        cur.executemany(self._fast.event.sql, [self._fast.event.args(r) for r in rows])

    @staticmethod
    def _instance_row(inst: NewInstance, now: datetime) -> dict[str, Any]:
        return {
            "id": inst.instance_id, "sop_key": inst.sop_key, "content_sha256": inst.content_sha256,
            "raw_path": inst.raw_path, "size": inst.size, "sop_class_uid": inst.sop_class_uid,
            "transfer_syntax": inst.transfer_syntax, "calling_aet": inst.calling_aet,
            "called_aet": inst.called_aet, "modality": inst.modality, "received_at": now,
            "raw_deleted_at": None,
        }

    @staticmethod
    def _job_row(
        inst: NewInstance, target: tuple[str, str], state: JobState, reason: str, now: datetime
    ) -> dict[str, Any]:
        dest, profile = target
        return {
            "instance_id": inst.instance_id, "destination": dest, "profile": profile, "state": state.value, "attempts": 0,
            "run_after": now, "last_reason": reason, "created_at": now, "updated_at": now,
            "lease_owner": None, "lease_expires_at": None, "last_status": None,
        }

    def _enqueue_again(self, inst: NewInstance, dests: list[tuple[str, str]], now: datetime) -> EnqueueResult:
        """Enqueue an instance whose SOP key is known: a duplicate, a new route, or a conflict."""
        with self._tx("enqueue") as conn:
            if self._pg:
                conn.execute(text(_ADVISORY_LOCK), {"k": inst.sop_key})
            existing = conn.execute(_SELECT_BY_SOP_KEY, {"sop_key": inst.sop_key}).all()
            same = [r.id for r in existing if r.content_sha256 == inst.content_sha256]
            conflict = any(r.content_sha256 != inst.content_sha256 for r in existing)
            covered: set[tuple[str, str]] = set()
            if same:
                covered = {
                    (r.destination, r.profile)
                    for r in conn.execute(
                        select(Job.destination, Job.profile).where(
                            Job.instance_id.in_(same),
                            Job.destination.in_([d for d, _ in dests]),
                            Job.state.in_([s.value for s in LIVE_STATES]),
                        )
                    )
                }
            needed = [d for d in dests if d not in covered]
            if not needed:
                return EnqueueResult(instance_id=same[0], job_ids=[], duplicate=True, conflict=False)
            conn.execute(_INSERT_INSTANCE, self._instance_row(inst, now))
            state = JobState.FAILED if conflict else JobState.QUEUED
            reason = CONFLICT_REASON if conflict else ""
            job_ids: list[int] = []
            events: list[dict[str, Any]] = []
            for dest in needed:
                job_id = conn.execute(_INSERT_JOB, self._job_row(inst, dest, state, reason, now)).scalar_one()
                job_ids.append(job_id)
                events.append(self._ev(job_id, now, None, state.value, 0, None, reason or "received"))
            self._event(conn, events)
            if conflict:
                conn.execute(
                    insert(QuarantineRow).values(
                        instance_id=inst.instance_id, job_id=None, reason=CONFLICT_REASON,
                        detail="a different instance with the same SOP Instance UID was received earlier",
                        created_at=now,
                    )
                )
        return EnqueueResult(instance_id=inst.instance_id, job_ids=job_ids, duplicate=False, conflict=conflict)

    # ------------------------------------------------------------------ claim / lease

    def _due(self, now: datetime) -> Any:
        return and_(
            or_(Job.state == JobState.QUEUED.value, and_(Job.state == JobState.RETRYING.value, Job.run_after <= now)),
            _NOT_PAUSED,
        )

    def claim(
        self,
        owner: str,
        lease_seconds: float,
        limit: int,
        destination: str | None = None,
        exclude_destinations: Collection[str] = (),
    ) -> list[ClaimedJob]:
        """Atomically take up to ``limit`` due jobs, oldest ``run_after`` first.

        Two claimers never get the same job: PostgreSQL skips rows another transaction has
        locked; SQLite holds the write lock for the whole select-then-update.
        """
        if limit <= 0:
            return []
        now = self._clock()
        expires = now + timedelta(seconds=lease_seconds)
        params: dict[str, Any] = {"now": now, "limit": limit, "destination": destination}
        if destination is not None and not exclude_destinations:
            probe, pick = _CLAIM_PROBE, _CLAIM_PICK  # built once: the lanes' hot path
        else:
            due = [self._due(now)]
            if destination is not None:
                due.append(Job.destination == destination)
            if exclude_destinations:
                due.append(Job.destination.not_in(list(exclude_destinations)))
            probe = select(Job.id).where(*due).limit(1)
            pick = select(Job.id, Job.state, Job.attempts).where(*due).order_by(Job.run_after, Job.id)
            pick = pick.limit(limit).with_for_update(skip_locked=True)
        # Idle workers poll often: look before taking SQLite's single write lock, which the
        # listener needs for every acknowledged instance.
        with self._read("claim_probe") as conn:
            if conn.execute(probe, params).first() is None:
                return []
        with self._tx("claim") as conn:
            picked = conn.execute(pick, params).all()
            if not picked:
                return []
            ids = [r.id for r in picked]
            events = [
                self._ev(r.id, now, r.state, JobState.RUNNING.value, r.attempts + 1, None, "claimed")
                for r in picked
            ]
            conn.execute(_CLAIM_TAKE, {"ids": ids, "b_owner": owner, "b_expires": expires, "b_now": now})
            self._event(conn, events)
            rows = conn.execute(_CLAIMED_ROWS, {"ids": ids}).all()
        return [
            ClaimedJob(
                job_id=r.id, instance_id=r.instance_id, destination=r.destination, attempts=r.attempts,
                raw_path=r.raw_path, sop_class_uid=r.sop_class_uid, transfer_syntax=r.transfer_syntax,
                sop_key=r.sop_key, profile=r.profile,
            )
            for r in rows
        ]

    def next_due_destinations(self) -> list[str]:
        """Destinations with due jobs, most overdue first, so a dispatcher can serve each fairly."""
        now = self._clock()
        with self._read("next_due_destinations") as conn:
            rows = conn.execute(
                select(Job.destination, func.min(Job.run_after).label("first"))
                .where(self._due(now))
                .group_by(Job.destination)
                .order_by("first", Job.destination)
            ).all()
        return [r.destination for r in rows]

    def heartbeat(self, owner: str, job_ids: Sequence[int], lease_seconds: float) -> int:
        """Extend the leases ``owner`` still holds; returns how many were extended.

        A count lower than ``len(job_ids)`` means some leases were lost (requeued).
        """
        if not job_ids:
            return 0
        now = self._clock()
        n = 0
        with self._tx("heartbeat") as conn:
            for chunk in _chunks(sorted(job_ids)):
                # Skip rows another transaction holds: that is this worker finishing them. Waiting
                # for them instead could deadlock with finish_many, whose lost commit would make
                # the lease expire and the instance be sent a second time.
                held = conn.execute(
                    select(Job.id)
                    .where(Job.id.in_(chunk), Job.lease_owner == owner, Job.state == JobState.RUNNING.value)
                    .order_by(Job.id)
                    .with_for_update(skip_locked=True)
                ).scalars().all()
                if held:
                    res = conn.execute(
                        update(Job)
                        .where(Job.id.in_(held), Job.lease_owner == owner, Job.state == JobState.RUNNING.value)
                        .values(lease_expires_at=now + timedelta(seconds=lease_seconds), updated_at=now)
                    )
                    n += res.rowcount
        return n

    def finish(self, job_id: int, owner: str, decision: Decision) -> bool:
        """Apply ``policy.decide``'s decision; False (and no write) if ``owner`` lost the lease.

        A worker whose lease expired and whose job was re-queued or re-claimed must not
        overwrite the newer state.
        """
        return self.finish_many(owner, [(job_id, decision)])[0]

    def finish_many(self, owner: str, decisions: Sequence[tuple[int, Decision]]) -> list[bool]:
        """``finish`` for a whole batch in one transaction (one commit, one write-lock hold).

        The rows are locked in id order (one lock order everywhere), then jobs that end alike
        (same state, timing, status, reason and attempts: a delivered batch) share one UPDATE.
        """
        now = self._clock()
        held: dict[int, Any] = {}
        with self._tx("finish") as conn:
            for chunk in _chunks(sorted({job_id for job_id, _ in decisions})):
                for r in conn.execute(_FINISH_LOCK, {"ids": list(chunk), "owner": owner}):
                    held[r.id] = r
            alike: dict[tuple[str, datetime, int | None, str, int], list[int]] = {}
            events: list[dict[str, Any]] = []
            quarantined: list[dict[str, Any]] = []
            for job_id, decision in decisions:
                row = held.get(job_id)
                if row is None:
                    continue  # the lease was lost: a newer state must not be overwritten
                dst = decision.to_state.value
                events.append(self._ev(job_id, now, row.state, dst, row.attempts, decision.status_code, decision.reason))
                attempts = max(row.attempts - 1, 0) if decision.refund_attempt else row.attempts
                key = (dst, decision.run_after or now, decision.status_code, decision.reason, attempts)
                alike.setdefault(key, []).append(job_id)
                if decision.quarantine:
                    quarantined.append({
                        "instance_id": row.instance_id, "job_id": job_id, "reason": decision.reason,
                        "detail": f"attempt {row.attempts}", "created_at": now,
                    })
            for (dst, run_after, status, reason, attempts), job_ids in alike.items():
                for chunk in _chunks(job_ids):
                    conn.execute(_FINISH_SET, {
                        "ids": list(chunk), "b_state": dst, "b_run_after": run_after, "b_status": status,
                        "b_reason": reason, "b_now": now, "b_attempts": attempts,
                    })
            self._event(conn, events)
            if quarantined:
                conn.execute(insert(QuarantineRow), quarantined)
        return [job_id in held for job_id, _ in decisions]

    def _requeue_running(
        self, conn: Connection, where: Any, reason: str, refund: bool, policy: RetryPolicy | None = None
    ) -> int:
        now = self._clock()
        rows = conn.execute(
            select(Job.id, Job.state, Job.attempts, Job.instance_id)
            .where(Job.state == JobState.RUNNING.value, where)
            .with_for_update(skip_locked=True)
        ).all()
        if not rows:
            return 0
        events = []
        requeue: list[int] = []
        for r in rows:
            if policy is not None and r.attempts >= policy.max_attempts:
                # A job whose workers keep dying is a poison instance: let the policy fail it.
                d = decide(r.attempts, Outcome(OutcomeKind.RETRY, None, reason), policy, now)
                events.append(self._ev(r.id, now, r.state, d.to_state.value, r.attempts, None, d.reason))
                conn.execute(
                    update(Job).where(Job.id == r.id).values(
                        state=d.to_state.value, run_after=d.run_after or now, lease_owner=None,
                        lease_expires_at=None, last_reason=d.reason, updated_at=now,
                    )
                )
                if d.quarantine:
                    conn.execute(
                        insert(QuarantineRow).values(
                            instance_id=r.instance_id, job_id=r.id, reason=d.reason,
                            detail=f"attempt {r.attempts}", created_at=now,
                        )
                    )
                continue
            attempt = max(0, r.attempts - 1) if refund else r.attempts
            events.append(self._ev(r.id, now, r.state, JobState.QUEUED.value, attempt, None, reason))
            requeue.append(r.id)
        for chunk in _chunks(requeue):
            conn.execute(
                update(Job)
                .where(Job.id.in_(chunk))
                .values(
                    state=JobState.QUEUED.value,
                    attempts=case((Job.attempts > 0, Job.attempts - 1), else_=0) if refund else Job.attempts,
                    lease_owner=None, lease_expires_at=None, run_after=now, last_reason=reason, updated_at=now,
                )
            )
        self._event(conn, events)
        return len(rows)

    def release(self, owner: str, job_ids: Sequence[int] | None = None) -> int:
        """Give running jobs back at shutdown (running -> queued); the attempt is refunded."""
        with self._tx("release") as conn:
            where: Any = Job.lease_owner == owner
            if job_ids is not None:
                if not job_ids:
                    return 0
                where = and_(where, Job.id.in_(list(job_ids)))
            return self._requeue_running(conn, where, "released", refund=True)

    def requeue_stale(self, policy: RetryPolicy | None = None) -> int:
        """Running jobs whose lease expired go back to the queue; the attempt stays counted.

        With ``policy``, a stale job that already used ``max_attempts`` is failed and
        quarantined instead (``max_attempts_exceeded: lease_expired``), so an instance that
        crashes every worker cannot loop forever. Returns the number of stale jobs handled.
        """
        now = self._clock()
        with self._tx("requeue_stale") as conn:
            return self._requeue_running(conn, Job.lease_expires_at < now, "lease_expired", False, policy)

    # ------------------------------------------------------------------ operator actions

    def _requeue_failed(self, conn: Connection, job_rows: Sequence[Any], reason: str) -> list[int]:
        """failed/retrying -> queued with attempts reset; release their quarantine rows."""
        now = self._clock()
        ids: list[int] = []
        events = []
        for r in job_rows:
            events.append(self._ev(r.id, now, r.state, JobState.QUEUED.value, 0, None, reason))
            ids.append(r.id)
        if not ids:
            return []
        instance_ids = sorted({r.instance_id for r in job_rows})
        for chunk in _chunks(ids):
            conn.execute(
                update(Job).where(Job.id.in_(chunk)).values(
                    state=JobState.QUEUED.value, attempts=0, run_after=now, lease_owner=None,
                    lease_expires_at=None, last_reason=reason, updated_at=now,
                )
            )
            conn.execute(
                update(QuarantineRow)
                .where(QuarantineRow.job_id.in_(chunk), QuarantineRow.released_at.is_(None),
                       QuarantineRow.purged_at.is_(None))
                .values(released_at=now)
            )
        self._event(conn, events)
        # Instance-level entries (conflicts) are released once no job of the instance is failed.
        still_failed = exists().where(
            Job.instance_id == QuarantineRow.instance_id, Job.state == JobState.FAILED.value
        )
        for ichunk in range(0, len(instance_ids), _IN_CHUNK):
            conn.execute(
                update(QuarantineRow)
                .where(
                    QuarantineRow.instance_id.in_(instance_ids[ichunk : ichunk + _IN_CHUNK]),
                    QuarantineRow.job_id.is_(None), QuarantineRow.released_at.is_(None),
                    QuarantineRow.purged_at.is_(None), ~still_failed,
                )
                .values(released_at=now)
            )
        return ids

    def _retryable(self) -> Any:
        """Jobs whose raw file is still held: a purged instance cannot be sent again."""
        return select(Job.id, Job.state, Job.instance_id).join(Instance, Instance.id == Job.instance_id).where(
            Instance.raw_deleted_at.is_(None)
        )

    def retry_job(self, job_id: int) -> bool:
        """Operator retry of one job (failed or waiting): True if it is queued or further along.

        Idempotent: retrying a job that is already queued, running or done changes nothing.
        """
        with self._tx("retry_job") as conn:
            state = conn.execute(select(Job.state).where(Job.id == job_id).with_for_update()).scalar()
            if state is None:
                return False
            if state in (JobState.QUEUED.value, JobState.RUNNING.value, JobState.DONE.value):
                return True
            rows = conn.execute(self._retryable().where(Job.id == job_id)).all()
            if not rows:
                return False
            self._requeue_failed(conn, rows, "operator_retry")
            return True

    def retry_failed(self) -> int:
        """Operator retry of every failed job whose raw file is still held; returns the count."""
        with self._tx("retry_failed") as conn:
            rows = conn.execute(
                self._retryable().where(Job.state == JobState.FAILED.value).with_for_update(of=Job)
            ).all()
            return len(self._requeue_failed(conn, rows, "operator_retry"))

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
        out = []
        for q in rows:
            dest, raw_path = q.destination, q.raw_path
            out.append(
                QuarantineEntry(
                    id=q.id, instance_id=q.instance_id, job_id=q.job_id, destination=dest, reason=q.reason,
                    detail=q.detail, created_at=q.created_at, released_at=q.released_at, purged_at=q.purged_at,
                    raw_path=raw_path, modality=q.modality, sop_class_uid=q.sop_class_uid,
                    transfer_syntax=q.transfer_syntax, calling_aet=q.calling_aet, called_aet=q.called_aet,
                    size=q.size, received_at=q.received_at, raw_deleted_at=q.raw_deleted_at,
                )
            )
        return out

    def quarantine_list(self, include_closed: bool = False) -> list[QuarantineEntry]:
        """Open entries (neither released nor purged), oldest first; all with ``include_closed``."""
        with self._read("quarantine_list") as conn:
            where: Any = True if include_closed else and_(
                QuarantineRow.released_at.is_(None), QuarantineRow.purged_at.is_(None)
            )
            return self._entry(conn, where)

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
            events = self._events(conn, job_ids)
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
                self._retryable().where(where, Job.state.in_([JobState.FAILED.value, JobState.RETRYING.value]))
            ).all()
            self._requeue_failed(conn, rows, "quarantine_release")
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
            conn.execute(
                update(QuarantineRow)
                .where(QuarantineRow.released_at.is_(None), QuarantineRow.purged_at.is_(None))
                .values(purged_at=now)
            )
            pending = exists().where(Job.instance_id == Instance.id, Job.state.in_(_NON_TERMINAL))
            purged = exists().where(QuarantineRow.instance_id == Instance.id, QuarantineRow.purged_at.is_not(None))
            return list(
                conn.execute(
                    select(Instance.raw_path)
                    .where(Instance.raw_deleted_at.is_(None), purged, ~pending)
                    .order_by(Instance.raw_path)
                ).scalars()
            )

    def quarantine_size(self) -> int:
        """Number of open quarantine entries."""
        with self._read("quarantine_size") as conn:
            return int(
                conn.execute(
                    select(func.count()).select_from(QuarantineRow)
                    .where(QuarantineRow.released_at.is_(None), QuarantineRow.purged_at.is_(None))
                ).scalar_one()
            )

    # ------------------------------------------------------------------ reporting / housekeeping

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
            quarantined = conn.execute(
                select(func.count()).select_from(QuarantineRow)
                .where(QuarantineRow.released_at.is_(None), QuarantineRow.purged_at.is_(None))
            ).scalar_one()
        jobs = _zero_counts()
        per: dict[str, dict[str, int]] = {d: _zero_counts() for d in destinations}
        for dest, state, n in rows:
            jobs[state] = jobs.get(state, 0) + int(n)
            per.setdefault(dest, _zero_counts())[state] = int(n)
        return {"jobs": jobs, "destinations": dict(sorted(per.items())), "quarantined": int(quarantined)}

    def purgeable_instances(self, older_than: datetime) -> list[tuple[str, str]]:
        """``(instance_id, raw_path)`` of delivered instances whose raw file may now be deleted.

        All jobs done, the last one before ``older_than``, raw still present and no open
        quarantine entry.
        """
        not_done = exists().where(Job.instance_id == Instance.id, Job.state != JobState.DONE.value)
        open_q = exists().where(
            QuarantineRow.instance_id == Instance.id, QuarantineRow.released_at.is_(None),
            QuarantineRow.purged_at.is_(None),
        )
        last_done = select(func.max(Job.updated_at)).where(Job.instance_id == Instance.id).scalar_subquery()
        with self._read("purgeable_instances") as conn:
            rows = conn.execute(
                select(Instance.id, Instance.raw_path)
                .where(Instance.raw_deleted_at.is_(None), ~not_done, ~open_q, last_done < older_than)
                .order_by(Instance.received_at)
            ).all()
        return [(r.id, r.raw_path) for r in rows]

    def known_raw_paths(self, raw_paths: Sequence[str]) -> set[str]:
        """Which of ``raw_paths`` belong to a committed instance (the rest are orphans of a crash)."""
        known: set[str] = set()
        with self._read("known_raw_paths") as conn:
            for i in range(0, len(raw_paths), _IN_CHUNK):
                chunk = list(raw_paths[i : i + _IN_CHUNK])
                known.update(conn.execute(select(Instance.raw_path).where(Instance.raw_path.in_(chunk))).scalars())
        return known

    def mark_raw_deleted(self, instance_id: str) -> None:
        """Record that the raw file of ``instance_id`` is gone (it can no longer be retried)."""
        now = self._clock()
        with self._tx("mark_raw_deleted") as conn:
            conn.execute(
                update(Instance).where(Instance.id == instance_id, Instance.raw_deleted_at.is_(None))
                .values(raw_deleted_at=now)
            )

    def mark_raw_path_deleted(self, raw_path: str) -> None:
        """Same as :meth:`mark_raw_deleted`, for the paths returned by :meth:`quarantine_purge`."""
        now = self._clock()
        with self._tx("mark_raw_deleted") as conn:
            conn.execute(
                update(Instance).where(Instance.raw_path == raw_path, Instance.raw_deleted_at.is_(None))
                .values(raw_deleted_at=now)
            )

    @staticmethod
    def _events(conn: Connection, job_ids: Sequence[int]) -> list[JobEvent]:
        if not job_ids:
            return []
        rows = conn.execute(
            select(JobEventRow.at, JobEventRow.from_state, JobEventRow.to_state, JobEventRow.attempt,
                   JobEventRow.status_code, JobEventRow.reason)
            .where(JobEventRow.job_id.in_(list(job_ids))).order_by(JobEventRow.id)
        ).all()
        return [JobEvent(r.at, r.from_state, r.to_state, r.attempt, r.status_code, r.reason) for r in rows]

    def job_events(self, job_id: int) -> list[JobEvent]:
        """The job's history, oldest first."""
        with self._read("job_events") as conn:
            return self._events(conn, [job_id])

    def job_state(self, job_id: int) -> tuple[str, int] | None:
        """``(state, attempts)`` of one job, for operators and tests."""
        with self._read("job_state") as conn:
            row = conn.execute(select(Job.state, Job.attempts).where(Job.id == job_id)).first()
        return None if row is None else (row.state, row.attempts)

    # ------------------------------------------------------------------ crosswalk / audit

    def crosswalk_record(
        self, kind: str, token: str, pseudonym: str, original_encrypted: bytes, scope: str = "default"
    ) -> bool:
        """Insert a mapping; a concurrent or repeated first sighting is a no-op.

        Returns True when this call inserted the row. Tokens are keyed per scope, so two
        scopes never share a row.
        """
        values = {"kind": kind, "token": token, "pseudonym": pseudonym, "scope": scope,
                  "original_encrypted": original_encrypted, "created_at": self._clock()}
        stmt: Any
        if self._pg:
            stmt = postgresql.insert(Crosswalk).values(**values).on_conflict_do_nothing(
                index_elements=["kind", "token"]
            )
        else:
            stmt = sqlite.insert(Crosswalk).values(**values).on_conflict_do_nothing(index_elements=["kind", "token"])
        with self._tx("crosswalk_record") as conn:
            # Explicit RETURNING: rowcount is unreliable once the dialect adds implicit RETURNING.
            return conn.execute(stmt.returning(Crosswalk.id)).first() is not None

    def crosswalk_record_many(self, rows: Sequence[tuple[str, str, str, bytes]], scope: str = "default") -> None:
        """``crosswalk_record`` for many ``(kind, token, pseudonym, original_encrypted)`` rows of
        ``scope`` in one transaction; repeats are no-ops (the insert lives in ``db/crosswalk_rows.py``)."""
        from deid_router.db.crosswalk_rows import insert_rows

        with self._tx("crosswalk_record_many") as conn:
            insert_rows(conn, rows, self._clock(), scope)

    def crosswalk_lookup(self, pseudonym: str, scope: str = "default") -> list[tuple[str, bytes]]:
        """``(kind, original_encrypted)`` for a pseudonym of ``scope`` (callers audit the lookup)."""
        with self._read("crosswalk_lookup") as conn:
            rows = conn.execute(
                select(Crosswalk.kind, Crosswalk.original_encrypted)
                .where(Crosswalk.pseudonym == pseudonym, Crosswalk.scope == scope).order_by(Crosswalk.id)
            ).all()
        return [(r.kind, bytes(r.original_encrypted)) for r in rows]

    def crosswalk_all(self, scope: str = "default") -> Iterator[tuple[str, str, bytes]]:
        """Every ``(kind, pseudonym, original_encrypted)`` of ``scope``, in pages of 1000 (for exports)."""
        last = 0
        while True:
            with self._read("crosswalk_all") as conn:
                rows = conn.execute(
                    select(Crosswalk.id, Crosswalk.kind, Crosswalk.pseudonym, Crosswalk.original_encrypted)
                    .where(Crosswalk.id > last, Crosswalk.scope == scope).order_by(Crosswalk.id).limit(1000)
                ).all()
            if not rows:
                return
            for r in rows:
                yield (r.kind, r.pseudonym, bytes(r.original_encrypted))
            last = rows[-1].id

    def crosswalk_count(self) -> int:
        """Number of crosswalk rows."""
        with self._read("crosswalk_count") as conn:
            return int(conn.execute(select(func.count()).select_from(Crosswalk)).scalar_one())

    def audit(self, action: str, actor: str, detail: str) -> None:
        """Append an audit record (crosswalk lookups and exports, operator actions)."""
        with self._tx("audit") as conn:
            conn.execute(insert(AuditEvent).values(at=self._clock(), action=action, actor=actor, detail=detail))

    def audit_events(self) -> list[tuple[datetime, str, str, str]]:
        """All audit records, oldest first."""
        with self._read("audit_events") as conn:
            rows = conn.execute(
                select(AuditEvent.at, AuditEvent.action, AuditEvent.actor, AuditEvent.detail).order_by(AuditEvent.id)
            ).all()
        return [(r.at, r.action, r.actor, r.detail) for r in rows]

    def commitment_state(self, sop_keys: Sequence[str]) -> dict[str, CommitState]:
        """Held instances among ``sop_keys`` (keyed SOP Instance UID tokens): the SOP class,
        and whether every job of theirs is done or some failed. A row exists only once its raw
        file was fsync'd and its jobs committed: what 0x0000 promised."""
        found: dict[str, tuple[str, list[str]]] = {}
        keys = list(sop_keys)
        with self._read("commitment_state") as conn:
            for start in range(0, len(keys), _IN_CHUNK):
                rows = conn.execute(
                    select(Instance.sop_key, Instance.sop_class_uid, Job.state)
                    .join(Job, Job.instance_id == Instance.id, isouter=True)
                    .where(Instance.sop_key.in_(keys[start : start + _IN_CHUNK]))
                ).all()
                for r in rows:
                    entry = found.setdefault(r.sop_key, (r.sop_class_uid, []))
                    if r.state is not None:
                        entry[1].append(r.state)
        return {
            key: CommitState(
                sop_class_uid=cls,
                delivered=bool(states) and all(s == JobState.DONE.value for s in states),
                failed=any(s in (JobState.FAILED.value, JobState.PURGED.value) for s in states),
            )
            for key, (cls, states) in found.items()
        }

    # ------------------------------------------------------------------ secret fingerprint

    def secret_fingerprint(self) -> str | None:
        """The fingerprint of the secret this database was first started with, if recorded."""
        with self._read("secret_fingerprint") as conn:
            return conn.execute(select(SecretFingerprint.fingerprint).where(SecretFingerprint.id == 1)).scalar()

    def record_secret_fingerprint(self, fingerprint: str) -> str:
        """Record ``fingerprint`` unless one is recorded; return the one now recorded.

        Nodes starting together agree: the first insert wins, the others read it back.
        """
        values = {"id": 1, "fingerprint": fingerprint, "created_at": self._clock()}
        stmt: Any
        if self._pg:
            stmt = postgresql.insert(SecretFingerprint).values(**values).on_conflict_do_nothing(index_elements=["id"])
        else:
            stmt = sqlite.insert(SecretFingerprint).values(**values).on_conflict_do_nothing(index_elements=["id"])
        with self._tx("record_secret_fingerprint") as conn:
            conn.execute(stmt)
            return str(conn.execute(select(SecretFingerprint.fingerprint).where(SecretFingerprint.id == 1)).scalar_one())

    def holds_keyed_data(self) -> bool:
        """True once anything keyed by the secret is stored (an instance or a crosswalk row)."""
        with self._read("holds_keyed_data") as conn:
            return (
                conn.execute(select(Instance.id).limit(1)).first() is not None
                or conn.execute(select(Crosswalk.id).limit(1)).first() is not None
            )

    # ------------------------------------------------------------------ operator actions (v2)

    _SUMMARY_COLS = (
        Job.id, Job.instance_id, Job.destination, Job.state, Job.attempts, Job.last_status, Job.last_reason,
        Job.created_at, Job.updated_at, Job.run_after, Instance.raw_deleted_at,
    )

    @staticmethod
    def _summary(r: Any) -> JobSummary:
        return JobSummary(
            id=r.id, instance_id=r.instance_id, destination=r.destination, state=r.state, attempts=r.attempts,
            last_status=r.last_status, last_reason=r.last_reason or "", created_at=r.created_at,
            updated_at=r.updated_at, run_after=r.run_after, raw_held=r.raw_deleted_at is None,
        )

    def list_jobs(
        self, states: Sequence[str] = (), destination: str | None = None, ids: Sequence[int] = (),
        limit: int | None = None, oldest_first: bool = False,
    ) -> list[JobSummary]:
        """Jobs filtered by state, destination and ids; newest first unless ``oldest_first``."""
        query = select(*self._SUMMARY_COLS).join(Instance, Instance.id == Job.instance_id)
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
            return [self._summary(r) for r in conn.execute(query).all()]

    def requeue_jobs(self, job_ids: Sequence[int], reason: str = "operator_retry") -> list[int]:
        """Re-queue those of ``job_ids`` still failed or retrying with their raw file held."""
        done: list[int] = []
        with self._tx("requeue_jobs") as conn:
            for chunk in _chunks(sorted(set(job_ids))):
                rows = conn.execute(
                    self._retryable()
                    .where(Job.id.in_(list(chunk)), Job.state.in_([JobState.FAILED.value, JobState.RETRYING.value]))
                    .order_by(Job.id).with_for_update(of=Job)
                ).all()
                done += self._requeue_failed(conn, rows, reason)
        return done

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
            for chunk in _chunks(sorted(set(entry_ids))):
                rows = conn.execute(
                    select(QuarantineRow.id, QuarantineRow.job_id, QuarantineRow.instance_id)
                    .where(QuarantineRow.id.in_(list(chunk)), QuarantineRow.released_at.is_(None),
                           QuarantineRow.purged_at.is_(None))
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
                        self._ev(r.id, now, r.state, JobState.PURGED.value, r.attempts, None, "quarantine_purge")
                        for r in failed
                    ]
                    conn.execute(
                        update(Job).where(Job.id.in_([r.id for r in failed])).values(
                            state=JobState.PURGED.value, updated_at=now, last_reason="quarantine_purge",
                        )
                    )
                    self._event(conn, events)
                    jobs_closed += len(failed)
            open_work = exists().where(
                Job.instance_id == Instance.id, Job.state.not_in([JobState.DONE.value, JobState.PURGED.value])
            )
            purged = exists().where(QuarantineRow.instance_id == Instance.id, QuarantineRow.purged_at.is_not(None))
            paths = list(
                conn.execute(
                    select(Instance.raw_path)
                    .where(Instance.raw_deleted_at.is_(None), purged, ~open_work)
                    .order_by(Instance.raw_path)
                ).scalars()
            )
        return PurgeResult(entries, jobs_closed, paths)

    def destination_details(self) -> dict[str, DestinationDetail]:
        """Per destination with jobs: oldest pending job, next retry, last error (codes only)."""
        pending = [JobState.QUEUED.value, JobState.RUNNING.value, JobState.RETRYING.value]
        out: dict[str, DestinationDetail] = {}
        with self._read("destination_details") as conn:
            names = list(conn.execute(select(Job.destination).distinct().order_by(Job.destination)).scalars())
            for name in names:
                oldest = conn.execute(
                    select(func.min(Job.created_at)).where(Job.destination == name, Job.state.in_(pending))
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

    def held_instances(self) -> list[tuple[str, str]]:
        """``(instance_id, raw_path)`` of every instance whose raw file is still held."""
        with self._read("held_instances") as conn:
            rows = conn.execute(
                select(Instance.id, Instance.raw_path).where(Instance.raw_deleted_at.is_(None))
                .order_by(Instance.received_at, Instance.id)
            ).all()
        return [(r.id, r.raw_path) for r in rows]

    def delivered_count_without_raw(self, destination: str) -> int:
        """Instances delivered to ``destination`` whose raw file is already deleted."""
        with self._read("delivered_count_without_raw") as conn:
            return int(conn.execute(
                select(func.count(func.distinct(Instance.id))).select_from(Instance)
                .join(Job, Job.instance_id == Instance.id)
                .where(Job.destination == destination, Job.state == JobState.DONE.value,
                       Instance.raw_deleted_at.is_not(None))
            ).scalar_one())

    def resend(self, instance_ids: Sequence[str], destination: str, reason: str = "operator_resend") -> list[int]:
        """A new queued job to ``destination`` for each instance delivered there, raw held and
        with no job to it still pending (a second resend before the first is sent adds nothing)."""
        now = self._clock()
        new_ids: list[int] = []
        pending = [JobState.QUEUED.value, JobState.RUNNING.value, JobState.RETRYING.value]
        with self._tx("resend") as conn:
            for i in range(0, len(instance_ids), _IN_CHUNK):
                chunk = list(instance_ids[i : i + _IN_CHUNK])
                delivered = exists().where(
                    Job.instance_id == Instance.id, Job.destination == destination, Job.state == JobState.DONE.value
                )
                waiting = exists().where(
                    Job.instance_id == Instance.id, Job.destination == destination, Job.state.in_(pending)
                )
                ready = conn.execute(
                    select(Instance.id).where(Instance.id.in_(chunk), Instance.raw_deleted_at.is_(None),
                                              delivered, ~waiting).order_by(Instance.id)
                ).scalars().all()
                events = []
                for instance_id in ready:
                    row = {
                        "instance_id": instance_id, "destination": destination, "state": JobState.QUEUED.value,
                        "attempts": 0, "run_after": now, "last_reason": reason, "created_at": now,
                        "updated_at": now, "lease_owner": None, "lease_expires_at": None, "last_status": None,
                    }
                    job_id = conn.execute(_INSERT_JOB, row).scalar_one()
                    new_ids.append(job_id)
                    events.append(self._ev(job_id, now, None, JobState.QUEUED.value, 0, None, reason))
                self._event(conn, events)
        return new_ids


def _aware(value: Any) -> datetime | None:
    """Aggregates (min/max) bypass the column type on SQLite: attach UTC to a naive result."""
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    assert isinstance(value, datetime)
    return value if value.tzinfo is not None else value.replace(tzinfo=timezone.utc)
