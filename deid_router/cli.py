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
from pathlib import Path
from typing import Any

from deid_router.config import ENV_CONFIG, Config, load_config
from deid_router.errors import ConfigError, DeidRouterError, QueueError

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # usage errors exit 2, as the contract says
        self.print_usage(sys.stderr)
        print(f"deid-router: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def _config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        default=os.environ.get(ENV_CONFIG),
        help=f"path to the TOML configuration (default: ${ENV_CONFIG})",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="deid-router", description="De-identifying DICOM router.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("serve", help="run the node in the foreground")
    _config_arg(p)
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])

    p = sub.add_parser("status", help="job counts by state and destination, quarantine size")
    _config_arg(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")

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
    qsub.add_parser("list")
    qs = qsub.add_parser("show")
    qs.add_argument("id", type=int)
    qr = qsub.add_parser("release")
    qr.add_argument("id", type=int)
    qsub.add_parser("purge")

    p = sub.add_parser("retry", help="re-queue a failed job, or all failed jobs")
    _config_arg(p)
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("job_id", nargs="?", type=int)
    group.add_argument("--failed", action="store_true")

    p = sub.add_parser("crosswalk", help="re-identification for the data custodian (audited)")
    _config_arg(p)
    csub = p.add_subparsers(dest="action", required=True, parser_class=_Parser)
    cl = csub.add_parser("lookup")
    cl.add_argument("pseudonym")
    ce = csub.add_parser("export")
    ce.add_argument("--out", type=Path, help="CSV file to write (default: standard output)")
    for sp in (cl, ce):
        sp.add_argument("--actor", default=os.environ.get("USER", "unknown"), help="who asks (audited)")
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
    from deid_router.app import build_context

    return build_context(_load(args), run_migrations=True)


def cmd_serve(args: argparse.Namespace) -> int:
    from deid_router.app import serve

    _load(args)  # fail fast with exit 2 before anything starts
    return serve(Path(args.config), args.log_level)


def cmd_check_config(args: argparse.Namespace) -> int:
    config = _load(args)
    from deid_router.deid.profile import weakening_rules

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


def cmd_status(args: argparse.Namespace) -> int:
    from deid_router.db.operations import DestinationStates, Reports

    ctx = _context(args)
    try:
        counts = Reports(ctx.engine, ctx.repo).status(DestinationStates(ctx.engine))  # = GET /api/v1/status
    finally:
        ctx.close()
    if args.json:
        print(json.dumps(counts, sort_keys=True))
        return EXIT_OK
    jobs = counts["jobs"]
    print("jobs:        " + "  ".join(f"{k}={v}" for k, v in jobs.items()))
    for name, states in sorted(counts["destinations"].items()):
        print(f"  {name:<10} " + "  ".join(f"{k}={v}" for k, v in states.items()))
    print(f"quarantined: {counts['quarantined']}")
    if counts["paused"]:
        print(f"paused:      {', '.join(counts['paused'])}")
    return EXIT_OK


def cmd_quarantine(args: argparse.Namespace) -> int:
    ctx = _context(args)
    try:
        repo = ctx.repo
        if args.action == "list":
            entries = repo.quarantine_list()
            if not entries:
                print("quarantine is empty")
            for e in entries:
                print(_entry_line(e))
            return EXIT_OK
        if args.action == "show":
            entry = _entry_or_complain(repo, args.id)
            if entry is None:
                return EXIT_ERROR
            print(_entry_line(entry))
            for ev in getattr(entry, "events", []) or []:
                print("  " + _event_line(ev))
            return EXIT_OK
        if args.action == "release":
            entry = _entry_or_complain(repo, args.id)
            if entry is None:
                return EXIT_ERROR
            # quarantine_release is True for an entry released earlier too (idempotent): the
            # message must say which, or a second release claims to have re-queued a job.
            changed = repo.quarantine_release(args.id)
            repo.audit("quarantine_release", os.environ.get("USER", "unknown"), f"entry={args.id}")
            if entry.purged_at is not None:
                outcome = "purged, its raw file is gone (nothing to release)"
            elif entry.released_at is not None or not changed:
                outcome = "already released"
            else:
                outcome = "released, job re-queued"
            print(f"entry {args.id}: {outcome}")
            return EXIT_OK
        # purge
        paths = repo.quarantine_purge()
        for rel in paths:
            ctx.holding.delete(rel)
        repo.audit("quarantine_purge", os.environ.get("USER", "unknown"), f"files={len(paths)}")
        print(f"purged; {len(paths)} raw files deleted")
        return EXIT_OK
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


def cmd_retry(args: argparse.Namespace) -> int:
    ctx = _context(args)
    try:
        repo = ctx.repo
        actor = os.environ.get("USER", "unknown")
        if args.failed:
            n = repo.retry_failed()
            repo.audit("retry_failed", actor, f"jobs={n}")
            print(f"{n} failed jobs re-queued")
            return EXIT_OK
        before = repo.job_state(args.job_id)
        if before is None:
            print(f"no job {args.job_id} (see: deid-router status, deid-router quarantine list)", file=sys.stderr)
            return EXIT_ERROR
        # retry_job is True for jobs already queued, running or done: only a failed or
        # retrying job is actually re-queued, and the operator must be told which happened.
        changed = repo.retry_job(args.job_id) and before[0] in ("failed", "retrying")
        repo.audit("retry_job", actor, f"job={args.job_id}")
        print(f"job {args.job_id}: " + ("re-queued" if changed else f"{before[0]}, not failed (nothing to do)"))
        return EXIT_OK
    finally:
        ctx.close()


def cmd_crosswalk(args: argparse.Namespace) -> int:
    from deid_router.db.crosswalk import export_crosswalk, lookup_pseudonym

    config = _load(args)
    if args.scope not in config.scopes():
        raise ConfigError([(str(config.path), "--scope", f"unknown scope {args.scope!r} (configured: {', '.join(config.scopes())})")])
    ctx = _context(args)
    try:
        if args.action == "lookup":
            rows = lookup_pseudonym(ctx.repo, ctx.keys, args.pseudonym, actor=args.actor, scope=args.scope)
            ctx.auditor.crosswalk_lookup(args.actor, found=bool(rows))
            if not rows:
                print("no such pseudonym", file=sys.stderr)
                return EXIT_ERROR
            for kind, original in rows:
                print(f"{kind}\t{original}")
            return EXIT_OK
        out = open(args.out, "w", encoding="utf-8", newline="") if args.out else sys.stdout
        try:
            n = export_crosswalk(ctx.repo, ctx.keys, out, actor=args.actor, scope=args.scope)
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

    first = getpass.getpass(f"password for {args.name}: ")
    if getpass.getpass("again: ") != first:
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
            ctx.repo.audit("user_add", os.environ.get("USER", "unknown"), f"user={args.name} role={args.role}")
        except UserExists:
            print(f"deid-router: user {args.name!r} exists (deid-router user remove {args.name} first)", file=sys.stderr)
            return EXIT_ERROR
        finally:
            ctx.close()
        print(f"user {args.name} added ({args.role})")
        return EXIT_OK
    ctx = build_context(config, run_migrations=True)
    try:
        store = UserStore(ctx.engine)
        if args.action == "remove":
            if not store.remove(args.name):
                print(f"deid-router: no user {args.name!r} (see: deid-router user list)", file=sys.stderr)
                return EXIT_ERROR
            ctx.repo.audit("user_remove", os.environ.get("USER", "unknown"), f"user={args.name}")
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
