"""Retry policy and the outcome -> state decision."""

from __future__ import annotations

import random
from datetime import datetime, timedelta, timezone

from hypothesis import given
from hypothesis import strategies as st

from deid_router.jobs.outcome import Outcome, OutcomeKind
from deid_router.jobs.policy import RetryPolicy, decide
from deid_router.jobs.states import JobState

NOW = datetime(2024, 5, 1, tzinfo=timezone.utc)


def test_backoff_doubles_and_caps() -> None:
    p = RetryPolicy(2, 60, 10, jitter="none")
    assert [p.backoff(a) for a in range(1, 8)] == [2, 4, 8, 16, 32, 60, 60]
    assert p.backoff(10_000) == 60  # no overflow on absurd attempt counts


@given(attempt=st.integers(1, 200), seed=st.integers(0, 2**32))
def test_jitter_bounds(attempt: int, seed: int) -> None:
    base = RetryPolicy(2, 600, 10, jitter="none").backoff(attempt)
    full = RetryPolicy(2, 600, 10, jitter="full").backoff(attempt, random.Random(seed))
    equal = RetryPolicy(2, 600, 10, jitter="equal").backoff(attempt, random.Random(seed))
    assert 0 <= full <= base
    assert base / 2 <= equal <= base


def test_jitter_is_deterministic_with_a_seeded_rng() -> None:
    p = RetryPolicy(2, 600, 10)
    assert p.backoff(5, random.Random(42)) == p.backoff(5, random.Random(42))


def test_delivered_is_done() -> None:
    for kind in (OutcomeKind.DELIVERED, OutcomeKind.DELIVERED_WARNING):
        d = decide(3, Outcome(kind, 0xB000), RetryPolicy(2, 60, 3), NOW)
        assert (d.to_state, d.run_after, d.quarantine, d.status_code) == (JobState.DONE, None, False, 0xB000)


def test_retry_is_scheduled_with_backoff_until_max_attempts() -> None:
    p = RetryPolicy(2, 60, 3, jitter="none")
    busy = Outcome(OutcomeKind.RETRY, 0xA700, "out_of_resources")
    d1 = decide(1, busy, p, NOW)
    d2 = decide(2, busy, p, NOW)
    assert (d1.to_state, d1.run_after, d1.quarantine) == (JobState.RETRYING, NOW + timedelta(seconds=2), False)
    assert d2.run_after == NOW + timedelta(seconds=4)
    d3 = decide(3, busy, p, NOW)
    assert (d3.to_state, d3.run_after, d3.quarantine) == (JobState.FAILED, None, True)
    assert d3.reason == "max_attempts_exceeded: out_of_resources" and d3.status_code == 0xA700


@given(attempts=st.integers(1, 50))
def test_permanent_and_quarantine_always_fail_into_quarantine(attempts: int) -> None:
    for kind in (OutcomeKind.PERMANENT, OutcomeKind.QUARANTINE):
        d = decide(attempts, Outcome(kind, None, "residual_phi"), RetryPolicy(2, 60, 10), NOW)
        assert (d.to_state, d.quarantine, d.reason) == (JobState.FAILED, True, "residual_phi")


@given(attempts=st.integers(1, 30), seed=st.integers(0, 1000))
def test_retry_never_runs_before_now_or_after_cap(attempts: int, seed: int) -> None:
    p = RetryPolicy(1, 30, 31, jitter="full")
    d = decide(attempts, Outcome(OutcomeKind.RETRY), p, NOW, random.Random(seed))
    assert d.run_after is not None and NOW <= d.run_after <= NOW + timedelta(seconds=30)
