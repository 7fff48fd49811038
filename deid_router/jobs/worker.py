"""The worker loop: claim due jobs, de-identify, forward, and record what the policy decides.

The worker never writes SQL (the repository does) and never chooses a next state (the
policy does). It serves one destination per batch, rotating through the destinations that
have due jobs, so one slow or broken PACS never holds back another's jobs for longer than a
batch. A heartbeat thread keeps the leases of the jobs it holds alive.
"""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from deid_router.db.repository import ClaimedJob, JobRepository
from deid_router.deid.engine import Deidentifier
from deid_router.errors import DeidError, QueueError, StorageError
from deid_router.faults import fault_point
from deid_router.forward.base import Delivery, Destination
from deid_router.jobs.outcome import Outcome, OutcomeKind
from deid_router.jobs.policy import RetryPolicy, decide
from deid_router.observability.logging import get_logger
from deid_router.store.holding import Holding

log = get_logger("worker")


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
    destinations: Mapping[str, Destination]
    policy: RetryPolicy
    lease_seconds: float
    batch_size: int
    poll_seconds: float = 0.5
    clock: Callable[[], float] = time.monotonic
    stats: WorkerStats = field(default_factory=WorkerStats)
    _held: set[int] = field(default_factory=set)
    _held_lock: threading.Lock = field(default_factory=threading.Lock)
    _rotation: int = 0

    def run(self, stop: threading.Event) -> None:
        """Process batches until ``stop`` is set; then release whatever is still held."""
        beat = threading.Thread(target=self._heartbeat, args=(stop,), name=f"heartbeat-{self.owner}", daemon=True)
        beat.start()
        backoff = self.poll_seconds
        try:
            while not stop.is_set():
                try:
                    done = self.run_once()
                    backoff = self.poll_seconds
                except QueueError as exc:
                    log.error("worker_queue_unavailable", error=type(exc.__cause__ or exc).__name__)
                    done = 0
                    backoff = min(backoff * 2, 30.0)
                if not done:
                    stop.wait(backoff)
        finally:
            try:
                released = self.repo.release(self.owner)
                if released:
                    log.info("jobs_released", owner=self.owner, count=released)
            except QueueError:
                log.error("jobs_release_failed", owner=self.owner)
            for dest in self.destinations.values():
                dest.close()

    def run_once(self) -> int:
        """Claim and process one batch for the next destination with due jobs."""
        due = [d for d in self.repo.next_due_destinations() if d in self.destinations]
        if not due:
            return 0
        name = due[self._rotation % len(due)]
        self._rotation += 1
        jobs = self.repo.claim(self.owner, self.lease_seconds, self.batch_size, destination=name)
        if not jobs:
            return 0
        fault_point("after_claim")
        with self._held_lock:
            self._held.update(j.job_id for j in jobs)
        try:
            self._process(name, jobs)
        finally:
            with self._held_lock:
                self._held.difference_update(j.job_id for j in jobs)
        return len(jobs)

    def _process(self, name: str, jobs: list[ClaimedJob]) -> None:
        deliveries: list[Delivery] = []
        outcomes: dict[int, Outcome] = {}
        for job in jobs:
            delivery, outcome = self._deidentify(job)
            if delivery is not None:
                deliveries.append(delivery)
            else:
                outcomes[job.job_id] = outcome  # type: ignore[assignment]
        if deliveries:
            outcomes.update(self.destinations[name].send(deliveries))
            fault_point("after_send_before_done")
        for job in jobs:
            outcome = outcomes.get(job.job_id) or Outcome(OutcomeKind.RETRY, None, "no_outcome")
            self._finish(job, outcome)
            self.holding.work_path(job.job_id).unlink(missing_ok=True)

    def _deidentify(self, job: ClaimedJob) -> tuple[Delivery | None, Outcome | None]:
        src = self.holding.absolute(job.raw_path)
        dst = self.holding.work_path(job.job_id)
        try:
            with self.holding.atomic_writer(dst) as fh:
                fault_point("during_deid")
                result = self.deidentifier.deidentify_file(src, fh)
        except DeidError as exc:
            log.warning("job_deid_refused", job_id=job.job_id, reason=exc.reason, path=exc.path)
            return None, Outcome(OutcomeKind.QUARANTINE, None, f"deid:{exc.reason}")
        except StorageError as exc:
            log.error("job_deid_storage_failed", job_id=job.job_id, reason=str(exc))
            return None, Outcome(OutcomeKind.RETRY, None, "work_write_failed")
        except FileNotFoundError:
            log.error("job_raw_missing", job_id=job.job_id)
            return None, Outcome(OutcomeKind.PERMANENT, None, "raw_file_missing")
        except QueueError:
            raise  # the crosswalk could not be written: the batch is released, nothing is sent
        except Exception as exc:  # a bug must cost retries, then quarantine; never a dead worker
            log.error("job_deid_crashed", job_id=job.job_id, error=type(exc).__name__)
            return None, Outcome(OutcomeKind.RETRY, None, f"internal_error:{type(exc).__name__}")
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

    def _finish(self, job: ClaimedJob, outcome: Outcome) -> None:
        decision = decide(job.attempts, outcome, self.policy, datetime.now(UTC))
        applied = self.repo.finish(job.job_id, self.owner, decision)
        self.stats.processed += 1
        if outcome.delivered:
            self.stats.delivered += 1
        elif decision.to_state == "retrying":
            self.stats.retried += 1
        else:
            self.stats.failed += 1
        log.info(
            "job_finished",
            job_id=job.job_id,
            destination=job.destination,
            state=decision.to_state,
            attempt=job.attempts,
            status_code=outcome.status_code,
            reason=outcome.reason,
            applied=applied,
        )

    def _heartbeat(self, stop: threading.Event) -> None:
        interval = max(self.lease_seconds / 3.0, 0.5)
        while not stop.wait(interval):
            with self._held_lock:
                held = list(self._held)
            if held:
                try:
                    self.repo.heartbeat(self.owner, held, self.lease_seconds)
                except QueueError:
                    log.error("heartbeat_failed", owner=self.owner)
