"""The operator actions the API and the console share, each audited with the user's name."""

from __future__ import annotations

from dataclasses import dataclass

from deid_router.config import Config
from deid_router.db.operations import DestinationStates, Reports
from deid_router.db.repository import JobRepository
from deid_router.errors import StorageError
from deid_router.forward.echo import EchoResult, echo
from deid_router.http.auth import Principal
from deid_router.observability.audit_messages import Auditor
from deid_router.observability.logging import get_logger
from deid_router.store.holding import Holding

log = get_logger("http.actions")


class NotFound(Exception):
    """No such quarantine entry, job or destination."""


@dataclass
class Actions:
    repo: JobRepository
    reports: Reports
    states: DestinationStates
    holding: Holding
    destinations: tuple[str, ...]
    auditor: Auditor | None = None  # DICOM audit messages ([audit] syslog_url): console logins

    def _audit(self, who: Principal, action: str, detail: str) -> None:
        self.repo.audit(action, who.name, detail)
        log.info("operator_action", action=action, user=who.name, detail=detail)

    def release(self, who: Principal, qid: int) -> str:
        entry = self.repo.quarantine_get(qid)
        if entry is None:
            raise NotFound(f"no quarantine entry {qid}")
        if entry.purged_at is not None:
            outcome = "purged"
        elif entry.released_at is not None:
            outcome = "already_released"
        else:
            outcome = "released" if self.repo.quarantine_release(qid) else "purged"
        self._audit(who, "quarantine_release", f"entry={qid} outcome={outcome}")
        return outcome

    def purge(self, who: Principal, qid: int) -> str:
        if not self.reports.quarantine(qid=qid):
            raise NotFound(f"no quarantine entry {qid}")
        purged, paths = self.reports.purge_entry(qid)
        deleted = 0
        for rel in paths:
            try:
                self.holding.delete(rel)
                self.repo.mark_raw_path_deleted(rel)
                deleted += 1
            except StorageError:
                log.error("raw_purge_failed", entry=qid)
        outcome = "purged" if purged else "not_open"
        self._audit(who, "quarantine_purge", f"entry={qid} outcome={outcome} files={deleted}")
        return outcome

    def retry(self, who: Principal, job_id: int) -> str:
        before = self.repo.job_state(job_id)
        if before is None:
            raise NotFound(f"no job {job_id}")
        changed = self.repo.retry_job(job_id) and before[0] in ("failed", "retrying")
        outcome = "requeued" if changed else f"unchanged_{before[0]}"
        self._audit(who, "retry_job", f"job={job_id} outcome={outcome}")
        return outcome

    def set_paused(self, who: Principal, destination: str, paused: bool, reason: str = "") -> None:
        if destination not in self.destinations:
            raise NotFound(f"no destination {destination!r}")
        self.states.set_paused(destination, paused, who.name, reason[:200])
        self._audit(who, "destination_pause" if paused else "destination_resume", f"destination={destination}")

    def echo(self, who: Principal, destination: str, config: Config) -> EchoResult:
        if destination not in self.destinations:
            raise NotFound(f"no destination {destination!r}")
        result = echo(config.destination(destination), config.listener.ae_title)
        self._audit(who, "destination_echo", f"destination={destination} ok={result.ok}")
        return result

    def login(self, who: Principal, client: str) -> None:
        self._audit(who, "login", f"role={who.role} client={client}")
        if self.auditor is not None:
            self.auditor.user_authentication(who.name, True, peer_host=client)

    def login_failed(self, known_user: str | None, client: str) -> None:
        """A failed console login: to the audit repository, naming the user only if it exists
        (a password typed into the user field must not travel to syslog)."""
        if self.auditor is not None:
            self.auditor.user_authentication(known_user or "unknown", False, peer_host=client)

    def logout(self, who: Principal, client: str) -> None:
        if self.auditor is not None:
            self.auditor.user_authentication(who.name, True, logout=True, peer_host=client)
