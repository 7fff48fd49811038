"""The repository side of operator actions (issue 13), on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from deid_router.db.repository import CONFLICT_REASON, JobRepository, NewInstance
from deid_router.jobs.outcome import Outcome, OutcomeKind
from deid_router.jobs.policy import RetryPolicy, decide

Factory = Callable[..., NewInstance]
POLICY = RetryPolicy(initial_seconds=2, max_seconds=600, max_attempts=3, jitter="none")


def _fail(repo: JobRepository, clock: Any, outcome: Outcome) -> None:
    for job in repo.claim("w", 30, 100):
        assert repo.finish(job.job_id, "w", decide(job.attempts, outcome, POLICY, clock()))


def test_purge_entries_closes_jobs_and_returns_each_raw_file_until_marked(
    repo: JobRepository, clock: Any, instance_factory: Factory
) -> None:
    one, two = instance_factory(), instance_factory()
    j1 = repo.enqueue(one, ["pacs"]).job_ids
    j2 = repo.enqueue(two, ["pacs", "outbox"]).job_ids
    _fail(repo, clock, Outcome(OutcomeKind.PERMANENT, 0xA900, "refused"))
    entries = {e.job_id: e.id for e in repo.quarantine_list()}
    res = repo.purge_quarantine_entries([entries[j1[0]], entries[j2[0]]])
    assert (res.entries, res.jobs_closed, res.raw_paths) == (2, 2, [one.raw_path])  # two's outbox job is failed
    assert [repo.job_state(j)[0] for j in j1 + j2] == ["purged", "purged", "failed"]  # type: ignore[index]
    assert repo.status_counts()["jobs"] == {"queued": 0, "running": 0, "retrying": 0, "done": 0, "failed": 1}
    assert repo.purge_quarantine_entries([entries[j1[0]]]).raw_paths == [one.raw_path]  # not yet marked
    repo.mark_raw_path_deleted(one.raw_path)
    again = repo.purge_quarantine_entries([entries[j1[0]]])
    assert (again.entries, again.jobs_closed, again.raw_paths) == (0, 0, [])
    assert repo.requeue_jobs(j1) == []  # purged: never re-queued


def test_conflict_entry_purge_closes_every_failed_job_of_its_instance(
    repo: JobRepository, instance_factory: Factory
) -> None:
    repo.enqueue(instance_factory(sop_key="k" * 64, sha="a" * 64), ["pacs"])
    conflict = repo.enqueue(instance_factory(sop_key="k" * 64, sha="b" * 64), ["pacs", "outbox"])
    (entry,) = repo.quarantine_list()
    assert entry.reason == CONFLICT_REASON and entry.job_id is None
    res = repo.purge_quarantine_entries([entry.id])
    assert (res.entries, res.jobs_closed, len(res.raw_paths)) == (1, 2, 1)
    assert {repo.job_state(j)[0] for j in conflict.job_ids} == {"purged"}  # type: ignore[index]


def test_requeue_resend_details_and_fingerprint(repo: JobRepository, clock: Any, instance_factory: Factory) -> None:
    inst = instance_factory()
    (job,) = repo.enqueue(inst, ["pacs"]).job_ids
    _fail(repo, clock, Outcome(OutcomeKind.RETRY, 0xA700, "busy"))
    details = repo.destination_details()["pacs"]
    assert details.last_error_status == 0xA700 and details.next_retry_at is not None
    assert details.oldest_job_at == clock()
    assert repo.requeue_jobs([job, 424242]) == [job] and repo.requeue_jobs([job]) == []
    for claimed in repo.claim("w", 30, 10):
        repo.finish(claimed.job_id, "w", decide(1, Outcome(OutcomeKind.DELIVERED, 0), POLICY, clock()))
    assert repo.destination_details()["pacs"].oldest_job_at is None
    (new,) = repo.resend([inst.instance_id], "pacs")
    assert repo.resend([inst.instance_id], "pacs") == []  # one pending resend at a time
    assert repo.resend([inst.instance_id], "outbox") == []  # never delivered there
    assert [j.id for j in repo.list_jobs(states=["queued"], destination="pacs")] == [new]
    assert repo.job_events(new)[0].reason == "operator_resend"

    assert repo.secret_fingerprint() is None
    assert repo.record_secret_fingerprint("a" * 64) == "a" * 64
    assert repo.record_secret_fingerprint("b" * 64) == "a" * 64  # the first one stays
    assert repo.holds_keyed_data()
