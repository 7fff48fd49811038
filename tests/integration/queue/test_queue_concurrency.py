"""Concurrent claimers (threads and processes) never share a job; concurrent crosswalk
first sightings leave one row. Real SQLite file and real PostgreSQL."""

from __future__ import annotations

import multiprocessing as mp

import pytest
import threading
from collections.abc import Callable
from typing import Any

from sqlalchemy import Engine

from deid_router.db.engine import make_engine
from deid_router.db.repository import JobRepository, NewInstance

N_JOBS = 500


def _fill(repo: JobRepository, factory: Callable[..., NewInstance]) -> set[int]:
    ids: set[int] = set()
    for _ in range(N_JOBS // 2):
        ids.update(repo.enqueue(factory(), ["pacs", "outbox"]).job_ids)
    assert len(ids) == N_JOBS
    return ids


def _drain(repo: JobRepository, owner: str) -> list[int]:
    got: list[int] = []
    while True:
        batch = repo.claim(owner, 60, 7)
        if not batch:
            return got
        got.extend(j.job_id for j in batch)


def test_four_threads_never_double_claim(engine: Engine, instance_factory: Callable[..., NewInstance]) -> None:
    repo = JobRepository(engine)
    expected = _fill(repo, instance_factory)
    results: dict[str, list[int]] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def run(owner: str) -> None:
        try:
            start.wait()
            results[owner] = _drain(repo, owner)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(f"t{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    claimed = [j for ids in results.values() for j in ids]
    assert len(claimed) == len(set(claimed)) == N_JOBS
    assert set(claimed) == expected
    assert repo.status_counts()["jobs"]["running"] == N_JOBS


def _claim_process(url: str, owner: str, barrier: Any, out: Any) -> None:
    eng = make_engine(url)
    try:
        barrier.wait(30)
        out.put((owner, _drain(JobRepository(eng), owner)))
    finally:
        eng.dispose()


def _spawn(target: Callable[..., None], args_list: list[tuple[Any, ...]]) -> list[Any]:
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    barrier = ctx.Barrier(len(args_list))
    procs = [ctx.Process(target=target, args=(*a, barrier, out)) for a in args_list]
    for p in procs:
        p.start()
    results = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    return results


def test_two_processes_never_double_claim(engine: Engine, backend_url: str,
                                          instance_factory: Callable[..., NewInstance]) -> None:
    repo = JobRepository(engine)
    expected = _fill(repo, instance_factory)
    engine.dispose()  # no pooled connection crosses the fork
    results = _spawn(_claim_process, [(backend_url, "p1"), (backend_url, "p2")])
    claimed = [j for _, ids in results for j in ids]
    assert len(claimed) == len(set(claimed)) == N_JOBS
    assert set(claimed) == expected


def _crosswalk_process(url: str, owner: str, barrier: Any, out: Any) -> None:
    eng = make_engine(url)
    try:
        repo = JobRepository(eng)
        barrier.wait(30)
        inserted = sum(
            repo.crosswalk_record("patient", f"{i:064d}", f"DEID-{i:05d}", owner.encode()) for i in range(200)
        )
        out.put((owner, inserted))
    finally:
        eng.dispose()


def test_concurrent_crosswalk_first_sightings_leave_one_row(engine: Engine, backend_url: str) -> None:
    engine.dispose()
    results = _spawn(_crosswalk_process, [(backend_url, "n1"), (backend_url, "n2")])
    assert sum(n for _, n in results) == 200  # every token inserted exactly once
    repo = JobRepository(engine)
    assert repo.crosswalk_count() == 200
    assert len(repo.crosswalk_lookup("DEID-00007")) == 1


def test_concurrent_resends_of_one_instance_enqueue_once(engine: Engine,
                                                        instance_factory: Callable[..., NewInstance]) -> None:
    repo = JobRepository(engine)
    insts = [instance_factory(sop_key="s" * 64, sha="c" * 64) for _ in range(4)]
    results: list[Any] = []
    start = threading.Barrier(4)

    def run(inst: NewInstance) -> None:
        start.wait()
        results.append(repo.enqueue(inst, ["pacs"]))

    threads = [threading.Thread(target=run, args=(i,)) for i in insts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(r.duplicate for r in results) == [False, True, True, True]
    assert repo.status_counts()["jobs"]["queued"] == 1


@pytest.mark.postgres
def test_heartbeat_skips_rows_being_finished_instead_of_waiting(pg_url: str, instance_factory: Callable[..., NewInstance]) -> None:
    """A heartbeat that waited on rows a batch finish holds could deadlock with it; the lost
    finish would then let the lease expire and the PACS receive the instance twice."""
    import threading
    import time

    from sqlalchemy import text

    from deid_router.db.engine import migrate

    engine = make_engine(pg_url)
    migrate(engine)
    repo = JobRepository(engine)
    ids = repo.enqueue(instance_factory(), ["a", "b"]).job_ids
    repo.claim("w", 30, 10)
    with engine.connect() as finisher:
        finisher.execute(text("BEGIN"))
        finisher.execute(text("SELECT id FROM jobs WHERE id = :i FOR UPDATE"), {"i": ids[0]})
        result: list[int] = []
        t = threading.Thread(target=lambda: result.append(repo.heartbeat("w", ids, 30)))
        started = time.monotonic()
        t.start()
        t.join(timeout=10)
        assert not t.is_alive(), "heartbeat waited on a row another transaction holds"
        assert time.monotonic() - started < 5
        assert result == [1]  # the free row was extended, the held one skipped
        finisher.execute(text("ROLLBACK"))
    engine.dispose()
