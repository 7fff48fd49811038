"""The next state of a running job whose worker let go of it: the decisions of lost leases.

A worker lets go in two ways. At shutdown it gives its jobs back (``released``): the attempt
never ended, so it is refunded. When it dies, its lease expires (``lease_expired``): the
attempt stays counted, because a worker that died mid-attempt may have been killed by this
very instance; with a policy, a job that has used ``max_attempts`` is failed and quarantined
by ``policy.decide``, so a poison instance cannot crash workers forever.

The queue applies these decisions (``db.job_queue``); it never makes them.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from deid_router.jobs.outcome import Outcome, OutcomeKind
from deid_router.jobs.policy import Decision, RetryPolicy, decide
from deid_router.jobs.states import JobState

RELEASED = "released"
LEASE_EXPIRED = "lease_expired"

# The decision for a running job whose worker is gone: from its attempts (counted at claim
# time, so including the attempt that was cut short) and the time now.
LeaseDecision = Callable[[int, datetime], Decision]


def released(attempts: int, now: datetime) -> Decision:
    """A job given back at shutdown: queued again at once, its attempt refunded."""
    return Decision(JobState.QUEUED, now, False, None, RELEASED, refund_attempt=True)


def lease_expired(attempts: int, now: datetime, policy: RetryPolicy | None = None) -> Decision:
    """A job whose worker stopped renewing its lease: queued again with the attempt counted;
    with ``policy``, failed and quarantined (``max_attempts_exceeded: lease_expired``) once
    it has used ``policy.max_attempts``."""
    if policy is not None and attempts >= policy.max_attempts:
        return decide(attempts, Outcome(OutcomeKind.RETRY, None, LEASE_EXPIRED), policy, now)
    return Decision(JobState.QUEUED, now, False, None, LEASE_EXPIRED)


def on_expiry(policy: RetryPolicy | None) -> LeaseDecision:
    """:func:`lease_expired` under ``policy``, in the shape the queue applies."""

    def decision(attempts: int, now: datetime) -> Decision:
        return lease_expired(attempts, now, policy)

    return decision
