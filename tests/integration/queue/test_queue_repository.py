"""The job repository on a real SQLite file and the real PostgreSQL server."""

from __future__ import annotations

import random
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine, func, select

from deid_router.config import QueueConfig
from deid_router.db.engine import make_engine, migrate
from deid_router.db.models import Base, Instance, Job, QuarantineRow
from deid_router.db.repository import CONFLICT_REASON, JobRepository, NewInstance
from deid_router.errors import QueueError
from deid_router.jobs.outcome import Outcome, OutcomeKind
from deid_router.jobs.policy import Decision, RetryPolicy, decide
from deid_router.jobs.states import IllegalTransitionError, JobState

Factory = Callable[..., NewInstance]
POLICY = RetryPolicy(initial_seconds=2, max_seconds=600, max_attempts=3, jitter="none")


def _count(engine: Engine, model: Any) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(model)).scalar_one())


def test_migrations_equal_models(engine: Engine) -> None:
    migrate(engine)  # a second run is a no-op
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
    assert diff == []


def test_enqueue_creates_instance_and_one_queued_job_per_destination(repo: JobRepository, engine: Engine,
                                                                     instance_factory: Factory) -> None:
    inst = instance_factory()
    res = repo.enqueue(inst, ["pacs", "outbox", "pacs"])
    assert (res.instance_id, res.duplicate, res.conflict) == (inst.instance_id, False, False)
    assert len(res.job_ids) == 2
    assert repo.status_counts()["jobs"]["queued"] == 2
    ev = repo.job_events(res.job_ids[0])
    assert [(e.from_state, e.to_state, e.attempt) for e in ev] == [(None, "queued", 0)]
    assert ev[0].at.tzinfo is not None and ev[0].at.utcoffset() == timedelta(0)


def test_enqueue_is_atomic(repo: JobRepository, engine: Engine, instance_factory: Factory,
                           monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*_: Any) -> None:
        raise RuntimeError("crash after the jobs were inserted")

    monkeypatch.setattr(JobRepository, "_event", staticmethod(boom))
    monkeypatch.setattr(JobRepository, "_events_on_cursor", boom)
    with pytest.raises(RuntimeError):
        repo.enqueue(instance_factory(), ["pacs", "outbox"])  # a new instance
    assert _count(engine, Instance) == 0 and _count(engine, Job) == 0
    monkeypatch.undo()
    repo.enqueue(instance_factory(sop_key="k" * 64, sha="a" * 64), ["pacs"])
    monkeypatch.setattr(JobRepository, "_event", staticmethod(boom))
    with pytest.raises(RuntimeError):
        repo.enqueue(instance_factory(sop_key="k" * 64, sha="b" * 64), ["pacs"])  # a conflicting re-send
    assert _count(engine, Instance) == 1 and _count(engine, Job) == 1


def test_resend_of_same_content_is_a_duplicate(repo: JobRepository, engine: Engine, instance_factory: Factory) -> None:
    first = instance_factory(sop_key="k" * 64)
    repo.enqueue(first, ["pacs", "outbox"])
    again = repo.enqueue(instance_factory(sop_key="k" * 64), ["pacs", "outbox"])
    assert again.duplicate and not again.conflict
    assert again.instance_id == first.instance_id and again.job_ids == []
    assert _count(engine, Instance) == 1 and _count(engine, Job) == 2
    # A new route for the same content gets only the missing job.
    more = repo.enqueue(instance_factory(sop_key="k" * 64), ["pacs", "archive"])
    assert not more.duplicate and len(more.job_ids) == 1
    assert repo.status_counts()["destinations"]["archive"]["queued"] == 1


def test_resend_after_failure_is_queued_again(repo: JobRepository, clock: Any, instance_factory: Factory) -> None:
    repo.enqueue(instance_factory(sop_key="k" * 64), ["pacs"])
    job = repo.claim("w1", 30, 10)[0]
    assert repo.finish(job.job_id, "w1", decide(1, Outcome(OutcomeKind.PERMANENT, 0xA900, "refused"), POLICY, clock()))
    res = repo.enqueue(instance_factory(sop_key="k" * 64), ["pacs"])
    assert not res.duplicate and len(res.job_ids) == 1


def test_same_uid_different_content_is_quarantined_never_overwritten(
    repo: JobRepository, engine: Engine, instance_factory: Factory
) -> None:
    first = instance_factory(sop_key="k" * 64, sha="a" * 64)
    repo.enqueue(first, ["pacs"])
    other = instance_factory(sop_key="k" * 64, sha="b" * 64)
    res = repo.enqueue(other, ["pacs"])
    assert res.conflict and not res.duplicate and res.instance_id == other.instance_id
    assert _count(engine, Instance) == 2
    assert repo.job_state(res.job_ids[0]) == ("failed", 0)
    (entry,) = repo.quarantine_list()
    assert (entry.instance_id, entry.reason) == (other.instance_id, CONFLICT_REASON)
    assert [c.job_id for c in repo.claim("w", 30, 10)] != res.job_ids  # only the first one is claimable
    counts = repo.status_counts()
    assert counts["quarantined"] == 1 and counts["jobs"]["failed"] == 1


def test_claim_takes_due_jobs_in_order_and_respects_filters(repo: JobRepository, clock: Any,
                                                            instance_factory: Factory) -> None:
    ids = [repo.enqueue(instance_factory(), ["pacs", "outbox"]).job_ids for _ in range(3)]
    assert repo.next_due_destinations() == ["outbox", "pacs"]  # same age: by name
    got = repo.claim("w1", 30, 2, destination="pacs")
    assert [g.job_id for g in got] == [ids[0][0], ids[1][0]]
    assert all(g.attempts == 1 and g.destination == "pacs" and g.raw_path.startswith("raw/") for g in got)
    got2 = repo.claim("w1", 30, 10, exclude_destinations=["outbox"])
    assert [g.job_id for g in got2] == [ids[2][0]]
    assert repo.next_due_destinations() == ["outbox"]
    assert len(repo.claim("w2", 30, 10)) == 3
    assert repo.claim("w2", 30, 10) == []
    assert repo.status_counts()["jobs"]["running"] == 6


def test_retry_backoff_then_max_attempts_quarantines(repo: JobRepository, clock: Any, instance_factory: Factory) -> None:
    (job_id,) = repo.enqueue(instance_factory(), ["pacs"]).job_ids
    busy = Outcome(OutcomeKind.RETRY, 0xA700, "out_of_resources")
    for attempt, delay in ((1, 2.0), (2, 4.0)):
        (job,) = repo.claim("w", 30, 10)
        assert job.attempts == attempt
        assert repo.finish(job_id, "w", decide(job.attempts, busy, POLICY, clock()))
        assert repo.job_state(job_id) == ("retrying", attempt)
        clock.advance(delay - 0.5)
        assert repo.claim("w", 30, 10) == []  # not due yet
        clock.advance(0.5)
    (job,) = repo.claim("w", 30, 10)  # retrying -> running directly
    assert repo.finish(job_id, "w", decide(job.attempts, busy, POLICY, clock()))
    assert repo.job_state(job_id) == ("failed", 3)
    (entry,) = repo.quarantine_list()
    assert entry.reason == "max_attempts_exceeded: out_of_resources" and entry.job_id == job_id
    full = repo.quarantine_get(entry.id)
    assert full is not None
    assert [(e.from_state, e.to_state) for e in full.events] == [
        (None, "queued"), ("queued", "running"), ("running", "retrying"), ("retrying", "running"),
        ("running", "retrying"), ("retrying", "running"), ("running", "failed"),
    ]
    assert full.events[-1].status_code == 0xA700


def test_lease_expiry_requeues_and_stale_owner_is_ignored(repo: JobRepository, clock: Any,
                                                          instance_factory: Factory) -> None:
    (job_id,) = repo.enqueue(instance_factory(), ["pacs"]).job_ids
    repo.claim("old", 10, 1)
    clock.advance(5)
    assert repo.heartbeat("old", [job_id], 10) == 1
    clock.advance(9)
    assert repo.requeue_stale() == 0  # heartbeat kept it alive
    clock.advance(2)
    assert repo.requeue_stale() == 1
    assert repo.job_state(job_id) == ("queued", 1)  # the lost attempt stays counted
    assert repo.job_events(job_id)[-1].reason == "lease_expired"
    (job,) = repo.claim("new", 10, 1)
    assert job.attempts == 2
    done = decide(1, Outcome(OutcomeKind.DELIVERED, 0), POLICY, clock())
    assert repo.finish(job_id, "old", done) is False
    assert repo.heartbeat("old", [job_id], 10) == 0
    assert repo.job_state(job_id) == ("running", 2)
    assert repo.finish(job_id, "new", done) is True
    assert repo.job_state(job_id) == ("done", 2)
    assert repo.finish(job_id, "new", done) is False  # already finished


def test_batch_finish_applies_each_decision_and_skips_lost_leases(repo: JobRepository, clock: Any,
                                                                 instance_factory: Factory) -> None:
    ids = [repo.enqueue(instance_factory(), ["pacs"]).job_ids[0] for _ in range(6)]
    jobs = repo.claim("w", 30, 10)
    assert sorted(j.job_id for j in jobs) == ids
    stolen = ids[5]
    clock.advance(31)
    assert repo.requeue_stale() == 6
    repo.claim("w", 30, 5)  # everything but the last job is held by "w" again (attempt 2)
    repo.claim("other", 30, 1)  # the last one now belongs to another worker
    now = clock()
    delivered = decide(2, Outcome(OutcomeKind.DELIVERED, 0), POLICY, now)
    busy = decide(2, Outcome(OutcomeKind.RETRY, 0xA700, "out_of_resources"), POLICY, now)
    refused = decide(2, Outcome(OutcomeKind.QUARANTINE, 0xA900, "sop_class_mismatch"), POLICY, now)
    decisions = [(ids[3], busy), (ids[0], delivered), (ids[1], delivered), (ids[4], refused),
                 (ids[2], delivered), (stolen, delivered)]
    assert repo.finish_many("w", decisions) == [True, True, True, True, True, False]
    assert [repo.job_state(i) for i in ids] == [
        ("done", 2), ("done", 2), ("done", 2), ("retrying", 2), ("failed", 2), ("running", 2)]
    assert [e.to_state for e in repo.job_events(ids[0])][-1] == "done"
    assert repo.job_events(ids[3])[-1].status_code == 0xA700
    (entry,) = repo.quarantine_list()
    assert entry.job_id == ids[4] and entry.reason == "sop_class_mismatch"


def test_release_costs_no_attempt(repo: JobRepository, instance_factory: Factory) -> None:
    ids = repo.enqueue(instance_factory(), ["a", "b"]).job_ids
    repo.claim("w", 30, 10)
    assert repo.release("other") == 0
    assert repo.release("w", [ids[0]]) == 1
    assert repo.release("w") == 1
    assert [repo.job_state(i) for i in ids] == [("queued", 0), ("queued", 0)]


def test_illegal_transition_is_rejected_and_nothing_written(repo: JobRepository, clock: Any,
                                                            instance_factory: Factory) -> None:
    (job_id,) = repo.enqueue(instance_factory(), ["pacs"]).job_ids
    repo.claim("w", 30, 1)
    bad = Decision(JobState.RUNNING, None, False, None, "bug")
    with pytest.raises(IllegalTransitionError):
        repo.finish(job_id, "w", bad)
    assert repo.job_state(job_id) == ("running", 1)
    assert len(repo.job_events(job_id)) == 2


def test_quarantine_release_retry_and_purge_are_idempotent(repo: JobRepository, clock: Any,
                                                           instance_factory: Factory) -> None:
    inst = [instance_factory() for _ in range(3)]
    jobs = [repo.enqueue(i, ["pacs"]).job_ids[0] for i in inst]
    perm = Outcome(OutcomeKind.QUARANTINE, None, "residual_phi")
    for job in repo.claim("w", 30, 10):
        assert repo.finish(job.job_id, "w", decide(job.attempts, perm, POLICY, clock()))
    assert repo.quarantine_size() == 3
    q = {e.job_id: e.id for e in repo.quarantine_list()}
    # release one entry, twice
    assert repo.quarantine_release(q[jobs[0]]) and repo.quarantine_release(q[jobs[0]])
    assert repo.job_state(jobs[0]) == ("queued", 0)
    assert repo.quarantine_size() == 2
    # operator retry of one job, twice; it releases that job's entry
    assert repo.retry_job(jobs[1]) and repo.retry_job(jobs[1])
    assert repo.job_state(jobs[1]) == ("queued", 0) and repo.quarantine_size() == 1
    assert repo.retry_job(999_999) is False
    # purge the last one, twice: the raw path comes back until it is marked deleted
    assert repo.quarantine_purge() == [inst[2].raw_path]
    assert repo.quarantine_purge() == [inst[2].raw_path]
    repo.mark_raw_path_deleted(inst[2].raw_path)
    assert repo.quarantine_purge() == []
    assert repo.quarantine_size() == 0
    assert repo.quarantine_release(q[jobs[2]]) is False  # purged: the file is gone
    assert repo.retry_job(jobs[2]) is False and repo.retry_failed() == 0
    assert repo.quarantine_release(424242) is False
    assert repo.status_counts()["jobs"] == {"queued": 2, "running": 0, "retrying": 0, "done": 0, "failed": 1}


def test_retry_failed_and_conflict_release(repo: JobRepository, clock: Any, instance_factory: Factory) -> None:
    repo.enqueue(instance_factory(sop_key="k" * 64, sha="a" * 64), ["pacs"])
    conflict = repo.enqueue(instance_factory(sop_key="k" * 64, sha="b" * 64), ["pacs", "outbox"])
    assert repo.quarantine_size() == 1
    assert repo.retry_failed() == 2
    assert repo.retry_failed() == 0
    assert repo.quarantine_size() == 0
    assert {repo.job_state(j) for j in conflict.job_ids} == {("queued", 0)}


def test_status_counts_shape(repo: JobRepository, clock: Any, instance_factory: Factory) -> None:
    empty = repo.status_counts(destinations=["pacs"])
    zero = {"queued": 0, "running": 0, "retrying": 0, "done": 0, "failed": 0}
    assert empty == {"jobs": zero, "destinations": {"pacs": zero}, "quarantined": 0}
    repo.enqueue(instance_factory(), ["pacs", "outbox"])
    (job,) = repo.claim("w", 30, 1, destination="pacs")
    repo.finish(job.job_id, "w", decide(1, Outcome(OutcomeKind.DELIVERED, 0), POLICY, clock()))
    assert repo.status_counts() == {
        "jobs": {**zero, "queued": 1, "done": 1},
        "destinations": {"outbox": {**zero, "queued": 1}, "pacs": {**zero, "done": 1}},
        "quarantined": 0,
    }


def test_purgeable_instances_only_when_all_done_and_old(repo: JobRepository, clock: Any,
                                                        instance_factory: Factory) -> None:
    a, b = instance_factory(), instance_factory()
    repo.enqueue(a, ["pacs"])
    repo.enqueue(b, ["pacs", "outbox"])
    for job in repo.claim("w", 30, 10, destination="pacs"):
        repo.finish(job.job_id, "w", decide(1, Outcome(OutcomeKind.DELIVERED, 0), POLICY, clock()))
    assert repo.purgeable_instances(clock()) == []  # not older than the cutoff yet
    clock.advance(3600)
    assert repo.purgeable_instances(clock()) == [(a.instance_id, a.raw_path)]  # b still has a queued job
    repo.mark_raw_deleted(a.instance_id)
    repo.mark_raw_deleted(a.instance_id)
    assert repo.purgeable_instances(clock()) == []


def test_crosswalk_and_audit(repo: JobRepository) -> None:
    assert repo.crosswalk_record("patient", "t" * 64, "DEID-0001", b"\x00secret") is True
    assert repo.crosswalk_record("patient", "t" * 64, "DEID-0001", b"\x00secret") is False
    repo.crosswalk_record("study", "t" * 64, "DEID-0001", b"\x01x")
    assert repo.crosswalk_lookup("DEID-0001") == [("patient", b"\x00secret"), ("study", b"\x01x")]
    assert sorted(repo.crosswalk_all()) == [("patient", "DEID-0001", b"\x00secret"), ("study", "DEID-0001", b"\x01x")]
    repo.audit("crosswalk_lookup", "operator", "pseudonym lookup")
    ((at, action, actor, _),) = repo.audit_events()
    assert (action, actor) == ("crosswalk_lookup", "operator") and at.tzinfo is not None


def test_database_errors_become_queue_errors(tmp_path: Path) -> None:
    eng = make_engine(f"sqlite:///{tmp_path / 'nested' / 'empty.db'}")  # parent dir is created
    try:
        with pytest.raises(QueueError) as info:
            JobRepository(eng).status_counts()
        assert info.value.__cause__ is not None
    finally:
        eng.dispose()


def test_policy_from_config_drives_the_queue() -> None:
    p = RetryPolicy.from_config(QueueConfig(url="sqlite://", max_attempts=4, retry_initial_seconds=1,
                                            retry_max_seconds=8))
    assert (p.max_attempts, p.base_delay(1), p.base_delay(10)) == (4, 1.0, 8.0)
    assert 0.5 <= p.backoff(1, random.Random(1)) <= 1.0


def test_stale_lease_past_max_attempts_is_quarantined(repo: JobRepository, clock: Any,
                                                      instance_factory: Factory) -> None:
    (job_id,) = repo.enqueue(instance_factory(), ["pacs"]).job_ids
    for _ in range(POLICY.max_attempts):
        assert repo.claim("crashy", 10, 1)
        clock.advance(11)
        assert repo.requeue_stale(POLICY) == 1
    assert repo.job_state(job_id) == ("failed", 3)
    (entry,) = repo.quarantine_list()
    assert entry.reason == "max_attempts_exceeded: lease_expired"


def test_unavailable_destination_refunds_the_attempt(repo: JobRepository, clock: Any, instance_factory: Factory) -> None:
    from deid_router.jobs.outcome import Outcome, OutcomeKind
    from deid_router.jobs.policy import RetryPolicy, decide

    policy = RetryPolicy(1, 5, 2)
    (job_id,) = repo.enqueue(instance_factory(), ["pacs"]).job_ids
    for _ in range(5):  # five times past max_attempts=2, and still waiting, not failed
        (job,) = repo.claim("w", 30, 1)
        down = decide(job.attempts, Outcome(OutcomeKind.UNAVAILABLE, None, "connection_refused"), policy, clock())
        assert repo.finish(job_id, "w", down)
        assert repo.job_state(job_id) == ("retrying", 0)
        clock.advance(10)
    events = repo.job_events(job_id)
    assert [e.reason for e in events if e.to_state == "retrying"] == ["connection_refused"] * 5
