"""A destination that is down must not use up the instance's attempts."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

from deid_router.forward.status import classify_failure, reject_reason
from deid_router.jobs.outcome import Outcome, OutcomeKind
from deid_router.jobs.policy import RetryPolicy, decide
from deid_router.jobs.states import JobState

POLICY = RetryPolicy(initial_seconds=2, max_seconds=600, max_attempts=3)
NOW = datetime(2026, 1, 1, tzinfo=UTC)


def test_unavailable_never_fails_the_job_and_refunds_the_attempt() -> None:
    down = Outcome(OutcomeKind.UNAVAILABLE, None, "connection_refused")
    for attempts in (1, 3, 50):  # even far past max_attempts: the PACS may be down for a day
        d = decide(attempts, down, POLICY, NOW)
        assert d.to_state is JobState.RETRYING
        assert d.refund_attempt and not d.quarantine


def test_unavailable_backs_off_with_the_destinations_failures() -> None:
    down = Outcome(OutcomeKind.UNAVAILABLE, None, "connect_timeout")
    rng = random.Random(1)
    delays = [(decide(1, down, POLICY, NOW, rng, destination_failures=n).run_after - NOW) for n in (1, 4, 20)]  # type: ignore[operator]
    assert timedelta(seconds=1) <= delays[0] <= timedelta(seconds=2)
    assert timedelta(seconds=8) <= delays[1] <= timedelta(seconds=16)
    assert timedelta(seconds=300) <= delays[2] <= timedelta(seconds=600)


def test_permanent_rejection_is_probed_slowly_at_the_cap() -> None:
    rejected = classify_failure(*reject_reason(1, 1, 7))  # the table says: probe at the cap
    d = decide(1, rejected, POLICY, NOW)
    assert d.run_after == NOW + timedelta(seconds=600)
    assert d.to_state is JobState.RETRYING and not d.quarantine


def test_instance_level_retry_still_counts() -> None:
    busy = Outcome(OutcomeKind.RETRY, 0xA700, "status_0xA700")
    assert not decide(1, busy, POLICY, NOW).refund_attempt
    assert decide(3, busy, POLICY, NOW).to_state is JobState.FAILED
