"""The job repository: every store of the queue database behind one object.

The SQL lives in modules named after what they hold: the job queue (``db.job_queue``, with
the claim statements in ``db.claim``), the quarantine (``db.quarantine``), the job reports
(``db.job_reports``), instances and their raw files (``db.instances``), the crosswalk and audit
trail (``db.crosswalk_audit``); the job history in ``db.job_events`` and the conditions they
share in ``db.predicates``. :class:`JobRepository` is their union, for the callers that hold
one object for the whole queue (the composition root hands it around); each store works alone
on the same engine too. The stores share nothing but the engine and the clock.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from sqlalchemy import Engine

from deid_router.db.crosswalk_audit import CrosswalkAuditStore
from deid_router.db.engine import utc_now
from deid_router.db.instances import CommitState, InstanceRecords
from deid_router.db.job_events import JobEvent
from deid_router.db.job_queue import ClaimedJob, EnqueueResult, JobQueue, NewInstance, new_instance_id
from deid_router.db.job_reports import DestinationDetail, JobReports, JobSummary, StatusCounts
from deid_router.db.quarantine import CONFLICT_REASON, PurgeResult, QuarantineEntry, QuarantineStore
from deid_router.jobs.leases import on_expiry
from deid_router.jobs.policy import RetryPolicy

__all__ = [
    "CONFLICT_REASON",
    "ClaimedJob",
    "CommitState",
    "DestinationDetail",
    "EnqueueResult",
    "JobEvent",
    "JobRepository",
    "JobSummary",
    "NewInstance",
    "PurgeResult",
    "QuarantineEntry",
    "StatusCounts",
    "new_instance_id",
]


class JobRepository(JobQueue, QuarantineStore, JobReports, InstanceRecords, CrosswalkAuditStore):
    """Durable queue operations on an engine made by ``db.engine.make_engine``."""

    def __init__(self, engine: Engine, clock: Callable[[], datetime] = utc_now) -> None:
        super().__init__(engine, clock)

    def requeue_stale(self, policy: RetryPolicy | None = None) -> int:
        """Running jobs whose lease expired go back to the queue; the attempt stays counted.

        With ``policy``, a stale job that already used ``max_attempts`` is failed and
        quarantined instead (``max_attempts_exceeded: lease_expired``), so an instance that
        crashes every worker cannot loop forever: the decisions are ``jobs.leases``'. Returns
        the number of stale jobs handled.
        """
        return self.expire_leases(on_expiry(policy))
