"""Job lifecycle as a transition table (the pynetdicom ``fsm.py`` idea).

Every state write in the repository goes through :func:`assert_transition`, so an illegal
move is a loud bug instead of a silently lost or duplicated delivery.

Notes on the edges:

* ``queued -> running`` and ``retrying -> running``: a claim takes due retrying jobs
  directly; ``retrying -> queued`` is only an operator shortcut ("retry now").
* ``running -> queued``: a released job (shutdown) or an expired lease. Attempts are
  counted at claim time; a release gives its attempt back, an expired lease does not (a
  worker that died mid-attempt may have been killed by this very instance: counting it
  stops a poison instance from crashing workers forever).
* ``failed -> queued``: operator retry or quarantine release.
* ``failed -> purged``: an operator purged the quarantine entry (its raw file may be gone):
  the job is closed for good, so counts and metrics come down. ``purged`` is final and not
  one of the states ``status`` counts (``ALL_STATES``, the v1 contract's).
* ``None -> queued`` / ``None -> failed``: creation (``failed`` for a conflicting re-send
  that goes straight to the quarantine).
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import Enum

from deid_router.errors import QueueError


class JobState(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    RETRYING = "retrying"
    DONE = "done"
    FAILED = "failed"
    PURGED = "purged"

    def __str__(self) -> str:
        return self.value


# The states ``status`` counts (the v1 contract); a purged job is closed and counted apart.
ALL_STATES: tuple[JobState, ...] = tuple(s for s in JobState if s is not JobState.PURGED)
TERMINAL_STATES: frozenset[JobState] = frozenset({JobState.DONE, JobState.FAILED, JobState.PURGED})
CLOSED_STATES: frozenset[JobState] = frozenset({JobState.PURGED})
# States of a job not yet finished: waiting, in flight or waiting to retry.
PENDING_STATES: frozenset[JobState] = frozenset({JobState.QUEUED, JobState.RUNNING, JobState.RETRYING})
# States in which a job still represents pending or achieved work (a re-send is a duplicate).
LIVE_STATES: frozenset[JobState] = frozenset(
    {JobState.QUEUED, JobState.RUNNING, JobState.RETRYING, JobState.DONE}
)

TRANSITIONS: Mapping[JobState | None, frozenset[JobState]] = {
    None: frozenset({JobState.QUEUED, JobState.FAILED}),
    JobState.QUEUED: frozenset({JobState.RUNNING}),
    JobState.RETRYING: frozenset({JobState.RUNNING, JobState.QUEUED}),
    JobState.RUNNING: frozenset({JobState.DONE, JobState.RETRYING, JobState.FAILED, JobState.QUEUED}),
    JobState.FAILED: frozenset({JobState.QUEUED, JobState.PURGED}),
    JobState.DONE: frozenset(),
    JobState.PURGED: frozenset(),
}


class IllegalTransitionError(QueueError):
    """A state write that the lifecycle forbids: a bug, never a user error."""

    def __init__(self, from_state: JobState | None, to_state: JobState) -> None:
        self.from_state = from_state
        self.to_state = to_state
        super().__init__(f"illegal job transition {from_state or 'new'} -> {to_state}")


def _coerce(state: JobState | str | None) -> JobState | None:
    if state is None:
        return None
    try:
        return JobState(state)
    except ValueError as exc:
        raise QueueError(f"unknown job state {str(state)[:16]!r}") from exc


def allowed(from_state: JobState | str | None, to_state: JobState | str) -> bool:
    """True when the table permits ``from_state -> to_state``."""
    src = _coerce(from_state)
    dst = _coerce(to_state)
    return dst is not None and dst in TRANSITIONS.get(src, frozenset())


def assert_transition(from_state: JobState | str | None, to_state: JobState | str) -> JobState:
    """Raise :class:`IllegalTransitionError` unless the move is allowed; return the target."""
    src = _coerce(from_state)
    dst = _coerce(to_state)
    assert dst is not None
    if dst not in TRANSITIONS.get(src, frozenset()):
        raise IllegalTransitionError(src, dst)
    return dst
