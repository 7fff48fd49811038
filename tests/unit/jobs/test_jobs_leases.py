"""The decisions for a running job whose worker let go: given back at shutdown, or gone."""

from __future__ import annotations

from datetime import datetime, timezone

from deid_router.jobs.leases import lease_expired, on_expiry, released
from deid_router.jobs.policy import RetryPolicy
from deid_router.jobs.states import JobState, allowed

NOW = datetime(2024, 5, 1, tzinfo=timezone.utc)
POLICY = RetryPolicy(2, 60, 3, jitter="none")


def test_a_released_job_is_queued_at_once_and_its_attempt_refunded() -> None:
    d = released(2, NOW)
    assert (d.to_state, d.run_after, d.quarantine, d.reason, d.refund_attempt) == (
        JobState.QUEUED, NOW, False, "released", True)


def test_an_expired_lease_counts_the_attempt_until_the_policy_gives_up() -> None:
    for attempts in (1, 2):
        d = lease_expired(attempts, NOW, POLICY)
        assert (d.to_state, d.run_after, d.quarantine, d.reason, d.refund_attempt) == (
            JobState.QUEUED, NOW, False, "lease_expired", False)
    # A job whose workers keep dying is a poison instance: failed and quarantined.
    for attempts in (3, 7):
        d = on_expiry(POLICY)(attempts, NOW)
        assert (d.to_state, d.quarantine, d.reason, d.refund_attempt) == (
            JobState.FAILED, True, "max_attempts_exceeded: lease_expired", False)
    # Without a policy (tests, tools) a stale job is only ever queued again.
    assert lease_expired(99, NOW).to_state is JobState.QUEUED


def test_every_lease_decision_is_a_legal_move_from_running() -> None:
    decisions = [released(1, NOW), lease_expired(1, NOW, POLICY), lease_expired(3, NOW, POLICY)]
    assert all(allowed(JobState.RUNNING, d.to_state) for d in decisions)
