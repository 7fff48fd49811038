"""Pause state, users and the operator reports on a real SQLite file and the real PostgreSQL."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from sqlalchemy import Engine

from deid_router.db.operations import DestinationStates, Reports, UserExists, UserStore
from deid_router.db.repository import JobRepository, NewInstance
from deid_router.jobs.outcome import Outcome, OutcomeKind
from deid_router.jobs.policy import RetryPolicy, decide
from deid_router.observability.metrics import QueueCollector, registry_for, render
from tests.integration.queue.conftest import Clock

Factory = Callable[..., NewInstance]
POLICY = RetryPolicy(initial_seconds=2, max_seconds=600, max_attempts=1, jitter="none")


def test_a_paused_destination_gets_no_claims_until_resumed(
    repo: JobRepository, engine: Engine, instance_factory: Factory
) -> None:
    states = DestinationStates(engine)
    for _ in range(3):
        repo.enqueue(instance_factory(), ["pacs", "outbox"])
    states.set_paused("pacs", True, "alice", "PACS maintenance")
    assert repo.next_due_destinations() == ["outbox"]
    assert repo.claim("w1", 60, 10, destination="pacs") == []
    claimed = repo.claim("w1", 60, 10)  # the any-destination claim skips it too
    assert {c.destination for c in claimed} == {"outbox"} and len(claimed) == 3
    assert states.paused() == ["pacs"]
    assert states.all()["pacs"].reason == "PACS maintenance" and states.all()["pacs"].updated_by == "alice"
    states.set_paused("pacs", False, "alice")
    assert states.paused() == []
    assert len(repo.claim("w1", 60, 10, destination="pacs")) == 3


def test_users_are_added_once_listed_and_removed(engine: Engine) -> None:
    users = UserStore(engine)
    users.add("bob", "viewer", "$argon2id$fake")
    with pytest.raises(UserExists):
        users.add("bob", "admin", "$argon2id$other")
    with pytest.raises(ValueError):
        users.add("carol", "root", "x")
    assert [(u.name, u.role) for u in users.list()] == [("bob", "viewer")]
    assert users.remove("bob") and not users.remove("bob")
    assert users.get("bob") is None


def test_metrics_count_received_delivered_quarantined_and_oldest_age(
    repo: JobRepository, engine: Engine, instance_factory: Factory, clock: Clock
) -> None:
    reports = Reports(engine, repo, clock=clock)
    registry = registry_for(QueueCollector(reports, lambda: 10**9, ["pacs"], clock=clock))
    from prometheus_client.parser import text_string_to_metric_families

    def samples() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        out = {}
        for fam in text_string_to_metric_families(render(registry).decode()):
            for s in fam.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out

    before = samples()
    assert before[("deid_router_instances_received_total", ())] == 0
    assert before[("deid_router_jobs", (("destination", "pacs"), ("state", "queued")))] == 0
    for _ in range(2):
        repo.enqueue(instance_factory(), ["pacs"])
    clock.advance(30)
    jobs = repo.claim("w", 60, 10, destination="pacs")
    now = clock()
    repo.finish(jobs[0].job_id, "w", decide(1, Outcome(OutcomeKind.DELIVERED, 0, ""), POLICY, now))
    repo.finish(jobs[1].job_id, "w", decide(1, Outcome(OutcomeKind.PERMANENT, 0xA900, "refused"), POLICY, now))
    DestinationStates(engine).set_paused("pacs", True, "alice")
    after = samples()
    assert after[("deid_router_instances_received_total", ())] == 2
    assert after[("deid_router_instances_delivered_total", (("destination", "pacs"),))] == 1
    assert after[("deid_router_instances_quarantined_total", (("destination", "pacs"),))] == 1
    assert after[("deid_router_quarantined", ())] == 1
    assert after[("deid_router_destination_paused", (("destination", "pacs"),))] == 1
    assert after[("deid_router_oldest_job_age_seconds", (("destination", "pacs"),))] == 0  # none pending
    repo.enqueue(instance_factory(), ["pacs"])
    clock.advance(42)
    assert samples()[("deid_router_oldest_job_age_seconds", (("destination", "pacs"),))] == pytest.approx(42)


def test_purge_of_one_entry_names_its_raw_file_once(
    repo: JobRepository, engine: Engine, instance_factory: Factory, clock: Clock
) -> None:
    reports = Reports(engine, repo, clock=clock)
    kept, purged = instance_factory(), instance_factory()
    for inst in (kept, purged):
        repo.enqueue(inst, ["pacs"])
    for job in repo.claim("w", 60, 10):
        repo.finish(job.job_id, "w", decide(1, Outcome(OutcomeKind.PERMANENT, 0xA900, "refused"), POLICY, clock()))
    entries = {e.id: e for e in reports.quarantine()}
    assert len(entries) == 2
    target = next(e for e in entries.values() if e.calling_aet == "MODALITY")
    raw = repo.quarantine_get(target.id)
    assert raw is not None
    ok, paths = reports.purge_entry(target.id)
    assert ok and paths == [raw.raw_path]
    assert reports.purge_entry(target.id) == (False, [])
    assert [e.id for e in reports.quarantine()] == [i for i in entries if i != target.id]
