"""Operator actions: retry, quarantine release and purge, resend, and the status report.

One module for the CLI and the HTTP API: each action is a *plan* (what it would do, nothing
changed: shown to the operator before they confirm) and an *apply* (does it, audited, returns
what happened). The selection rules live in :mod:`deid_router.jobs.selection`, the writes in
:mod:`deid_router.db.repository` (the status report is ``db.operations.Reports.status``). Nothing here prints or returns a tag value: ids, states,
codes, counts and hashed UIDs only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from deid_router.config import Config
from deid_router.db.guard import database_label, keys_for_reading, open_existing
from deid_router.db.engine import utc_now
from deid_router.db.repository import JobRepository, JobSummary, QuarantineEntry
from deid_router.deid.keys import Keys
from deid_router.errors import ConfigError, StorageError
from deid_router.jobs.selection import Item, Selection, choose
from deid_router.jobs.states import JobState
from deid_router.store.holding import Holding

__all__ = [
    "CommandContext", "OperatorContext", "list_quarantine", "PurgePlan", "PurgeOutcome", "ReleasePlan", "ReleaseOutcome",
    "ResendPlan", "RetryPlan", "RetryOutcome", "apply_purge", "apply_release", "apply_resend", "apply_retry",
    "open_command_context", "plan_purge", "plan_release", "plan_resend", "plan_retry",
]


class OperatorContext(Protocol):
    """What an action needs: ``app.Context`` (the node, for the HTTP API) and
    :class:`CommandContext` (a CLI command) both have it."""

    @property
    def config(self) -> Config: ...

    @property
    def repo(self) -> JobRepository: ...

    @property
    def holding(self) -> Holding: ...


@dataclass
class CommandContext:
    """An existing node's database and holding area, opened by a command: creates nothing."""

    config: Config
    repo: JobRepository
    holding: Holding
    engine: Any = field(repr=False)
    _auditor: Any = field(default=None, repr=False)

    @property
    def auditor(self) -> Any:
        """DICOM audit messages (``[audit]``), made when first used."""
        if self._auditor is None:
            from deid_router.app import build_auditor

            self._auditor = build_auditor(self.config)
        return self._auditor

    def keys(self) -> Keys:
        """The secret, checked against the database's fingerprint; never created."""
        return keys_for_reading(self.repo, self.config.deid.secret_file, database_label(self.config.queue.url))

    def close(self) -> None:
        if self._auditor is not None:
            self._auditor.close()
        self.engine.dispose()


def open_command_context(config: Config) -> CommandContext:
    """Open the node's existing database (MissingDatabaseError naming it otherwise)."""
    from deid_router.app import node_name

    engine = open_existing(config.queue.url, int(config.queue.busy_timeout_seconds * 1000))
    return CommandContext(config, JobRepository(engine), Holding(config.storage.root, node_name(config)), engine)


def _known_destination(config: Config, name: str | None) -> None:
    if name is not None and name not in {d.name for d in config.destinations}:
        known = ", ".join(d.name for d in config.destinations)
        raise ConfigError([(str(config.path), "--destination", f"no destination {name!r} (configured: {known})")])


# --------------------------------------------------------------------------- retry


@dataclass(frozen=True)
class RetryPlan:
    take: list[JobSummary]
    protected: list[JobSummary]  # conflicts and burned-in: only with --reason naming them
    not_retryable: list[JobSummary]  # named by id: not failed, or its raw file is gone
    missing_ids: list[int]


@dataclass(frozen=True)
class RetryOutcome:
    requeued: list[int]


def plan_retry(ctx: OperatorContext, sel: Selection, now: datetime | None = None) -> RetryPlan:
    """Failed jobs matching ``sel`` (named ids may also be retrying); nothing is changed."""
    _known_destination(ctx.config, sel.destination)
    now = now or utc_now()
    states = [JobState.FAILED.value] if sel.bulk else []
    jobs = ctx.repo.list_jobs(states=states, destination=sel.destination, ids=sel.ids, oldest_first=True)
    found = {j.id for j in jobs}
    retryable = [j for j in jobs if j.state in (JobState.FAILED.value, JobState.RETRYING.value) and j.raw_held]
    not_retryable = [j for j in jobs if j not in retryable]
    choice = choose([(Item(j.id, j.destination, j.last_reason, j.updated_at), j) for j in retryable], sel, now)
    return RetryPlan(choice.take, choice.protected, not_retryable, [i for i in sel.ids if i not in found])


def apply_retry(ctx: OperatorContext, plan: RetryPlan, actor: str) -> RetryOutcome:
    ids = [j.id for j in plan.take]
    requeued = ctx.repo.requeue_jobs(ids, "operator_retry") if ids else []
    ctx.repo.audit("retry", actor, f"jobs={len(requeued)} ids={_ids(requeued)}")
    return RetryOutcome(requeued)


# --------------------------------------------------------------------------- quarantine


def _entry_item(e: QuarantineEntry) -> Item:
    return Item(e.id, e.destination, e.reason, e.created_at)


@dataclass(frozen=True)
class ReleasePlan:
    take: list[QuarantineEntry]
    protected: list[QuarantineEntry]
    closed: list[QuarantineEntry]  # named by id, already released or purged
    missing_ids: list[int]


@dataclass(frozen=True)
class ReleaseOutcome:
    released: list[int]
    gone: list[int]  # purged meanwhile: nothing to release


def _entries_for(ctx: OperatorContext, sel: Selection) -> tuple[list[QuarantineEntry], list[QuarantineEntry], list[int]]:
    """(open entries, closed entries named by id, ids not found)."""
    _known_destination(ctx.config, sel.destination)
    if sel.bulk:
        return ctx.repo.quarantine_list(), [], []
    everything = {e.id: e for e in ctx.repo.quarantine_list(include_closed=True) if e.id in set(sel.ids)}
    opened = [e for e in everything.values() if e.released_at is None and e.purged_at is None]
    closed = [e for e in everything.values() if e not in opened]
    return opened, closed, [i for i in sel.ids if i not in everything]


def list_quarantine(ctx: OperatorContext, sel: Selection, include_closed: bool = False) -> list[QuarantineEntry]:
    """Entries matching the filters (``quarantine list``), oldest first."""
    _known_destination(ctx.config, sel.destination)
    entries = ctx.repo.quarantine_list(include_closed=include_closed)
    return choose([(_entry_item(e), e) for e in entries], sel, utc_now(), guard=False).take


def plan_release(ctx: OperatorContext, sel: Selection, now: datetime | None = None) -> ReleasePlan:
    opened, closed, missing = _entries_for(ctx, sel)
    choice = choose([(_entry_item(e), e) for e in opened], sel, now or utc_now())
    return ReleasePlan(choice.take, choice.protected, closed, missing)


def apply_release(ctx: OperatorContext, plan: ReleasePlan, actor: str) -> ReleaseOutcome:
    released: list[int] = []
    gone: list[int] = []
    for e in plan.take:
        (released if ctx.repo.quarantine_release(e.id) else gone).append(e.id)
    ctx.repo.audit("quarantine_release", actor, f"entries={len(released)} ids={_ids(released)}")
    return ReleaseOutcome(released, gone)


@dataclass(frozen=True)
class PurgePlan:
    take: list[QuarantineEntry]
    closed: list[QuarantineEntry]
    missing_ids: list[int]


@dataclass(frozen=True)
class PurgeOutcome:
    entries: int
    jobs_closed: int
    raw_deleted: int


def plan_purge(ctx: OperatorContext, sel: Selection, now: datetime | None = None) -> PurgePlan:
    opened, closed, missing = _entries_for(ctx, sel)
    choice = choose([(_entry_item(e), e) for e in opened], sel, now or utc_now(), guard=False)
    return PurgePlan(choice.take, closed, missing)


def apply_purge(ctx: OperatorContext, plan: PurgePlan, actor: str) -> PurgeOutcome:
    """Purge the planned entries, close their jobs, delete the raw files that may go.

    Idempotent in what it reports: a second run purges 0 entries and deletes 0 files (each
    deleted file is marked so in the database).
    """
    result = ctx.repo.purge_quarantine_entries([e.id for e in plan.take])
    deleted = 0
    for rel in result.raw_paths:
        try:
            ctx.holding.delete(rel)
        except StorageError:
            continue  # stays unmarked: the next purge tries again
        ctx.repo.mark_raw_path_deleted(rel)
        deleted += 1
    ctx.repo.audit("quarantine_purge", actor, f"entries={result.entries} jobs={result.jobs_closed} files={deleted}")
    return PurgeOutcome(result.entries, result.jobs_closed, deleted)


# --------------------------------------------------------------------------- resend


@dataclass(frozen=True)
class ResendPlan:
    destination: str
    instance_ids: list[str]  # held, delivered to the destination, matching the study/series
    already_queued: int  # matching instances with a job to the destination still pending
    unreadable: int  # held raw files that could not be read
    raw_deleted_elsewhere: int  # instances delivered to the destination whose raw file is gone


def _uids_of(path: Path) -> tuple[str, str] | None:
    from pydicom import dcmread
    from pydicom.errors import InvalidDicomError

    try:
        ds = dcmread(path, stop_before_pixels=True, specific_tags=["StudyInstanceUID", "SeriesInstanceUID"])
    except (OSError, InvalidDicomError, ValueError, EOFError):
        return None
    return str(ds.get("StudyInstanceUID", "")), str(ds.get("SeriesInstanceUID", ""))


def plan_resend(
    ctx: OperatorContext, keys: Keys, destination: str, study: str | None = None, series: str | None = None
) -> ResendPlan:
    """Held instances of a study or series (given as received, or as the de-identified UID
    the PACS shows) that were delivered to ``destination``.

    The database keeps no study or series UID (no tag value at rest but keyed tokens), so the
    held raw files' headers are read; an instance whose raw file was deleted after delivery
    (``storage.keep_raw_hours``) cannot be sent again and is only counted.
    """
    _known_destination(ctx.config, destination)
    if (study is None) == (series is None):
        raise ConfigError([("-", "--study/--series", "give exactly one of --study UID or --series UID")])
    wanted = (study or series or "").strip()
    matched: list[str] = []
    unreadable = 0
    for instance_id, rel in ctx.repo.held_instances():
        try:
            path = ctx.holding.absolute(rel)
        except StorageError:
            unreadable += 1
            continue
        uids = _uids_of(path)
        if uids is None:
            unreadable += 1
            continue
        uid = uids[0] if study is not None else uids[1]
        if uid and (uid == wanted or keys.uid(uid) == wanted):
            matched.append(instance_id)
    delivered = {j.instance_id for j in ctx.repo.list_jobs(states=[JobState.DONE.value], destination=destination)}
    pending = {
        j.instance_id for j in ctx.repo.list_jobs(
            states=[JobState.QUEUED.value, JobState.RUNNING.value, JobState.RETRYING.value], destination=destination
        )
    }
    ready = [i for i in matched if i in delivered and i not in pending]
    return ResendPlan(
        destination, ready, len([i for i in matched if i in pending]), unreadable,
        ctx.repo.delivered_count_without_raw(destination),
    )


def apply_resend(ctx: OperatorContext, plan: ResendPlan, actor: str) -> list[int]:
    """Queue a new job per planned instance; the workers de-identify the raw file again
    (same output UIDs: the PACS sees the same instances)."""
    job_ids = ctx.repo.resend(plan.instance_ids, plan.destination) if plan.instance_ids else []
    ctx.repo.audit("resend", actor, f"destination={plan.destination} jobs={len(job_ids)}")
    return job_ids


def _ids(ids: Sequence[int]) -> str:
    shown = ",".join(str(i) for i in ids[:20])
    return shown + (f",...(+{len(ids) - 20})" if len(ids) > 20 else "")
