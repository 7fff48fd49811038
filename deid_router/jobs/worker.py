"""The worker: claim due jobs, de-identify, forward, and record what the policy decides.

Each worker process runs one thread per lane of each destination (``max_associations``),
and each thread claims only its own destination's jobs, so a PACS that is down, slow or never
answers holds up nothing but itself. De-identification is CPU work shared by the threads of a
process; the node runs one process per core. Every thread de-identifies its batch first and
only then takes a lane (``forward.lanes``: a lease shared by all workers of all nodes), so
the PACS sees at most ``max_associations`` associations while every core de-identifies. The worker never writes SQL (the repository does) and never chooses a next state
(``jobs.policy`` does). A heartbeat thread keeps the leases of held jobs alive.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from deid_router.db.repository import ClaimedJob, JobRepository
from deid_router.deid.engine import Deidentifier
from deid_router.errors import DeidError, QueueError, StorageError
from deid_router.faults import fault_point
from deid_router.forward.base import Delivery
from deid_router.forward.lanes import Lane
from deid_router.forward.status import FailureKind, classify_failure
from deid_router.jobs.outcome import Outcome, OutcomeKind
from deid_router.jobs.policy import Decision, RetryPolicy, decide
from deid_router.observability.audit_messages import Auditor
from deid_router.observability.logging import get_logger
from deid_router.observability.process_metrics import NO_METRICS, Observer
from deid_router.store.holding import Holding

log = get_logger("worker")

_MAX_QUEUE_BACKOFF = 30.0
_DELIVERED = (OutcomeKind.DELIVERED, OutcomeKind.DELIVERED_WARNING)
_NO_OUTCOME = classify_failure(FailureKind.NO_OUTCOME)
_FINISH_ATTEMPTS = 5


@dataclass
class WorkerStats:
    processed: int = 0
    delivered: int = 0
    retried: int = 0
    failed: int = 0


@dataclass
class Worker:
    owner: str
    repo: JobRepository
    holding: Holding
    deidentifier: Deidentifier
    destinations: Mapping[str, Sequence[Lane]]  # per destination, one sender per lane it may hold
    policy: RetryPolicy
    lease_seconds: float
    batch_size: int
    poll_seconds: float = 0.5
    work_prefix: str = "w"  # names this worker's work files; unique among a node's workers
    auditor: Auditor | None = None  # DICOM audit messages (Instances Transferred), when configured
    stats: WorkerStats = field(default_factory=WorkerStats)
    _held: set[int] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _unavailable: dict[str, int] = field(default_factory=dict)  # consecutive failures per destination
    _stop: threading.Event = field(default_factory=threading.Event)
    profiles: Mapping[str, Deidentifier] = field(default_factory=dict)  # [profiles.NAME]; "" is deidentifier
    metrics: Observer = NO_METRICS  # the latency histograms of /metrics (observability.process_metrics)

    def run(self, stop: threading.Event) -> None:
        """Serve every destination until ``stop`` is set; then release whatever is still held."""
        self._stop = stop
        serving = [(name, i, lane) for name, lanes in self.destinations.items() for i, lane in enumerate(lanes)]
        threads = [
            threading.Thread(target=self._serve, args=(name, lane, n, stop), name=f"dest-{name}-{i}", daemon=True)
            for n, (name, i, lane) in enumerate(serving)
        ]
        threads.append(threading.Thread(target=self._heartbeat, args=(stop,), name="heartbeat", daemon=True))
        for t in threads:
            t.start()
        stop.wait()
        for t in threads:
            t.join(timeout=15.0)
        try:
            released = self.repo.release(self.owner)
            if released:
                log.info("jobs_released", owner=self.owner, count=released)
        except QueueError:
            log.error("jobs_release_failed", owner=self.owner)
        for lanes in self.destinations.values():
            for lane in lanes:
                lane.close()
        if all(not t.is_alive() for t in threads):  # no lane still writes: its files may go
            self.holding.clear_work(self.work_prefix)

    def _serve(self, name: str, lane: Lane, lane_no: int, stop: threading.Event) -> None:
        """One association's loop for destination ``name``: batches while there is work; pauses
        while the destination is unavailable. Claims are atomic, so lanes never share a job."""
        wait = self.poll_seconds
        while not stop.is_set():
            try:
                done, pause = self.run_once(name, lane, lane_no)
                wait = pause if pause else self.poll_seconds
            except QueueError as exc:
                log.error("worker_queue_unavailable", destination=name, error=type(exc.__cause__ or exc).__name__)
                done, wait = 0, min(max(wait, self.poll_seconds) * 2, _MAX_QUEUE_BACKOFF)
            if not done or wait > self.poll_seconds:
                stop.wait(wait)

    def run_once(self, name: str, lane: Lane, lane_no: int = 0) -> tuple[int, float]:
        """Claim and process one batch for destination ``name`` over ``lane`` (this worker's
        ``lane_no``-th: its work files are its own).

        Returns (jobs processed, seconds to pause this destination: 0 unless it is unavailable).
        The batch is de-identified before the lane is taken (every worker de-identifies at
        once); the lane is let go at once when there is no due work or the destination pauses.
        """
        try:
            jobs = self.repo.claim(self.owner, self.lease_seconds, self.batch_size, destination=name)
        except QueueError:
            lane.idle(due=False)
            raise
        if not jobs:
            lane.idle(due=False)
            return 0, 0.0
        fault_point("after_claim")
        with self._lock:
            self._held.update(j.job_id for j in jobs)
        try:
            return len(jobs), self._process(name, lane, jobs, f"{self.work_prefix}-{lane_no}")
        finally:
            with self._lock:
                self._held.difference_update(j.job_id for j in jobs)

    def _process(self, name: str, lane: Lane, jobs: list[ClaimedJob], work_prefix: str) -> float:
        deliveries: list[Delivery] = []
        outcomes: dict[int, Outcome] = {}
        slots = [f"{work_prefix}-{i}" for i in range(len(jobs))]
        for job, slot in zip(jobs, slots, strict=True):
            delivery, outcome = self._deidentify(job, slot)
            if delivery is not None:
                deliveries.append(delivery)
            elif outcome is not None:
                outcomes[job.job_id] = outcome
        if deliveries:
            if not lane.hold(self._stop):
                # Stopping while every lane was busy: nothing was sent; run() gives the jobs back.
                for slot in slots:
                    self.holding.release_work(slot)
                return 0.0
            try:
                started = time.perf_counter()
                outcomes.update(lane.send(deliveries))
                self.metrics.forwarded(name, time.perf_counter() - started)  # per batch
                fault_point("after_send_before_done")
            finally:
                lane.idle(due=True)  # an idle association must not hold up another worker's batch
            if self.auditor is not None:
                self._audit(name, deliveries, outcomes)
        unavailable = any(o.kind is OutcomeKind.UNAVAILABLE for o in outcomes.values())
        failures = self._unavailable.get(name, 0) + 1 if unavailable else 0
        self._unavailable[name] = failures
        pause = 0.0
        now = datetime.now(UTC)
        final = []
        for job in jobs:
            outcome = outcomes.get(job.job_id) or classify_failure(FailureKind.NO_OUTCOME)
            decision = decide(job.attempts, outcome, self.policy, now, destination_failures=max(failures, 1))
            final.append((job, outcome, decision))
            if outcome.kind is OutcomeKind.UNAVAILABLE and decision.run_after is not None:
                pause = max(pause, (decision.run_after - now).total_seconds())
        applied = self._finish_with_retries([(job.job_id, decision) for job, _, decision in final])
        for (job, outcome, decision), ok in zip(final, applied, strict=True):
            self._record(job, outcome, decision.to_state.value, ok)
        for slot in slots:
            self.holding.release_work(slot)
        if unavailable:
            lane.idle(due=False)
            log.warning("destination_paused", destination=name, seconds=round(pause, 1), failures=failures)
        return pause

    def _audit(self, name: str, deliveries: list[Delivery], outcomes: dict[int, Outcome]) -> None:
        sent = [d for d in deliveries if outcomes.get(d.job_id, _NO_OUTCOME).kind in _DELIVERED]
        if sent and self.auditor is not None:
            self.auditor.instances_transferred(
                name, "", [d.study_instance_uid for d in sent], failed=len(sent) < len(deliveries)
            )

    def _finish_with_retries(self, decisions: list[tuple[int, Decision]]) -> list[bool]:
        """Record outcomes, retrying a few times: after a send, a lost write means the lease
        expires and the PACS gets the instance twice (same UID, but still avoidable)."""
        for attempt in range(_FINISH_ATTEMPTS):
            try:
                return self.repo.finish_many(self.owner, decisions)
            except QueueError:
                if attempt == _FINISH_ATTEMPTS - 1:
                    raise
                log.warning("job_finish_retried", attempt=attempt + 1, jobs=len(decisions))
                time.sleep(0.2 * (attempt + 1))
        raise AssertionError("unreachable")

    def _deidentify(self, job: ClaimedJob, slot: str) -> tuple[Delivery | None, Outcome | None]:
        src = self.holding.absolute(job.raw_path)
        dst = self.holding.work_path(slot)
        if not src.is_file():
            # Checked up front: inside the writer the ENOENT becomes a StorageError, and a
            # missing raw file was retried max_attempts times as "work_write_failed".
            log.error("job_raw_missing", job_id=job.job_id)
            return None, classify_failure(FailureKind.RAW_FILE_MISSING)
        deidentifier = self.profiles.get(job.profile) if job.profile else self.deidentifier
        if deidentifier is None:
            # the job names a profile no longer configured: never fall back to another one
            log.error("job_profile_unknown", job_id=job.job_id)
            return None, classify_failure(FailureKind.DEID_REFUSED, "profile_not_configured")
        started = time.perf_counter()
        try:
            with self.holding.work_writer(slot) as fh:
                fault_point("during_deid")
                result = deidentifier.deidentify_file(src, fh)
        except DeidError as exc:
            log.warning("job_deid_refused", job_id=job.job_id, reason=exc.reason, path=exc.path)
            return None, classify_failure(FailureKind.DEID_REFUSED, exc.reason)
        except StorageError as exc:
            log.error("job_deid_storage_failed", job_id=job.job_id, reason=str(exc))
            return None, classify_failure(FailureKind.WORK_WRITE_FAILED)
        except QueueError:
            raise  # the crosswalk could not be written: nothing is sent; the lease expires
        except Exception as exc:  # a bug must cost retries, then quarantine; never a dead worker
            log.error("job_deid_crashed", job_id=job.job_id, error=type(exc).__name__)
            return None, classify_failure(FailureKind.INTERNAL_ERROR, type(exc).__name__)
        finally:  # every run of the engine, a refusal as much as a success
            self.metrics.deidentified(time.perf_counter() - started)
        return (
            Delivery(
                job_id=job.job_id,
                path=dst,
                sop_class_uid=result.sop_class_uid,
                sop_instance_uid=result.sop_instance_uid,
                study_instance_uid=result.study_instance_uid,
                series_instance_uid=result.series_instance_uid,
                transfer_syntax_uid=result.transfer_syntax_uid,
            ),
            None,
        )

    def _record(self, job: ClaimedJob, outcome: Outcome, state: str, applied: bool) -> None:
        with self._lock:
            self.stats.processed += 1
            if outcome.delivered:
                self.stats.delivered += 1
            elif state == "retrying":
                self.stats.retried += 1
            else:
                self.stats.failed += 1
        log.info(
            "job_finished",
            job_id=job.job_id,
            destination=job.destination,
            state=state,
            attempt=job.attempts,
            status_code=outcome.status_code,
            reason=outcome.reason,
            applied=applied,
        )

    def _heartbeat(self, stop: threading.Event) -> None:
        interval = max(self.lease_seconds / 3.0, 0.5)
        while not stop.wait(interval):
            with self._lock:
                held = list(self._held)
            if held:
                try:
                    self.repo.heartbeat(self.owner, held, self.lease_seconds)
                except QueueError:
                    log.error("heartbeat_failed", owner=self.owner)
