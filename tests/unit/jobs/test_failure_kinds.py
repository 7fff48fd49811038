"""Every failure kind, through the one table (forward/status.py) and the decider (jobs/policy.py),
to what an operator sees happen to the job. Written out in full on purpose: changing what a
failure means must change this file too."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest

from deid_router.forward.status import FAILURE_RULES, FailureKind, FailureRule, classify_failure, failure_rule
from deid_router.jobs.outcome import OutcomeKind
from deid_router.jobs.policy import RetryPolicy, decide
from deid_router.jobs.states import JobState

U, R, P, Q = OutcomeKind.UNAVAILABLE, OutcomeKind.RETRY, OutcomeKind.PERMANENT, OutcomeKind.QUARANTINE
K = FailureKind
POLICY = RetryPolicy(initial_seconds=2, max_seconds=600, max_attempts=3, jitter="none")
NOW = datetime(2026, 1, 1, tzinfo=UTC)

# kind: (outcome, ends the association, fails the whole batch at open, reopen once when reused, probe at the cap)
EXPECTED: dict[FailureKind, tuple[OutcomeKind, bool, bool, bool, bool]] = {
    K.CONNECTION_REFUSED: (U, False, True, False, False),
    K.CONNECT_TIMEOUT: (U, False, True, False, False),
    K.CONNECT_FAILED: (U, False, True, False, False),
    K.ACSE_TIMEOUT: (U, False, True, False, False),
    K.ASSOCIATION_REJECTED_TRANSIENT: (U, False, True, False, False),
    K.ASSOCIATION_REJECTED_PERMANENT: (U, False, True, False, True),
    K.ASSOCIATION_ABORTED: (U, True, True, True, False),
    K.ASSOCIATION_LOST: (U, True, False, False, False),
    K.DIMSE_TIMEOUT: (R, True, False, False, False),
    K.NETWORK_TIMEOUT: (R, True, False, False, False),
    K.INVALID_RESPONSE: (R, True, False, False, False),
    K.SOP_CLASS_NOT_ACCEPTED: (P, False, False, False, False),
    K.TRANSFER_SYNTAX_NOT_ACCEPTED: (P, False, False, False, False),
    K.INVALID_FILE: (P, False, False, False, False),
    K.FILE_READ_FAILED: (R, False, False, False, False),
    K.FOLDER_WRITE_FAILED: (R, False, False, False, False),
    K.INVALID_UID_FOR_PATH: (P, False, False, False, False),
    K.RAW_FILE_MISSING: (P, False, False, False, False),
    K.WORK_WRITE_FAILED: (R, False, False, False, False),
    K.DEID_REFUSED: (Q, False, False, False, False),
    K.NO_OUTCOME: (R, False, False, False, False),
    K.INTERNAL_ERROR: (R, False, False, False, False),
    K.UNKNOWN: (R, False, False, False, False),
}

# outcome: (state after attempt 1, attempt refunded, quarantined after attempt 1, state after the last attempt)
JOB: dict[OutcomeKind, tuple[JobState, bool, bool, JobState]] = {
    U: (JobState.RETRYING, True, False, JobState.RETRYING),  # a PACS down for a day quarantines nothing
    R: (JobState.RETRYING, False, False, JobState.FAILED),
    P: (JobState.FAILED, False, True, JobState.FAILED),
    Q: (JobState.FAILED, False, True, JobState.FAILED),
}


def test_every_kind_is_in_the_table_and_in_this_test() -> None:
    assert set(FAILURE_RULES) == set(FailureKind) == set(EXPECTED)


@pytest.mark.parametrize("kind", list(FailureKind), ids=lambda k: k.value)
def test_rule(kind: FailureKind) -> None:
    outcome, ends, fails_batch, reopen, cap = EXPECTED[kind]
    assert FAILURE_RULES[kind] == FailureRule(outcome, ends, fails_batch, reopen, cap)


@pytest.mark.parametrize("kind", list(FailureKind), ids=lambda k: k.value)
def test_what_happens_to_the_job(kind: FailureKind) -> None:
    got = classify_failure(kind, "detail")
    assert got.failure is kind and got.status_code is None
    assert got.reason == f"{kind.value}:detail"
    state1, refunded, quarantined, last_state = JOB[EXPECTED[kind][0]]
    first = decide(1, got, POLICY, NOW, random.Random(0))
    assert (first.to_state, first.refund_attempt, first.quarantine) == (state1, refunded, quarantined)
    last = decide(POLICY.max_attempts, got, POLICY, NOW, random.Random(0))
    assert last.to_state is last_state
    if first.to_state is JobState.RETRYING:
        assert first.run_after is not None
        cap = EXPECTED[kind][4]
        delay = first.run_after - NOW
        assert delay == timedelta(seconds=600 if cap else 2)  # at the cap, or the first backoff step


def test_unknown_codes_keep_their_text_and_are_retried() -> None:
    got = classify_failure("tls_something_new", "x")  # a code a newer transport may raise
    assert (got.kind, got.failure, got.reason) == (R, K.UNKNOWN, "tls_something_new:x")
    assert failure_rule(None) is None
