"""The job queue: enqueue, claim, heartbeat, finish, and the requeues (released and expired
leases, operator retries, re-sends).

Every method is one short transaction (``db.engine.write_tx``; the enqueue of a new instance,
on the acknowledgement path, runs the same Core statements on the driver's cursor, see
``db.driver``); every state write goes through ``jobs.states.assert_transition`` and leaves a
``job_events`` row (``db.job_events``). Database trouble leaves as
:class:`deid_router.errors.QueueError` with the driver error as ``__cause__`` and a message
that names the operation only (never a value).

The queue applies decisions, it never makes them: a finished attempt's next state comes from
``jobs.policy.decide`` (the worker passes it in), a lost lease's from ``jobs.leases``.

Concurrency: on PostgreSQL a claim is one statement with ``FOR UPDATE SKIP LOCKED``
(``db.claim``); on SQLite every write transaction starts with ``BEGIN IMMEDIATE`` (see
``db.engine``) so the select-then-update of a claim is serialised by the database write lock.

Owners (``lease_owner``) must be unique per worker (host, pid and a random suffix): the
lease is what lets a stale worker be ignored.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import Engine, Table, and_, bindparam, exists, func, insert, select, text, update
from sqlalchemy.engine import Connection, Dialect

from deid_router.db.batches import chunks
from deid_router.db.claim import CLAIMED_REASON, claim_statements
from deid_router.db.driver import DriverStatement, driver_transaction
from deid_router.db.engine import Store, utc_now
from deid_router.db.job_events import EVENT_KEYS, INSERT_EVENT, event_row, insert_events
from deid_router.db.models import Instance, Job
from deid_router.db.predicates import PENDING, RAW_HELD, due
from deid_router.db.quarantine import (
    CONFLICT_DETAIL, CONFLICT_REASON, NewEntry, insert_entries, requeue_failed, retryable,
)
from deid_router.jobs import leases
from deid_router.jobs.policy import Decision
from deid_router.jobs.states import LIVE_STATES, JobState, assert_transition

__all__ = ["ClaimedJob", "EnqueueResult", "JobQueue", "NewInstance", "new_instance_id"]


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


# Hot-path statements, built once: Core inserts on the tables with parameters at execute time
# are compiled once and cached, where ORM ``insert(Model).values(...)`` is rebuilt per call.
_INSTANCES = cast(Table, Instance.__table__)
_SELECT_BY_SOP_KEY = select(_INSTANCES.c.id, _INSTANCES.c.content_sha256).where(
    _INSTANCES.c.sop_key == bindparam("sop_key")
)
_INSERT_INSTANCE = insert(_INSTANCES)
_JOBS = cast(Table, Job.__table__)
_J = _JOBS.c
_INSERT_JOB = insert(_JOBS).returning(_J.id)
_ADVISORY_LOCK = "SELECT pg_advisory_xact_lock(hashtextextended(:k, 0))"

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
# A lost lease: the last status of the attempt before stays (no attempt ended with a status).
_LET_GO_SET = (
    update(_JOBS).where(_J.id.in_(bindparam("ids", expanding=True)))
    .values(state=bindparam("b_state"), run_after=bindparam("b_run_after"), lease_owner=None,
            lease_expires_at=None, last_reason=bindparam("b_reason"), updated_at=bindparam("b_now"),
            attempts=bindparam("b_attempts"))
)


class _EnqueueStatements:
    """The enqueue of a new instance, compiled once for the engine (see ``db.driver``)."""

    def __init__(self, dialect: Dialect) -> None:
        instance_keys = [c.key for c in _INSTANCES.columns]
        job_keys = [c.key for c in _JOBS.columns if c.key != "id"]
        self.lock = DriverStatement(text(_ADVISORY_LOCK), dialect)
        self.by_sop_key = DriverStatement(_SELECT_BY_SOP_KEY, dialect)
        self.instance = DriverStatement(_INSERT_INSTANCE, dialect, instance_keys)
        self.job = DriverStatement(_INSERT_JOB, dialect, job_keys)
        self.event = DriverStatement(INSERT_EVENT, dialect, list(EVENT_KEYS))


class JobQueue(Store):
    """Durable queue operations on an engine made by ``db.engine.make_engine``."""

    def __init__(self, engine: Engine, clock: Callable[[], datetime] = utc_now) -> None:
        super().__init__(engine, clock)
        self._fast = _EnqueueStatements(engine.dialect)

    # The two writers of job history, as attributes (a test replaces them to crash a
    # transaction half-way and check that nothing of it stays).
    _event = staticmethod(insert_events)
    _ev = staticmethod(event_row)

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
                insert_entries(conn, [NewEntry(inst.instance_id, None, CONFLICT_REASON, CONFLICT_DETAIL)], now)
        return EnqueueResult(instance_id=inst.instance_id, job_ids=job_ids, duplicate=False, conflict=conflict)

    # ------------------------------------------------------------------ claim / lease

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
        locked, in one statement (``db.claim``); SQLite holds the write lock for the whole
        select-then-update.
        """
        if limit <= 0:
            return []
        now = self._clock()
        params: dict[str, Any] = {
            "now": now, "expires": now + timedelta(seconds=lease_seconds), "owner": owner, "limit": limit,
        }
        if destination is not None:
            params["for_destination"] = destination
        if exclude_destinations:
            params["not_destinations"] = list(exclude_destinations)
        statements = claim_statements(destination is not None, bool(exclude_destinations))
        if self._pg:
            with self._tx("claim") as conn:
                rows = conn.execute(statements.one, params).all()
                for r in rows:  # written by the statement; an illegal edge rolls it back
                    assert_transition(r.from_state, JobState.RUNNING)
            return [self._claimed(r) for r in rows]
        # Idle workers poll often: look before taking SQLite's single write lock, which the
        # listener needs for every acknowledged instance.
        with self._read("claim_probe") as conn:
            if conn.execute(statements.probe, params).first() is None:
                return []
        with self._tx("claim") as conn:
            picked = conn.execute(statements.pick, params).all()
            if not picked:
                return []
            ids = [r.id for r in picked]
            events = [
                self._ev(r.id, now, r.state, JobState.RUNNING.value, r.attempts + 1, None, CLAIMED_REASON)
                for r in picked
            ]
            conn.execute(statements.take, {"ids": ids, "now": now, "expires": params["expires"], "owner": owner})
            self._event(conn, events)
            rows = conn.execute(statements.rows, {"ids": ids}).all()
        return [self._claimed(r) for r in rows]

    @staticmethod
    def _claimed(r: Any) -> ClaimedJob:
        return ClaimedJob(
            job_id=r.id, instance_id=r.instance_id, destination=r.destination, attempts=r.attempts,
            raw_path=r.raw_path, sop_class_uid=r.sop_class_uid, transfer_syntax=r.transfer_syntax,
            sop_key=r.sop_key, profile=r.profile,
        )

    def next_due_destinations(self) -> list[str]:
        """Destinations with due jobs, most overdue first, so a dispatcher can serve each fairly."""
        now = self._clock()
        with self._read("next_due_destinations") as conn:
            rows = conn.execute(
                select(Job.destination, func.min(Job.run_after).label("first"))
                .where(due(now))
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
            for chunk in chunks(sorted(job_ids)):
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

    # ------------------------------------------------------------------ finish

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
            for chunk in chunks(sorted({job_id for job_id, _ in decisions})):
                for r in conn.execute(_FINISH_LOCK, {"ids": list(chunk), "owner": owner}):
                    held[r.id] = r
            alike: dict[tuple[str, datetime, int | None, str, int], list[int]] = {}
            events: list[dict[str, Any]] = []
            quarantined: list[NewEntry] = []
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
                    quarantined.append(NewEntry.of_job(row.instance_id, job_id, decision.reason, row.attempts))
            for (dst, run_after, status, reason, attempts), job_ids in alike.items():
                for chunk in chunks(job_ids):
                    conn.execute(_FINISH_SET, {
                        "ids": list(chunk), "b_state": dst, "b_run_after": run_after, "b_status": status,
                        "b_reason": reason, "b_now": now, "b_attempts": attempts,
                    })
            self._event(conn, events)
            insert_entries(conn, quarantined, now)
        return [job_id in held for job_id, _ in decisions]

    # ------------------------------------------------------------------ lost leases

    def _let_go(self, conn: Connection, where: Any, decision_for: leases.LeaseDecision) -> int:
        """Apply ``decision_for``'s decision to each running job matching ``where`` (rows another
        transaction holds are skipped: their worker is finishing them)."""
        now = self._clock()
        rows = conn.execute(
            select(Job.id, Job.state, Job.attempts, Job.instance_id)
            .where(Job.state == JobState.RUNNING.value, where)
            .order_by(Job.id)
            .with_for_update(skip_locked=True)
        ).all()
        events: list[dict[str, Any]] = []
        alike: dict[tuple[str, datetime, str, int], list[int]] = {}
        quarantined: list[NewEntry] = []
        for r in rows:
            d = decision_for(r.attempts, now)
            attempts = max(r.attempts - 1, 0) if d.refund_attempt else r.attempts
            events.append(self._ev(r.id, now, r.state, d.to_state.value, attempts, None, d.reason))
            alike.setdefault((d.to_state.value, d.run_after or now, d.reason, attempts), []).append(r.id)
            if d.quarantine:
                quarantined.append(NewEntry.of_job(r.instance_id, r.id, d.reason, r.attempts))
        for (dst, run_after, reason, attempts), job_ids in alike.items():
            for chunk in chunks(job_ids):
                conn.execute(_LET_GO_SET, {
                    "ids": list(chunk), "b_state": dst, "b_run_after": run_after, "b_reason": reason,
                    "b_now": now, "b_attempts": attempts,
                })
        self._event(conn, events)
        insert_entries(conn, quarantined, now)
        return len(rows)

    def release(self, owner: str, job_ids: Sequence[int] | None = None) -> int:
        """Give running jobs back at shutdown (``jobs.leases.released``: queued, the attempt
        refunded); returns how many."""
        with self._tx("release") as conn:
            where: Any = Job.lease_owner == owner
            if job_ids is not None:
                if not job_ids:
                    return 0
                where = and_(where, Job.id.in_(list(job_ids)))
            return self._let_go(conn, where, leases.released)

    def expire_leases(self, decision_for: leases.LeaseDecision) -> int:
        """Apply ``decision_for`` (``jobs.leases.on_expiry``) to every running job whose lease has
        expired; returns the number of stale jobs handled."""
        now = self._clock()
        with self._tx("requeue_stale") as conn:
            return self._let_go(conn, Job.lease_expires_at < now, decision_for)

    # ------------------------------------------------------------------ operator requeues

    def requeue_jobs(self, job_ids: Sequence[int], reason: str = "operator_retry") -> list[int]:
        """Re-queue those of ``job_ids`` still failed or retrying with their raw file held."""
        done: list[int] = []
        with self._tx("requeue_jobs") as conn:
            for chunk in chunks(sorted(set(job_ids))):
                rows = conn.execute(
                    retryable()
                    .where(Job.id.in_(list(chunk)), Job.state.in_([JobState.FAILED.value, JobState.RETRYING.value]))
                    .order_by(Job.id).with_for_update(of=Job)
                ).all()
                done += requeue_failed(conn, rows, reason, self._clock())
        return done

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
            rows = conn.execute(retryable().where(Job.id == job_id)).all()
            if not rows:
                return False
            requeue_failed(conn, rows, "operator_retry", self._clock())
            return True

    def retry_failed(self) -> int:
        """Operator retry of every failed job whose raw file is still held; returns the count."""
        with self._tx("retry_failed") as conn:
            rows = conn.execute(
                retryable().where(Job.state == JobState.FAILED.value).with_for_update(of=Job)
            ).all()
            return len(requeue_failed(conn, rows, "operator_retry", self._clock()))

    def resend(self, instance_ids: Sequence[str], destination: str, reason: str = "operator_resend") -> list[int]:
        """A new queued job to ``destination`` for each instance delivered there, raw held and
        with no job to it still pending (a second resend before the first is sent adds nothing)."""
        now = self._clock()
        new_ids: list[int] = []
        with self._tx("resend") as conn:
            for chunk in chunks(list(instance_ids)):
                delivered = exists().where(
                    Job.instance_id == Instance.id, Job.destination == destination, Job.state == JobState.DONE.value
                )
                waiting = exists().where(Job.instance_id == Instance.id, Job.destination == destination, PENDING)
                ready = conn.execute(
                    select(Instance.id).where(Instance.id.in_(list(chunk)), RAW_HELD, delivered, ~waiting)
                    .order_by(Instance.id)
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
