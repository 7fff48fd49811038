"""The operator actions the API and the console share, each audited with the user's name."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from deid_router.config import Config
from deid_router.db.operations import DestinationStates, Reports
from deid_router.db.repository import JobRepository
from deid_router import operations
from deid_router.deid.keys import Keys
from deid_router.forward.echo import EchoResult, echo
from deid_router.http.auth import Principal
from deid_router.jobs.selection import Selection
from deid_router.observability.audit_messages import Auditor
from deid_router.observability.logging import get_logger
from deid_router.store.holding import Holding

log = get_logger("http.actions")


@dataclass(frozen=True)
class _OperatorView:
    """What :mod:`deid_router.operations` needs of the node (its OperatorContext)."""

    config: Config
    repo: JobRepository
    holding: Holding


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
    config: Config | None = None  # for the operator actions' destination checks
    keys: Keys | None = None  # for resend: a study or series given by its de-identified UID

    def _audit(self, who: Principal, action: str, detail: str) -> None:
        self.repo.audit(action, who.name, detail)
        log.info("operator_action", action=action, user=who.name, detail=detail)

    def _note(self, who: Principal, action: str, detail: str, audited: bool) -> None:
        """Log the action; audit it here unless ``operations`` already did (it changed something)."""
        if audited:
            log.info("operator_action", action=action, user=who.name, detail=detail)
        else:
            self._audit(who, action, detail)

    def _ops(self) -> _OperatorView:
        assert self.config is not None, "Actions needs the config for operator actions"
        return _OperatorView(self.config, self.repo, self.holding)

    def release(self, who: Principal, qid: int) -> str:
        """One entry, through the same plan and apply as ``quarantine release ID``."""
        plan = operations.plan_release(self._ops(), Selection(ids=(qid,)))
        if plan.missing_ids:
            raise NotFound(f"no quarantine entry {qid}")
        if plan.closed:
            outcome = "purged" if plan.closed[0].purged_at is not None else "already_released"
        else:
            done = operations.apply_release(self._ops(), plan, who.name)
            outcome = "released" if done.released else "purged"
        self._note(who, "quarantine_release", f"entry={qid} outcome={outcome}", audited=not plan.closed)
        return outcome

    def purge(self, who: Principal, qid: int) -> str:
        """One entry, through the same plan and apply as ``quarantine purge ID``: its jobs
        are closed (``purged``) and its raw file goes once no other job needs it."""
        plan = operations.plan_purge(self._ops(), Selection(ids=(qid,)))
        if plan.missing_ids:
            raise NotFound(f"no quarantine entry {qid}")
        done = operations.apply_purge(self._ops(), plan, who.name) if plan.take else None
        outcome = "purged" if done is not None and done.entries else "not_open"
        files = done.raw_deleted if done is not None else 0
        self._note(who, "quarantine_purge", f"entry={qid} outcome={outcome} files={files}", audited=done is not None)
        return outcome

    def retry(self, who: Principal, job_id: int) -> str:
        """One job, through the same plan and apply as ``retry JOB_ID``."""
        plan = operations.plan_retry(self._ops(), Selection(ids=(job_id,)))
        if plan.missing_ids:
            raise NotFound(f"no job {job_id}")
        if plan.take:
            requeued = operations.apply_retry(self._ops(), plan, who.name).requeued
        else:
            requeued = []
        state = self.repo.job_state(job_id)
        outcome = "requeued" if requeued else f"unchanged_{state[0] if state else 'gone'}"
        self._note(who, "retry_job", f"job={job_id} outcome={outcome}", audited=bool(plan.take))
        return outcome

    def resend(self, who: Principal, destination: str, study: str | None = None,
               series: str | None = None) -> dict[str, Any]:
        """Delivered instances of one study or series (either UID form) queued for
        ``destination`` again, through the same plan and apply as ``deid-router resend``.
        Ids and counts only: the UID given is neither returned nor logged."""
        if destination not in self.destinations:
            raise NotFound(f"no destination {destination!r}")
        study, series = (u.strip() or None if u is not None else None for u in (study, series))
        if (study is None) == (series is None):
            raise ValueError("give exactly one of study_uid or series_uid")
        assert self.keys is not None, "Actions needs the keys for resend"
        plan = operations.plan_resend(self._ops(), self.keys, destination, study=study, series=series)
        job_ids = operations.apply_resend(self._ops(), plan, who.name) if plan.instance_ids else []
        self._note(who, "resend", f"destination={destination} jobs={len(job_ids)}", audited=bool(plan.instance_ids))
        return {"destination": destination, "job_ids": job_ids, "already_queued": plan.already_queued,
                "unreadable": plan.unreadable, "raw_deleted": plan.raw_deleted_elsewhere}

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
