"""The commands of ../shared/contract.md.

Exit codes: 0 ok, 2 bad configuration or usage, 1 anything else. Errors are printed as one
line naming the problem and the fix, never as a bare traceback, and never with a tag value.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from deid_router.config import ENV_CONFIG, Config, load_config
from deid_router.errors import ConfigError, DeidRouterError, MissingDatabaseError, QueueError, SecretMismatchError

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # usage errors exit 2, as the contract says
        self.print_usage(sys.stderr)
        print(f"deid-router: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


class _TopParser(_Parser):
    """The top level: ``--config`` given nowhere falls back to ``$DEID_ROUTER_CONFIG``.

    Every level takes ``--config`` (before or after the subcommand, as the README writes it:
    ``deid-router quarantine list --config C``); none has a default of its own, or a nested
    parser's default would overwrite the value given before it.
    """

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        ns, rest = super().parse_known_args(args, namespace)
        if getattr(ns, "config", None) is None:
            ns.config = os.environ.get(ENV_CONFIG)
        return ns, rest


def _config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        default=argparse.SUPPRESS,
        help=f"path to the TOML configuration (default: ${ENV_CONFIG})",
    )


def _json_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print JSON")


def _yes_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--yes", "-y", action="store_true", default=argparse.SUPPRESS,
                   help="do it without asking (needed when not run from a terminal)")


def _filter_args(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--destination", metavar="NAME", help=f"only {what} of this destination")
    p.add_argument("--reason", action="append", default=[], metavar="REASON",
                   help=f"only {what} with this reason (a code, e.g. burned_in_annotation, or a glob); repeatable")
    p.add_argument("--older-than", metavar="AGE", help=f"only {what} at least this old (30m, 24h, 7d)")


def _leaf(sub: Any, name: str, help: str | None = None) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(name, help=help)
    _config_arg(p)
    return p


def build_parser() -> argparse.ArgumentParser:
    from deid_router import __version__

    parser = _TopParser(prog="deid-router", description="De-identifying DICOM router.")
    parser.add_argument("--version", action="version", version=f"deid-router {__version__}")
    _config_arg(parser)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("serve", help="run the node in the foreground")
    _config_arg(p)
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])

    p = sub.add_parser("status", help="job counts by state and destination, quarantine size")
    _config_arg(p)
    _json_arg(p)

    p = sub.add_parser("deidentify", help="de-identify files and folders offline")
    _config_arg(p)
    p.add_argument("inputs", nargs="+", metavar="INPUT")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--workers", type=int, default=0, help="processes (default: CPU cores)")
    p.add_argument("--dry-run", action="store_true", help="print what would be done per attribute")
    p.add_argument("--preview", type=Path, metavar="DIR",
                   help="with --dry-run: before/after PNGs of pixel cleaning, regions drawn")
    p.add_argument("--profile", default="", help="a [profiles.NAME] to apply (default: [deid])")

    p = sub.add_parser("check-config", help="validate the configuration")
    _config_arg(p)

    p = sub.add_parser("quarantine", help="list, show, release or purge quarantined instances")
    _config_arg(p)
    qsub = p.add_subparsers(dest="action", required=True, parser_class=_Parser)
    ql = _leaf(qsub, "list", "open entries, oldest first")
    _json_arg(ql)
    _filter_args(ql, "entries")
    ql.add_argument("--all", action="store_true", help="also released and purged entries")
    qs = _leaf(qsub, "show", "everything the database holds about an entry (no tag value)")
    qs.add_argument("id", type=int)
    _json_arg(qs)
    qr = _leaf(qsub, "release", "re-queue entries (after fixing their cause)")
    qr.add_argument("ids", nargs="*", type=int, metavar="ID")
    _filter_args(qr, "entries")
    qr.add_argument("--all", action="store_true", help="every open entry (conflicts and burned-in only with --reason)")
    _yes_arg(qr)
    qp = _leaf(qsub, "purge", "delete entries' raw files and close their jobs (all open entries without ids or filters)")
    qp.add_argument("ids", nargs="*", type=int, metavar="ID")
    _filter_args(qp, "entries")
    _yes_arg(qp)

    p = sub.add_parser("retry", help="re-queue failed jobs: JOB_ID..., or --failed with optional filters")
    _config_arg(p)
    p.add_argument("job_ids", nargs="*", type=int, metavar="JOB_ID")
    p.add_argument("--failed", action="store_true", help="every failed job (conflicts and burned-in only with --reason)")
    _filter_args(p, "jobs")
    _yes_arg(p)

    p = sub.add_parser("jobs", help="list jobs")
    _config_arg(p)
    jsub = p.add_subparsers(dest="action", required=True, parser_class=_Parser)
    jl = _leaf(jsub, "list", "jobs, newest first")
    jl.add_argument("--state", action="append", default=[], help="queued, running, retrying, done, failed, purged; repeatable")
    jl.add_argument("--destination", metavar="NAME")
    jl.add_argument("--limit", type=int, default=50, help="at most this many (default 50; 0: all)")
    _json_arg(jl)

    p = sub.add_parser("resend", help="send delivered instances of a study or series again (a PACS lost them)")
    _config_arg(p)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--study", metavar="UID", help="StudyInstanceUID as received, or as the PACS shows it (de-identified)")
    which.add_argument("--series", metavar="UID", help="SeriesInstanceUID, either form")
    p.add_argument("--destination", required=True, metavar="NAME")
    _yes_arg(p)

    p = sub.add_parser("audit", help="the audit trail: who did what, newest first")
    _config_arg(p)
    asub = p.add_subparsers(dest="action", required=True, parser_class=_Parser)
    al = _leaf(asub, "list", "audit records (time, user, action, detail), newest first")
    al.add_argument("--limit", type=int, default=50, help="at most this many (default 50; 0: all)")
    _json_arg(al)

    p = sub.add_parser("crosswalk", help="re-identification for the data custodian (audited)")
    _config_arg(p)
    csub = p.add_subparsers(dest="action", required=True, parser_class=_Parser)
    cl = _leaf(csub, "lookup")
    cl.add_argument("pseudonym")
    ce = _leaf(csub, "export")
    ce.add_argument("--out", type=Path, help="CSV file to write (default: standard output)")
    for sp in (cl, ce):
        sp.add_argument("--actor", default=None, help="who asks (audited; default: the login name)")
        sp.add_argument("--scope", default="default", help="pseudonym scope of a profile (default: [deid]'s)")

    p = sub.add_parser("user", help="console and API users (add, remove, list)")
    usub = p.add_subparsers(dest="action", required=True, parser_class=_Parser)
    ua = usub.add_parser("add")
    ua.add_argument("name")
    ua.add_argument("--role", required=True, choices=["admin", "viewer"])
    ua.add_argument("--password-file", type=Path, help="file whose first line is the password (default: prompt)")
    ur = usub.add_parser("remove")
    ur.add_argument("name")
    ul = usub.add_parser("list")
    _config_arg(p)
    for sp in (ua, ur, ul):  # also after the action word; SUPPRESS keeps a --config given before it
        sp.add_argument("--config", default=argparse.SUPPRESS, help="path to the TOML configuration")
    return parser


def _load(args: argparse.Namespace) -> Config:
    if not args.config:
        raise ConfigError([("-", "--config", f"no configuration: pass --config PATH or set {ENV_CONFIG}")])
    return load_config(args.config)


def _context(args: argparse.Namespace) -> Any:
    """The node's existing database for a command: never creates a database, secret or folder."""
    from deid_router.operations import open_command_context

    return open_command_context(_load(args))


def _actor() -> str:
    """Who runs this command, for the audit trail: the login name (LOGNAME, USER, ... then the
    password database), so that a shell or a service without USER still names its user."""
    import getpass

    try:
        return getpass.getuser()
    except (OSError, KeyError):  # no such variable and no passwd entry for the uid
        return "unknown"


def _interactive() -> bool:
    return sys.stdin.isatty() and sys.stderr.isatty()


def _confirm(args: argparse.Namespace, question: str, v1_form: bool = False) -> int | None:
    """None to go ahead; otherwise the exit code. ``--yes`` goes ahead; a terminal is asked;
    without a terminal only a v1 form (``retry JOB_ID``, ``retry --failed``, ``quarantine
    release ID``: scripts written for v1) goes ahead, anything else is refused (exit 2)."""
    if getattr(args, "yes", False):
        return None
    if _interactive():
        print(f"{question} [y/N] ", end="", file=sys.stderr, flush=True)
        if sys.stdin.readline().strip().lower() in ("y", "yes"):
            return None
        print("nothing done", file=sys.stderr)
        return EXIT_ERROR
    if v1_form:
        return None
    print(f"deid-router: not run from a terminal: {question[0].lower()}{question[1:]}? Pass --yes to do it.",
          file=sys.stderr)
    return EXIT_USAGE


def _selection(args: argparse.Namespace, ids: Sequence[int]) -> Any:
    from deid_router.jobs.selection import Selection, parse_age

    return Selection(
        ids=tuple(ids), destination=args.destination, reasons=tuple(args.reason),
        older_than=parse_age(args.older_than) if args.older_than else None,
    )


def _usage(message: str) -> int:
    print(f"deid-router: error: {message}", file=sys.stderr)
    return EXIT_USAGE


_SHOWN = 20  # items listed before "... and N more"


def _list_some(lines: Sequence[str]) -> None:
    for line in lines[:_SHOWN]:
        print("  " + line)
    if len(lines) > _SHOWN:
        print(f"  ... and {len(lines) - _SHOWN} more")


def _protected_note(n: int, what: str) -> None:
    if n:
        from deid_router.jobs.selection import PROTECTED_REASONS

        print(f"{n} {what} skipped: same-UID conflicts and burned-in annotations are re-queued only when their "
              f"reason is named (--reason {' | '.join(PROTECTED_REASONS)})", file=sys.stderr)


def cmd_serve(args: argparse.Namespace) -> int:
    from deid_router.app import serve

    _load(args)  # fail fast with exit 2 before anything starts
    return serve(Path(args.config), args.log_level)


def cmd_check_config(args: argparse.Namespace) -> int:
    config = _load(args)
    from deid_router.db.guard import database_label, probe_database
    from deid_router.deid.profile import weakening_rules

    problems = _secret_problems(config, probe_database(config.queue.url), database_label(config.queue.url))
    if problems:
        raise ConfigError(problems)
    warnings = list(config.warnings) + weakening_rules(config.deid)
    for p in config.profiles:
        for w in weakening_rules(p.deid):
            warnings.append(w.replace("deid.rules", f"profiles.{p.name}.rules", 1) + f" (profile {p.name!r})")
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    for route in config.routes:
        p = config.profile(route.profile)
        which = f"profile {p.name!r}" if p.name else "profile [deid]"
        print(f"route {route.name!r}: {which}, scope {p.scope!r} -> {', '.join(route.destinations)}")
    print(f"{config.path}: ok ({len(config.destinations)} destinations, {len(config.routes)} routes)")
    return EXIT_OK


def _secret_problems(config: Config, database: bool | None, label: str) -> list[tuple[str, str, str]]:
    """A secret file that is missing, or not the database's, while the database exists."""
    secret = config.deid.secret_file
    if database is None:
        print(f"warning: could not reach the queue database {label} to check deid.secret_file against it",
              file=sys.stderr)
        return []
    if not database:
        return []
    if not secret.exists():
        return [(str(secret), "deid.secret_file",
                 f"does not exist, but the queue database {label} does: `serve` would refuse to start; "
                 "restore the secret file from backup or fix the path")]
    from deid_router.db.guard import keys_for_reading
    from deid_router.operations import open_command_context

    try:
        ctx = open_command_context(config)
    except DeidRouterError:
        return []  # an older schema: serve migrates it, then checks
    try:
        keys_for_reading(ctx.repo, secret, label)
    except ConfigError as exc:
        return exc.problems
    finally:
        ctx.close()
    return []


def cmd_status(args: argparse.Namespace) -> int:
    from deid_router.db.operations import DestinationStates, Reports

    ctx = _context(args)
    try:
        report = Reports(ctx.engine, ctx.repo).status(DestinationStates(ctx.engine))  # = GET /api/v1/status
    finally:
        ctx.close()
    if getattr(args, "json", False):
        print(json.dumps(report, sort_keys=True))
        return EXIT_OK
    jobs = report["jobs"]
    print("jobs:        " + "  ".join(f"{k}={v}" for k, v in jobs.items()))
    details = report["destination_details"]
    for name, states in sorted(report["destinations"].items()):
        print(f"  {name:<10} " + "  ".join(f"{k}={v}" for k, v in states.items()))
    for name, d in sorted(details.items()):
        notes = []
        if d["oldest_job_at"] is not None:
            age = (datetime.now(timezone.utc) - datetime.fromisoformat(d["oldest_job_at"])).total_seconds()
            notes.append(f"oldest pending job {_age(max(age, 0.0))} old")
        if d["next_retry_at"]:
            notes.append(f"next retry {d['next_retry_at']}")
        if d["last_error"]:
            err = d["last_error"]
            code = f" {err['status']}" if err["status"] else ""
            notes.append(f"last error {err['reason']}{code} at {err['at']}")
        if notes:
            print(f"  {name:<10} " + "; ".join(notes))
    print(f"quarantined: {report['quarantined']}")
    if report["paused"]:
        print(f"paused:      {', '.join(report['paused'])}")
    return EXIT_OK


def _age(seconds: float) -> str:
    s = int(seconds)
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m"
    if s < 172800:
        return f"{s // 3600}h"
    return f"{s // 86400}d"


def cmd_quarantine(args: argparse.Namespace) -> int:
    if args.action == "release":
        return _quarantine_release(args)
    if args.action == "purge":
        return _quarantine_purge(args)
    ctx = _context(args)
    try:
        repo = ctx.repo
        if args.action == "list":
            from deid_router.operations import list_quarantine

            entries = list_quarantine(ctx, _selection(args, ()), include_closed=args.all)
            if getattr(args, "json", False):
                print(json.dumps([_entry_dict(e) for e in entries], sort_keys=True))
                return EXIT_OK
            if not entries:
                print("quarantine is empty")
            for e in entries:
                print(_entry_line(e))
            return EXIT_OK
        # show
        entry = _entry_or_complain(repo, args.id)
        if entry is None:
            return EXIT_ERROR
        if getattr(args, "json", False):
            print(json.dumps(_entry_dict(entry, events=True), sort_keys=True))
            return EXIT_OK
        print(_entry_line(entry))
        d = _entry_dict(entry)
        for key in ("modality", "sop_class_uid", "sop_class", "transfer_syntax", "calling_aet", "called_aet",
                    "size", "received_at", "purged_at", "raw_file"):
            print(f"{key}: {d[key]}")
        print(f"detail: {entry.detail}")
        print("events:")
        for ev in getattr(entry, "events", []) or []:
            print("  " + _event_line(ev))
        return EXIT_OK
    finally:
        ctx.close()


def _entry_dict(e: Any, events: bool = False) -> dict[str, Any]:
    from pydicom.uid import UID

    def iso(v: Any) -> Any:
        return v.isoformat() if v is not None else None

    out: dict[str, Any] = {
        "id": e.id, "job_id": e.job_id, "instance_id": e.instance_id, "destination": e.destination,
        "reason": e.reason, "detail": e.detail, "created_at": iso(e.created_at), "released_at": iso(e.released_at),
        "purged_at": iso(e.purged_at), "modality": e.modality, "sop_class_uid": e.sop_class_uid,
        "sop_class": UID(e.sop_class_uid).name if e.sop_class_uid else "",
        "transfer_syntax": e.transfer_syntax, "calling_aet": e.calling_aet, "called_aet": e.called_aet,
        "size": e.size, "received_at": iso(e.received_at),
        "raw_file": "deleted " + iso(e.raw_deleted_at) if e.raw_deleted_at is not None else "held",
    }
    if events:
        out["events"] = [
            {"at": iso(ev.at), "from_state": ev.from_state, "to_state": ev.to_state, "attempt": ev.attempt,
             "status_code": None if ev.status_code is None else f"0x{ev.status_code:04X}", "reason": ev.reason}
            for ev in e.events
        ]
    return out


def _quarantine_release(args: argparse.Namespace) -> int:
    from deid_router.operations import apply_release, plan_release

    sel = _selection(args, args.ids)
    if sel.bulk and not sel.filtered and not args.all:
        return _usage("quarantine release: name entry ids, filters (--destination, --reason, --older-than) or --all")
    ctx = _context(args)
    try:
        plan = plan_release(ctx, sel)
        for qid in plan.missing_ids:
            print(f"no quarantine entry {qid} (see: deid-router quarantine list)", file=sys.stderr)
        for e in plan.closed:
            state = "purged, its raw file is gone (nothing to release)" if e.purged_at else "already released"
            print(f"entry {e.id}: {state}")
        _protected_note(len(plan.protected), "entries")
        if plan.take:
            print(f"will release {len(plan.take)} entries (their jobs are re-queued):")
            _list_some([_entry_line(e) for e in plan.take])
            refused = _confirm(args, f"Release {len(plan.take)} quarantine entries", v1_form=len(args.ids) == 1)
            if refused is not None:
                return refused
            out = apply_release(ctx, plan, _actor())
            for qid in out.released:
                print(f"entry {qid}: released, job re-queued")
            for qid in out.gone:
                print(f"entry {qid}: purged, its raw file is gone (nothing to release)")
        elif sel.bulk:
            print("0 entries released")
        return EXIT_ERROR if plan.missing_ids else EXIT_OK
    finally:
        ctx.close()


def _quarantine_purge(args: argparse.Namespace) -> int:
    from deid_router.operations import apply_purge, plan_purge

    sel = _selection(args, args.ids)
    ctx = _context(args)
    try:
        plan = plan_purge(ctx, sel)
        for qid in plan.missing_ids:
            print(f"no quarantine entry {qid} (see: deid-router quarantine list)", file=sys.stderr)
        for e in plan.closed:
            print(f"entry {e.id}: already {'purged' if e.purged_at else 'released'}")
        if plan.take:
            print(f"will purge {len(plan.take)} entries (raw files deleted, jobs closed; this cannot be undone):")
            _list_some([_entry_line(e) for e in plan.take])
            refused = _confirm(args, f"Purge {len(plan.take)} quarantine entries")
            if refused is not None:
                return refused
        out = apply_purge(ctx, plan, _actor())
        print(f"{out.entries} entries purged, {out.jobs_closed} jobs closed; {out.raw_deleted} raw files deleted")
        return EXIT_ERROR if plan.missing_ids else EXIT_OK
    finally:
        ctx.close()


def _entry_or_complain(repo: Any, qid: int) -> Any:
    entry = repo.quarantine_get(qid)
    if entry is None:
        print(f"no quarantine entry {qid} (see: deid-router quarantine list)", file=sys.stderr)
    return entry


def _entry_line(e: Any) -> str:
    fields = []
    for name in ("id", "job_id", "instance_id", "destination", "reason", "created_at", "released_at"):
        if hasattr(e, name):
            fields.append(f"{name}={getattr(e, name)}")
    return "  ".join(fields)


def _event_line(ev: Any) -> str:
    fields = []
    for name in ("at", "from_state", "to_state", "attempt", "status_code", "reason"):
        if hasattr(ev, name):
            val = getattr(ev, name)
            if name == "status_code" and isinstance(val, int):
                val = f"0x{val:04X}"
            fields.append(f"{name}={val}")
    return "  ".join(fields)


def _job_line(j: Any) -> str:
    status = "-" if j.last_status is None else f"0x{j.last_status:04X}"
    line = (f"id={j.id}  destination={j.destination}  state={j.state}  attempts={j.attempts}  status={status}  "
            f"updated_at={j.updated_at.isoformat()}")
    if j.state == "retrying":
        line += f"  next_try={j.run_after.isoformat()}"
    if not j.raw_held:
        line += "  raw=deleted"
    return line + f"  reason={j.last_reason or '-'}"


def cmd_retry(args: argparse.Namespace) -> int:
    from deid_router.operations import apply_retry, plan_retry

    sel = _selection(args, args.job_ids)
    if sel.ids and (args.failed or sel.filtered):
        return _usage("retry: give job ids or --failed with filters, not both")
    if sel.bulk and not args.failed and not sel.filtered:
        return _usage("retry: give JOB_ID..., or --failed (optionally with --destination, --reason, --older-than)")
    ctx = _context(args)
    try:
        plan = plan_retry(ctx, sel)
        for job_id in plan.missing_ids:
            print(f"no job {job_id} (see: deid-router jobs list)", file=sys.stderr)
        for j in plan.not_retryable:
            waiting = j.state in ("failed", "retrying")
            why = "its raw file is gone (purged): nothing to re-queue" if waiting else "not failed (nothing to do)"
            print(f"job {j.id}: {j.state}, {why}")
        _protected_note(len(plan.protected), "jobs")
        v1 = (len(sel.ids) == 1) or (args.failed and not sel.filtered)
        if plan.take:
            print(f"will re-queue {len(plan.take)} jobs:")
            _list_some([_job_line(j) for j in plan.take])
            refused = _confirm(args, f"Re-queue {len(plan.take)} jobs", v1_form=v1)
            if refused is not None:
                return refused
            if v1 and not getattr(args, "yes", False) and not _interactive() and sel.bulk:
                print("not a terminal: re-queued without asking (the v1 form `retry --failed`; "
                      "filters need --yes)", file=sys.stderr)
        out = apply_retry(ctx, plan, _actor())
        if sel.bulk:
            print(f"{len(out.requeued)} failed jobs re-queued")
        else:
            for job_id in out.requeued:
                print(f"job {job_id}: re-queued")
        return EXIT_ERROR if plan.missing_ids else EXIT_OK
    finally:
        ctx.close()


def cmd_jobs(args: argparse.Namespace) -> int:
    from deid_router.jobs.states import JobState

    known = {s.value for s in JobState}
    for state in args.state:
        if state not in known:
            return _usage(f"jobs list: unknown state {state!r} (one of {', '.join(sorted(known))})")
    if args.limit < 0:
        return _usage("jobs list: --limit must be >= 0")
    ctx = _context(args)
    try:
        jobs = ctx.repo.list_jobs(states=args.state, destination=args.destination, limit=args.limit or None)
    finally:
        ctx.close()
    if getattr(args, "json", False):
        print(json.dumps([
            {"id": j.id, "instance_id": j.instance_id, "destination": j.destination, "state": j.state,
             "attempts": j.attempts, "last_status": None if j.last_status is None else f"0x{j.last_status:04X}",
             "last_reason": j.last_reason, "created_at": j.created_at.isoformat(),
             "updated_at": j.updated_at.isoformat(), "run_after": j.run_after.isoformat(), "raw_held": j.raw_held}
            for j in jobs
        ], sort_keys=True))
        return EXIT_OK
    if not jobs:
        print("no jobs")
    for j in jobs:
        print(_job_line(j))
    return EXIT_OK


def cmd_resend(args: argparse.Namespace) -> int:
    from deid_router.operations import apply_resend, plan_resend

    ctx = _context(args)
    try:
        plan = plan_resend(ctx, ctx.keys(), args.destination, study=args.study, series=args.series)
        what = "study" if args.study else "series"
        if plan.unreadable:
            print(f"warning: {plan.unreadable} held raw files could not be read", file=sys.stderr)
        if not plan.instance_ids and plan.already_queued:
            print(f"{plan.already_queued} instances of that {what} are already queued for {args.destination}: "
                  "nothing to resend")
            return EXIT_OK
        if not plan.instance_ids:
            print(f"no held instance of that {what} was delivered to {args.destination}: nothing to resend",
                  file=sys.stderr)
            if plan.raw_deleted_elsewhere:
                print(f"{plan.raw_deleted_elsewhere} instances delivered to {args.destination} no longer have their "
                      f"raw file (deleted after delivery: storage.keep_raw_hours = "
                      f"{ctx.config.storage.keep_raw_hours:g}); send them again from the modality or the archive",
                      file=sys.stderr)
            return EXIT_ERROR
        print(f"will send {len(plan.instance_ids)} instances of the {what} to {args.destination} again")
        refused = _confirm(args, f"Resend {len(plan.instance_ids)} instances to {args.destination}")
        if refused is not None:
            return refused
        job_ids = apply_resend(ctx, plan, _actor())
        print(f"{len(job_ids)} instances queued for {args.destination}"
              + (f" ({plan.already_queued} already queued)" if plan.already_queued else ""))
        return EXIT_OK
    finally:
        ctx.close()


def cmd_audit(args: argparse.Namespace) -> int:
    from deid_router.db.operations import Reports
    from deid_router.http.serialize import plain, when

    if args.limit < 0:
        return _usage("audit list: --limit must be >= 0")
    ctx = _context(args)
    try:
        records = Reports(ctx.engine, ctx.repo).audit(args.limit or None)  # = GET /api/v1/audit
    finally:
        ctx.close()
    if getattr(args, "json", False):
        print(json.dumps(plain(records), sort_keys=True))
        return EXIT_OK
    if not records:
        print("no audit records")
    for r in records:
        print(f"{when(r.at)}  {r.user:<12} {r.action:<20} {r.detail}")
    return EXIT_OK


def _private_text_file(path: Path) -> Any:
    """Open ``path`` for writing identified text, mode 0600 (also when it existed before)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    return open(fd, "w", encoding="utf-8", newline="")


def cmd_crosswalk(args: argparse.Namespace) -> int:
    from deid_router.db.crosswalk import export_crosswalk, lookup_pseudonym

    config = _load(args)
    args.actor = args.actor or _actor()
    if args.scope not in config.scopes():
        raise ConfigError([(str(config.path), "--scope", f"unknown scope {args.scope!r} (configured: {', '.join(config.scopes())})")])
    ctx = _context(args)
    try:
        keys = ctx.keys()
        if args.action == "lookup":
            rows = lookup_pseudonym(ctx.repo, keys, args.pseudonym, actor=args.actor, scope=args.scope)
            ctx.auditor.crosswalk_lookup(args.actor, found=bool(rows))
            if not rows:
                print("no such pseudonym", file=sys.stderr)
                return EXIT_ERROR
            for kind, original in rows:
                print(f"{kind}\t{original}")
            return EXIT_OK
        out = _private_text_file(args.out) if args.out else sys.stdout
        try:
            n = export_crosswalk(ctx.repo, keys, out, actor=args.actor, scope=args.scope)
        finally:
            if args.out:
                out.close()
        print(f"{n} rows exported", file=sys.stderr)
        return EXIT_OK
    finally:
        ctx.close()


def cmd_deidentify(args: argparse.Namespace) -> int:
    from deid_router.offline import run_offline

    config = _load(args)
    if args.preview is not None and not args.dry_run:
        print("deid-router: --preview needs --dry-run", file=sys.stderr)
        return EXIT_USAGE
    if args.profile and args.profile not in {p.name for p in config.profiles}:
        known = ", ".join(p.name for p in config.profiles) or "none"
        raise ConfigError([(str(config.path), "--profile", f"unknown profile {args.profile!r} (defined: {known})")])
    if args.dry_run:
        print("warning: --dry-run prints the original (identified) values beside the new ones; "
              "keep its output as private as the inputs", file=sys.stderr)
    return run_offline(config, [Path(i) for i in args.inputs], args.out, args.workers, args.dry_run,
                       preview=args.preview, profile=args.profile)


def _read_password(args: argparse.Namespace) -> str | None:
    if args.password_file is not None:
        try:
            return args.password_file.read_text(encoding="utf-8").splitlines()[0] if args.password_file.stat().st_size else ""
        except (OSError, UnicodeDecodeError) as exc:
            print(f"deid-router: cannot read the password file {args.password_file} ({exc})", file=sys.stderr)
            return None
    if not sys.stdin.isatty():
        print("deid-router: give --password-file F (no terminal to prompt on)", file=sys.stderr)
        return None
    import getpass

    try:
        first = getpass.getpass(f"password for {args.name}: ")
        again = getpass.getpass("again: ")
    except (EOFError, KeyboardInterrupt):  # Ctrl-D or Ctrl-C at the prompt: nothing is added
        print("\ndeid-router: no password given; no user added", file=sys.stderr)
        return None
    if again != first:
        print("deid-router: the passwords differ", file=sys.stderr)
        return None
    return first


def cmd_user(args: argparse.Namespace) -> int:
    from deid_router.app import build_context
    from deid_router.db.operations import UserExists, UserStore

    config = _load(args)
    if args.action == "add":
        from deid_router.http.passwords import hash_password

        password = _read_password(args)
        if password is None:
            return EXIT_USAGE
        try:
            hashed = hash_password(password)
        except ValueError as exc:
            print(f"deid-router: {exc}", file=sys.stderr)
            return EXIT_USAGE
        ctx = build_context(config, run_migrations=True)  # works before the first serve
        try:
            UserStore(ctx.engine).add(args.name, args.role, hashed)
            ctx.repo.audit("user_add", _actor(), f"user={args.name} role={args.role}")
        except UserExists:
            print(f"deid-router: user {args.name!r} exists (deid-router user remove {args.name} first)", file=sys.stderr)
            return EXIT_ERROR
        finally:
            ctx.close()
        print(f"user {args.name} added ({args.role})")
        return EXIT_OK
    ctx = _context(args)  # list and remove: the node's existing database only (they create nothing)
    try:
        store = UserStore(ctx.engine)
        if args.action == "remove":
            if not store.remove(args.name):
                print(f"deid-router: no user {args.name!r} (see: deid-router user list)", file=sys.stderr)
                return EXIT_ERROR
            ctx.repo.audit("user_remove", _actor(), f"user={args.name}")
            print(f"user {args.name} removed")
            return EXIT_OK
        users = store.list()
        if not users:
            print("no users (add one: deid-router user add NAME --role admin --password-file F)")
        for u in users:
            print(f"{u.name}\t{u.role}\t{u.created_at:%Y-%m-%d %H:%M:%S}")
        return EXIT_OK
    finally:
        ctx.close()


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "serve": cmd_serve,
    "status": cmd_status,
    "deidentify": cmd_deidentify,
    "check-config": cmd_check_config,
    "quarantine": cmd_quarantine,
    "retry": cmd_retry,
    "crosswalk": cmd_crosswalk,
    "jobs": cmd_jobs,
    "resend": cmd_resend,
    "audit": cmd_audit,
    "user": cmd_user,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except ConfigError as exc:
        for file, key, reason in exc.problems:
            print(f"{file}: {key}: {reason}", file=sys.stderr)
        return EXIT_USAGE
    except (MissingDatabaseError, SecretMismatchError) as exc:
        print(f"deid-router: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except QueueError as exc:
        print(f"deid-router: queue database unavailable ({exc}); check queue.url and that the database is up", file=sys.stderr)
        return EXIT_ERROR
    except DeidRouterError as exc:
        print(f"deid-router: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return EXIT_ERROR
    except BrokenPipeError:
        return EXIT_OK
