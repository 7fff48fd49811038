"""One job per (destination, profile): one instance can go de-identified two ways, to one
place or two; a re-send is a duplicate per pair; a claimed job carries its profile."""

from __future__ import annotations

from collections.abc import Callable

from deid_router.db.repository import JobRepository, NewInstance

Factory = Callable[..., NewInstance]


def test_one_job_per_destination_and_profile(repo: JobRepository, instance_factory: Factory) -> None:
    res = repo.enqueue(instance_factory(sop_key="k" * 64),
                       [("research", "trial"), ("research", "teaching"), ("pacs", ""), ("research", "trial")])
    assert len(res.job_ids) == 3
    claimed = {(j.destination, j.profile) for j in repo.claim("w1", 30, 10)}
    assert claimed == {("research", "trial"), ("research", "teaching"), ("pacs", "")}


def test_resend_is_a_duplicate_per_pair_and_a_new_profile_gets_its_job(
    repo: JobRepository, instance_factory: Factory
) -> None:
    repo.enqueue(instance_factory(sop_key="k" * 64), [("research", "trial"), "pacs"])
    again = repo.enqueue(instance_factory(sop_key="k" * 64), [("research", "trial"), ("pacs", "")])
    assert again.duplicate and again.job_ids == []
    more = repo.enqueue(instance_factory(sop_key="k" * 64), [("research", "trial"), ("research", "teaching")])
    assert not more.duplicate and len(more.job_ids) == 1
    assert sorted(j.profile for j in repo.claim("w1", 30, 10, destination="research")) == ["teaching", "trial"]
