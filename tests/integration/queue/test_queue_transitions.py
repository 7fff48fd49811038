"""The job lifecycle, driven through the repository itself on SQLite and PostgreSQL.

Every legal edge of ``jobs.states.TRANSITIONS`` is produced by a repository operation an
operator or a worker really performs, and every operation that would make an illegal move
either refuses (returns False / 0 and writes nothing) or raises ``IllegalTransitionError``.
At the end, the edges recorded in ``job_events`` are exactly the table's edges: an edge the
repository can no longer produce, or one it produces outside the table, fails here.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

import pytest
from sqlalchemy import Engine, select

from deid_router.db.models import JobEvent as JobEventRow
from deid_router.db.repository import JobRepository, NewInstance
from deid_router.jobs.policy import Decision
from deid_router.jobs.states import TRANSITIONS, IllegalTransitionError, JobState

Factory = Callable[..., NewInstance]
Q, RUN, RETRY, DONE, FAIL = JobState.QUEUED, JobState.RUNNING, JobState.RETRYING, JobState.DONE, JobState.FAILED


def _state(repo: JobRepository, job_id: int) -> str:
    got = repo.job_state(job_id)
    assert got is not None
    return got[0]


def _decision(state: JobState, run_after_s: float | None = None, clock: object = None) -> Decision:
    run_after = None if run_after_s is None else clock.now + timedelta(seconds=run_after_s)  # type: ignore[attr-defined]
    return Decision(state, run_after, state is FAIL, 0xA700 if state is not DONE else 0x0000, state.value)


def _claim_one(repo: JobRepository, owner: str = "w1") -> int:
    claimed = repo.claim(owner, 60, 1)
    assert len(claimed) == 1
    return claimed[0].job_id


def _recorded_edges(engine: Engine) -> set[tuple[str | None, str]]:
    with engine.connect() as conn:
        return {(r.from_state, r.to_state) for r in conn.execute(select(JobEventRow.from_state, JobEventRow.to_state))}


def test_every_legal_edge_through_the_repository_and_no_other(
    repo: JobRepository, engine: Engine, instance_factory: Factory, clock: object
) -> None:
    # None -> queued (enqueue), queued -> running (claim), running -> done (finish)
    a = repo.enqueue(instance_factory(), ["pacs"]).job_ids[0]
    assert _claim_one(repo) == a
    assert repo.finish(a, "w1", _decision(DONE))
    assert _state(repo, a) == "done"

    # running -> retrying (finish), retrying -> running (claim once due), running -> failed
    b = repo.enqueue(instance_factory(), ["pacs"]).job_ids[0]
    _claim_one(repo)
    assert repo.finish(b, "w1", _decision(RETRY, 5, clock))
    assert repo.claim("w1", 60, 10) == []  # not due yet
    clock.advance(6)  # type: ignore[attr-defined]
    assert _claim_one(repo) == b
    assert repo.finish(b, "w1", _decision(FAIL))
    assert _state(repo, b) == "failed"

    # failed -> queued (operator retry)
    assert repo.retry_job(b)
    assert _state(repo, b) == "queued"

    # running -> queued (release at shutdown, and an expired lease)
    c = repo.enqueue(instance_factory(), ["pacs"]).job_ids[0]
    _claim_one(repo)
    assert repo.release("w1") == 1
    assert _state(repo, c) == "queued" or _state(repo, b) == "queued"

    # retrying -> queued (operator "retry now" of a waiting job)
    d = repo.enqueue(instance_factory(), ["pacs"]).job_ids[0]
    for job in repo.claim("w2", 60, 10):
        repo.finish(job.job_id, "w2", _decision(RETRY, 600, clock))
    assert _state(repo, d) == "retrying"
    assert repo.retry_job(d)
    assert _state(repo, d) == "queued"

    # None -> failed: a conflicting re-send goes straight to the quarantine
    first = instance_factory()
    repo.enqueue(first, ["pacs"])
    conflict = repo.enqueue(instance_factory(sop_key=first.sop_key, sha="b" * 64), ["pacs"])
    assert conflict.conflict and _state(repo, conflict.job_ids[0]) == "failed"

    # failed -> purged: the operator purges the conflict's quarantine entry (the job is closed)
    (entry,) = [e for e in repo.quarantine_list() if e.instance_id == conflict.instance_id]
    assert repo.purge_quarantine_entries([entry.id]).jobs_closed == 1
    assert _state(repo, conflict.job_ids[0]) == "purged"

    clock.advance(1)  # type: ignore[attr-defined]
    for job in repo.claim("w3", 1, 50):
        pass
    clock.advance(5)  # type: ignore[attr-defined]
    assert repo.requeue_stale() >= 1  # lease expired: running -> queued

    legal = {(None if s is None else s.value, t.value) for s, targets in TRANSITIONS.items() for t in targets}
    recorded = _recorded_edges(engine)
    assert recorded <= legal, f"edges outside the table: {recorded - legal}"
    unreached = legal - recorded
    assert unreached == set(), f"legal edges no repository operation produced: {unreached}"


def test_operations_refuse_illegal_moves_and_write_nothing(
    repo: JobRepository, engine: Engine, instance_factory: Factory, clock: object
) -> None:
    done = repo.enqueue(instance_factory(), ["pacs"]).job_ids[0]
    _claim_one(repo)
    assert repo.finish(done, "w1", _decision(DONE))
    queued = repo.enqueue(instance_factory(), ["pacs"]).job_ids[0]
    before = _recorded_edges(engine), len(repo.job_events(done)), len(repo.job_events(queued))

    # done is final: no finish, release, stale requeue or retry moves it
    assert repo.finish(done, "w1", _decision(RETRY, 1, clock)) is False
    assert repo.release("w1", [done]) == 0
    assert repo.retry_job(done) is True and _state(repo, done) == "done"  # idempotent: "further along"
    # queued -> done / failed / retrying without a claim: refused (no lease held)
    for target in (DONE, FAIL, RETRY):
        assert repo.finish(queued, "w1", _decision(target, 1, clock)) is False
    assert _state(repo, queued) == "queued"
    # a worker that lost its lease cannot overwrite the newer state
    _claim_one(repo, "w1")
    clock.advance(120)  # type: ignore[attr-defined]
    assert repo.requeue_stale() == 1
    assert repo.finish(queued, "w1", _decision(DONE)) is False
    assert _state(repo, queued) == "queued"

    after = _recorded_edges(engine)
    assert after - before[0] <= {("queued", "running"), ("running", "queued")}
    assert len(repo.job_events(done)) == before[1]


def test_an_illegal_edge_written_by_mistake_raises(repo: JobRepository) -> None:
    # the repository's event writer consults the table on every write
    with pytest.raises(IllegalTransitionError):
        repo._ev(1, repo._clock(), "done", "queued", 0, None, "bug")  # noqa: SLF001
    with pytest.raises(IllegalTransitionError):
        repo._ev(1, repo._clock(), "queued", "done", 0, None, "bug")  # noqa: SLF001
