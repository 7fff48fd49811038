"""The conditions the queue's statements share, each written once.

"Due", "pending", "open quarantine entry", "paused destination" and "raw file held" are
decisions about what the queue holds; a copy of one in a second statement would sooner or
later disagree with the first. Every store builds its WHERE clauses from these.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import and_, exists, or_
from sqlalchemy.sql.elements import BindParameter, ColumnElement

from deid_router.db.models import DestinationState, Instance, Job, QuarantineRow
from deid_router.jobs.states import PENDING_STATES, JobState

# A quarantine entry an operator has neither released nor purged.
OPEN_ENTRY: ColumnElement[bool] = and_(QuarantineRow.released_at.is_(None), QuarantineRow.purged_at.is_(None))

# The job is not finished (queued, running or retrying).
PENDING: ColumnElement[bool] = Job.state.in_(sorted(s.value for s in PENDING_STATES))

# The instance's raw (identified) file is still held: it can be sent (again).
RAW_HELD: ColumnElement[bool] = Instance.raw_deleted_at.is_(None)

# An operator paused the job's destination (console / API): none of its jobs is due until resumed.
NOT_PAUSED: ColumnElement[bool] = ~exists().where(
    DestinationState.destination == Job.destination, DestinationState.paused.is_(True)
)


def due(now: datetime | BindParameter[datetime]) -> ColumnElement[bool]:
    """A job a worker may claim at ``now``: queued, or retrying with its time come, and its
    destination not paused. ``now`` may be a bind parameter (statements built once)."""
    return and_(
        or_(Job.state == JobState.QUEUED.value, and_(Job.state == JobState.RETRYING.value, Job.run_after <= now)),
        NOT_PAUSED,
    )
