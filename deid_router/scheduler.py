"""Periodic housekeeping on APScheduler: stale leases, raw-file purge, queue metrics."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from apscheduler.schedulers.background import BackgroundScheduler
from prometheus_client.registry import Collector

from deid_router.db.operations import Reports
from deid_router.db.repository import JobRepository
from deid_router.errors import QueueError, StorageError
from deid_router.jobs.leases import on_expiry
from deid_router.jobs.policy import RetryPolicy
from deid_router.observability.logging import get_logger
from deid_router.observability.metrics import QueueCollector, registry_for, render
from deid_router.store.holding import Holding

log = get_logger("scheduler")


class Housekeeping:
    """The periodic tasks, callable directly (tests) or from the scheduler."""

    def __init__(
        self, repo: JobRepository, holding: Holding, keep_raw_hours: float, policy: RetryPolicy,
        destinations: Sequence[str] = (),
        children: Collector | None = None,  # the node's process metrics (``/metrics`` renders it too)
    ) -> None:
        self.repo = repo
        self.holding = holding
        self.keep_raw = timedelta(hours=keep_raw_hours)
        self.policy = policy
        queue = QueueCollector(Reports(repo.engine, repo), holding.free_bytes, destinations)
        self._registry = registry_for(queue, children)

    def sweep_orphans(self) -> int:
        """Delete this node's raw files that never got committed (killed between fsync and commit).

        Run at start, before the listener accepts: none of this node's transfers is in flight.
        """
        own = self.holding.own_raw_files()
        known = self.repo.known_raw_paths(own)
        orphans = [p for p in own if p not in known]
        for rel in orphans:
            self.holding.delete(rel)
        if orphans:
            log.warning("orphan_raw_files_removed", count=len(orphans))
        return len(orphans)

    def requeue_stale(self) -> int:
        """Jobs of dead workers back to the queue (or, out of attempts, to quarantine)."""
        try:
            n = self.repo.expire_leases(on_expiry(self.policy))
        except QueueError:
            log.error("stale_lease_check_failed")
            return 0
        if n:
            log.warning("stale_leases_requeued", count=n)
        return n

    def purge_raw(self) -> int:
        """Delete raw (identified) files once every job of the instance is done and kept long enough."""
        try:
            ready = self.repo.purgeable_instances(datetime.now(UTC) - self.keep_raw)
        except QueueError:
            log.error("raw_purge_query_failed")
            return 0
        purged = 0
        for instance_id, raw_path in ready:
            try:
                self.holding.delete(raw_path)
                self.repo.mark_raw_deleted(instance_id)
                purged += 1
            except (StorageError, QueueError):
                log.error("raw_purge_failed", instance_id=instance_id)
        if purged:
            log.info("raw_purged", count=purged)
        return purged

    def report(self) -> None:
        """Log the queue counts and write the metrics of ``/metrics`` as a Prometheus textfile
        (node_exporter's textfile collector reads ``<storage.root>/metrics/<node>.prom``)."""
        try:
            counts = self.repo.status_counts()
        except QueueError:
            log.error("queue_metrics_failed")
            return
        log.info("queue_metrics", jobs=counts["jobs"], quarantined=counts["quarantined"])
        try:
            with self.holding.atomic_writer(self.holding.metrics_path) as fh:
                fh.write(render(self._registry))
        except StorageError:
            log.error("metrics_write_failed")


def start_scheduler(tasks: Housekeeping, lease_seconds: float) -> BackgroundScheduler:
    sched = BackgroundScheduler(timezone="UTC", job_defaults={"coalesce": True, "max_instances": 1})
    sched.add_job(tasks.requeue_stale, "interval", seconds=max(lease_seconds / 2.0, 1.0), id="stale_leases")
    sched.add_job(tasks.purge_raw, "interval", seconds=30, id="purge_raw")
    sched.add_job(tasks.report, "interval", seconds=15, id="metrics", next_run_time=datetime.now(UTC))
    sched.start()
    return sched
