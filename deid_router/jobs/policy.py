"""The single place that turns an attempt's :class:`Outcome` into the job's next state.

Backoff is exponential and capped, with jitter so that a PACS coming back up is not hit by
every queued job in the same second.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from deid_router.config import QueueConfig
from deid_router.forward.status import failure_rule
from deid_router.jobs.outcome import Outcome, OutcomeKind
from deid_router.jobs.states import JobState

Jitter = Literal["none", "full", "equal"]


@dataclass(frozen=True)
class RetryPolicy:
    initial_seconds: float
    max_seconds: float
    max_attempts: int
    jitter: Jitter = "equal"  # equal jitter keeps at least half the delay: retries stay spaced

    @classmethod
    def from_config(cls, queue: QueueConfig, jitter: Jitter = "equal") -> RetryPolicy:
        """Build the policy from ``[queue]`` so every worker and node retries alike."""
        return cls(queue.retry_initial_seconds, queue.retry_max_seconds, queue.max_attempts, jitter)

    def base_delay(self, attempt: int) -> float:
        """Delay before jitter: ``initial * 2**(attempt-1)``, capped at ``max_seconds``."""
        n = max(1, attempt)
        if n > 64:  # 2**64 * anything positive is past any sane cap; avoid float overflow
            return self.max_seconds
        return float(min(self.max_seconds, self.initial_seconds * (2 ** (n - 1))))

    def backoff(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based).

        Pass a seeded ``random.Random`` for deterministic results (tests, replays).
        """
        base = self.base_delay(attempt)
        if self.jitter == "none" or base <= 0:
            return base
        r = rng if rng is not None else random
        if self.jitter == "full":
            return r.uniform(0.0, base)
        return base / 2.0 + r.uniform(0.0, base / 2.0)


@dataclass(frozen=True)
class Decision:
    to_state: JobState
    run_after: datetime | None
    quarantine: bool
    status_code: int | None
    reason: str
    refund_attempt: bool = False  # the attempt never reached the instance: do not count it


def decide(
    attempts: int,
    outcome: Outcome,
    policy: RetryPolicy,
    now: datetime,
    rng: random.Random | None = None,
    destination_failures: int = 1,
) -> Decision:
    """Next state of a job whose ``attempts``-th attempt ended with ``outcome``.

    ``attempts`` is the job's count including the attempt that just ended (it is
    incremented at claim time).
    """
    code = outcome.status_code
    if outcome.kind is OutcomeKind.UNAVAILABLE:
        # A destination that is down (or refuses us as a whole) must not use up the instance's
        # attempts: a PACS down for a day would otherwise quarantine everything. The delay
        # follows the destination's consecutive failures; a permanent rejection (a
        # configuration problem on one side) is probed slowly, at the cap.
        rule = failure_rule(outcome.failure)
        slow = rule is not None and rule.probe_at_cap
        delay = policy.max_seconds if slow else policy.backoff(destination_failures, rng)
        return Decision(
            JobState.RETRYING, now + timedelta(seconds=delay), False, code, outcome.reason or "unavailable", True
        )
    if outcome.kind in (OutcomeKind.DELIVERED, OutcomeKind.DELIVERED_WARNING):
        return Decision(JobState.DONE, None, False, code, outcome.reason or outcome.kind.value)
    if outcome.kind is OutcomeKind.RETRY:
        if attempts >= policy.max_attempts:
            last = outcome.reason or "retry"
            return Decision(JobState.FAILED, None, True, code, f"max_attempts_exceeded: {last}")
        delay = policy.backoff(attempts, rng)
        return Decision(JobState.RETRYING, now + timedelta(seconds=delay), False, code, outcome.reason or "retry")
    # PERMANENT and QUARANTINE: retrying cannot help, and nothing identified may leave.
    return Decision(JobState.FAILED, None, True, code, outcome.reason or outcome.kind.value)
