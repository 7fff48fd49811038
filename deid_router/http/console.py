"""The console: server-rendered pages (Jinja2, autoescaped), a login form and a signed session.

Every form carries the session's CSRF token; a POST without the right one gets 403. A page
asked for without a session answers 401 with the login form (the browser shows it, the
form comes back to the page asked for).
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route
from starlette.templating import Jinja2Templates

from deid_router.db.engine import utc_now
from deid_router.errors import QueueError
from deid_router.http.actions import NotFound
from deid_router.http.auth import Principal, RateLimited
from deid_router.http.serialize import age, status_hex, when
from deid_router.http.services import Services
from deid_router.jobs.states import ALL_STATES

TEMPLATES = Jinja2Templates(directory=str(Path(__file__).resolve().parent / "templates"))
TEMPLATES.env.filters["hex"] = status_hex
TEMPLATES.env.filters["when"] = when
TEMPLATES.env.filters["age"] = age
STATES = tuple(s.value for s in ALL_STATES)
JOBS_PER_PAGE = 200
JOB_PERIODS = {"1h": timedelta(hours=1), "24h": timedelta(hours=24), "7d": timedelta(days=7)}

Page = Callable[[Request, Services, Principal], Any]


def _csrf(request: Request) -> str:
    token = request.session.get("csrf")
    if not isinstance(token, str):
        token = secrets.token_urlsafe(32)
        request.session["csrf"] = token
    return token


def _render(request: Request, name: str, status: int = 200, **context: Any) -> Response:
    context.setdefault("user", None)
    return TEMPLATES.TemplateResponse(request, name, {"csrf": _csrf(request), **context}, status_code=status)


def _safe_next(value: str | None) -> str:
    return value if value and value.startswith("/") and not value.startswith("//") else "/"


def _client(request: Request) -> str:
    return request.client.host if request.client else "-"


MAX_UPLOAD_BYTES = 256 * 1024 * 1024


async def _form(request: Request) -> dict[str, str]:
    """The form's text fields; uploaded files (the dry-run's) go to ``request.state.files``."""
    form = await request.form()
    files: dict[str, bytes] = {}
    for k, v in form.multi_items():
        if isinstance(v, UploadFile):
            files[k] = await v.read(MAX_UPLOAD_BYTES)
            await v.close()
    request.state.files = files
    return {k: v for k, v in form.items() if isinstance(v, str)}


def _csrf_ok(request: Request, form: dict[str, str]) -> bool:
    expected = request.session.get("csrf")
    return isinstance(expected, str) and hmac.compare_digest(expected, form.get("csrf", ""))


def page(
    svc: Services, handler: Page, write: bool = False, admin_only: bool = False
) -> Callable[[Request], Awaitable[Response]]:
    """Session check, CSRF and role check for writes, the handler off the event loop."""

    async def run(request: Request) -> Response:
        name = request.session.get("user")
        try:
            who = await run_in_threadpool(svc.auth.current, name) if isinstance(name, str) else None
        except QueueError:
            return _render(request, "error.html", 503, message="The queue database is unavailable.")
        if who is None:
            request.session.pop("user", None)
            return _render(request, "login.html", 401, next=request.url.path, message="Please log in.")
        if admin_only and not who.is_admin:
            return _render(request, "error.html", 403, user=who, message="Only an admin may see this page.")
        form: dict[str, str] = {}
        if request.method == "POST":
            form = await _form(request)
            if not _csrf_ok(request, form):
                return _render(request, "error.html", 403, user=who, message="The form expired; reload and try again.")
            if write and not who.is_admin:
                return _render(request, "error.html", 403, user=who, message="Only an admin may do this.")
        request.state.form = form
        try:
            result = await run_in_threadpool(handler, request, svc, who)
        except NotFound as exc:
            return _render(request, "error.html", 404, user=who, message=str(exc))
        except QueueError:
            return _render(request, "error.html", 503, user=who, message="The queue database is unavailable.")
        if isinstance(result, Response):
            return result
        template, context = result
        return _render(request, template, user=who, **context)

    return run


# ------------------------------------------------------------------------------ login


async def login_form(request: Request) -> Response:
    return _render(request, "login.html", next=_safe_next(request.query_params.get("next")), message="")


def login_post(svc: Services) -> Callable[[Request], Awaitable[Response]]:
    async def run(request: Request) -> Response:
        form = await _form(request)
        nxt = _safe_next(form.get("next"))
        if not _csrf_ok(request, form):
            return _render(request, "login.html", 403, next=nxt, message="The form expired; please log in again.")
        client = _client(request)
        try:
            who = await run_in_threadpool(svc.auth.login, form.get("username", ""), form.get("password", ""), client)
        except RateLimited:
            return _render(request, "login.html", 429, next=nxt, message="Too many failed logins; wait a minute.")
        except QueueError:
            return _render(request, "error.html", 503, message="The queue database is unavailable.")
        if who is None:
            name = form.get("username", "")
            known = name if await run_in_threadpool(svc.users.get, name) is not None else None
            await run_in_threadpool(svc.actions.login_failed, known, client)
            return _render(request, "login.html", 401, next=nxt, message="Wrong user name or password.")
        await run_in_threadpool(svc.actions.login, who, client)
        request.session.clear()
        request.session["user"] = who.name
        request.session["csrf"] = secrets.token_urlsafe(32)
        return RedirectResponse(nxt, status_code=303)

    return run


def logout(request: Request, svc: Services, who: Principal) -> Any:
    svc.actions.logout(who, _client(request))
    request.session.clear()
    return RedirectResponse("/login", status_code=303)


# ------------------------------------------------------------------------------ pages


def dashboard(request: Request, svc: Services, who: Principal) -> Any:
    counts = svc.repo.status_counts(svc.destinations)
    metrics = svc.reports.metrics()
    states = svc.states.all()
    summaries = svc.reports.destination_summaries()
    now = utc_now()
    rows = []
    for name in svc.destinations:
        first = metrics.oldest_pending.get(name)
        st = states.get(name)
        s = summaries.get(name)
        rows.append({
            "name": name,
            "counts": counts["destinations"].get(name, {}),
            "paused": bool(st and st.paused),
            "pause_reason": st.reason if st and st.paused else "",
            "last_error": s.last_error if s else "",
            "last_status": s.last_status if s else None,
            "next_retry": s.next_retry if s else None,
            "oldest_age": (now - first).total_seconds() if first else None,
        })
    try:
        free = svc.holding.free_bytes()
    except OSError:
        free = None
    return "dashboard.html", {
        "rows": rows, "states": STATES, "totals": counts["jobs"], "quarantined": counts["quarantined"],
        "received": metrics.received_total, "free_mb": None if free is None else free // (1024 * 1024),
        "reserve_mb": svc.config.storage.min_free_mb, "plot": _plot(svc.reports.throughput(60)),
        "problems": svc.readiness.problems(),
    }


def _plot(series: dict[str, list[int]]) -> dict[str, Any]:
    """Polylines for an inline SVG, 600 x 120, one point per minute of the last hour."""
    width, height = 600, 120
    peak = max([1, *(max(v) for v in series.values() if v)])
    lines = {}
    for name, values in series.items():
        n = max(len(values) - 1, 1)
        lines[name] = " ".join(
            f"{i * width / n:.1f},{height - v * (height - 10) / peak:.1f}" for i, v in enumerate(values)
        )
    return {"lines": lines, "peak": peak, "width": width, "height": height,
            "totals": {k: sum(v) for k, v in series.items()}}


def jobs(request: Request, svc: Services, who: Principal) -> Any:
    q = request.query_params
    state = q.get("state") or None
    dest = q.get("destination") or None
    if state is not None and state not in STATES:
        state = None
    before = q.get("before", "")
    period = q.get("since", "")
    since = utc_now() - JOB_PERIODS[period] if period in JOB_PERIODS else None
    rows = svc.reports.jobs(state, dest, JOBS_PER_PAGE, int(before) if before.isdigit() else None, since)
    older = rows[-1].id if len(rows) == JOBS_PER_PAGE else None
    return "jobs.html", {"rows": rows, "states": STATES, "destinations": svc.destinations, "periods": JOB_PERIODS,
                         "state": state or "", "destination": dest or "", "older": older,
                         "since": period if since else ""}


def job(request: Request, svc: Services, who: Principal) -> Any:
    job_id = int(request.path_params["job_id"])
    state = svc.repo.job_state(job_id)
    if state is None:
        raise NotFound(f"no job {job_id}")
    return "job.html", {"job_id": job_id, "state": state[0], "attempts": state[1],
                        "events": svc.reports.job_events(job_id)}


def job_retry(request: Request, svc: Services, who: Principal) -> Any:
    job_id = int(request.path_params["job_id"])
    svc.actions.retry(who, job_id)
    return RedirectResponse(f"/jobs/{job_id}", status_code=303)


def quarantine(request: Request, svc: Services, who: Principal) -> Any:
    closed = request.query_params.get("all") == "1"
    return "quarantine.html", {"rows": svc.reports.quarantine(include_closed=closed), "all": closed}


def _entry(svc: Services, request: Request) -> Any:
    qid = int(request.path_params["qid"])
    rows = svc.reports.quarantine(qid=qid)
    if not rows:
        raise NotFound(f"no quarantine entry {qid}")
    return rows[0]


def quarantine_entry(request: Request, svc: Services, who: Principal) -> Any:
    return "quarantine_entry.html", {"e": _entry(svc, request), "confirm": ""}


def _confirm(action: str) -> Page:
    def handler(request: Request, svc: Services, who: Principal) -> Any:
        return "quarantine_entry.html", {"e": _entry(svc, request), "confirm": action}

    return handler


def _do(action: str) -> Page:
    def handler(request: Request, svc: Services, who: Principal) -> Any:
        e = _entry(svc, request)
        if action == "release":
            svc.actions.release(who, e.id)
        else:
            svc.actions.purge(who, e.id)
        return RedirectResponse(f"/quarantine/{e.id}", status_code=303)

    return handler


_BULK_ACTIONS = ("release", "purge")
_BULK_MAX = 500


def _bulk_ids(values: list[str]) -> list[int]:
    return sorted({int(v) for v in values if v.isdigit()})[:_BULK_MAX]


def quarantine_bulk_confirm(request: Request, svc: Services, who: Principal) -> Any:
    """What a bulk release or purge would do, with the button that does it."""
    action = request.query_params.get("action", "")
    if action not in _BULK_ACTIONS:
        raise NotFound("no such bulk action")
    entries = [e for i in _bulk_ids(request.query_params.getlist("id")) for e in svc.reports.quarantine(qid=i)
               if e.released_at is None and e.purged_at is None]
    return "quarantine_bulk.html", {"entries": entries, "action": action,
                                    "ids": ",".join(str(e.id) for e in entries)}


def quarantine_bulk(request: Request, svc: Services, who: Principal) -> Any:
    action = request.state.form.get("action", "")
    if action not in _BULK_ACTIONS:
        raise NotFound("no such bulk action")
    for qid in _bulk_ids(request.state.form.get("ids", "").split(",")):
        (svc.actions.release if action == "release" else svc.actions.purge)(who, qid)
    return RedirectResponse("/quarantine", status_code=303)


def destinations(request: Request, svc: Services, who: Principal, echo: Any = None, resent: Any = None) -> Any:
    states = svc.states.all()
    counts = svc.repo.status_counts(svc.destinations)["destinations"]
    rows = [
        {"name": d.name, "type": d.type, "paused": bool(states.get(d.name) and states[d.name].paused),
         "state": states.get(d.name), "counts": counts.get(d.name, {})}
        for d in svc.config.destinations
    ]
    return "destinations.html", {"rows": rows, "echo": echo, "resent": resent}


def destination_echo(request: Request, svc: Services, who: Principal) -> Any:
    name = str(request.path_params["name"])
    result = svc.actions.echo(who, name, svc.config)
    return destinations(request, svc, who, echo={"name": name, **result.__dict__})


def destination_resend(request: Request, svc: Services, who: Principal) -> Any:
    """The resend form: a study or series (either UID form) delivered to a destination, again."""
    form = request.state.form
    uid = form.get("uid", "")
    level = form.get("level", "study")
    try:
        result = svc.actions.resend(who, form.get("destination", ""), study=uid if level == "study" else None,
                                    series=uid if level == "series" else None)
    except ValueError as exc:
        result = {"error": str(exc)}
    return destinations(request, svc, who, resent=result)


def _pause(paused: bool) -> Page:
    def handler(request: Request, svc: Services, who: Principal) -> Any:
        svc.actions.set_paused(who, str(request.path_params["name"]), paused, request.state.form.get("reason", ""))
        return RedirectResponse("/destinations", status_code=303)

    return handler


def audit(request: Request, svc: Services, who: Principal) -> Any:
    return "audit.html", {"events": svc.reports.audit()}


def configuration(request: Request, svc: Services, who: Principal) -> Any:
    return "config.html", {"sections": effective_config(svc)}


def effective_config(svc: Services) -> list[tuple[str, list[tuple[str, str]]]]:
    """The loaded configuration, key by key; the secret file's content and the queue URL's
    password are never shown (only where they are)."""
    from dataclasses import fields

    from sqlalchemy.engine import make_url

    c = svc.config
    out: list[tuple[str, list[tuple[str, str]]]] = []
    for title, obj in (("listener", c.listener), ("storage", c.storage), ("queue", c.queue),
                       ("deid", c.deid), ("http", c.http)):
        items = []
        for f in fields(obj):
            v = getattr(obj, f.name)
            if title == "queue" and f.name == "url":
                v = make_url(v).render_as_string(hide_password=True)
            items.append((f.name, str(v)))
        out.append((title, items))
    for d in c.destinations:
        out.append((f"destination {d.name}", [(f.name, str(getattr(d, f.name))) for f in fields(d)]))
    for r in c.routes:
        out.append((f"route {r.name}", [("destinations", ", ".join(r.destinations)),
                                        *((f"match.{k}", v) for k, v in r.match.items())]))
    return out


def dry_run_form(request: Request, svc: Services, who: Principal) -> Any:
    return "dryrun.html", {"rows": None, "calling_aet": "MODALITY", "error": "", "destinations": None}


def dry_run_post(request: Request, svc: Services, who: Principal) -> Any:
    """Which destinations an uploaded file goes to and what the real engine does to each
    attribute. Admin only: the table shows the original values."""
    from io import BytesIO

    from pydicom import dcmread
    from pydicom.errors import InvalidDicomError

    from deid_router.deid.plan import dry_run
    from deid_router.errors import DeidError
    from deid_router.routing import Router, RoutingFacts

    calling = request.state.form.get("calling_aet", "MODALITY")[:16]
    data = request.state.files.get("file", b"")
    context: dict[str, Any] = {"rows": None, "calling_aet": calling, "error": "", "destinations": None}
    try:
        ds = dcmread(BytesIO(data), stop_before_pixels=True)
    except (InvalidDicomError, EOFError, ValueError, TypeError, OSError):
        context["error"] = "not a DICOM Part-10 file"
        return "dryrun.html", context
    facts = RoutingFacts(calling_aet=calling, called_aet=svc.config.listener.ae_title,
                         modality=str(ds.get("Modality", "")), sop_class_uid=str(ds.get("SOPClassUID", "")))
    context["destinations"] = Router(svc.config.routes).destinations_for(facts)
    try:
        context["rows"] = dry_run(svc.deidentifier(), ds)
    except DeidError as exc:
        context["error"] = f"would be quarantined: {exc.reason}" + (f" at {exc.path}" if exc.path else "")
    svc.repo.audit("dry_run", who.name, f"attributes={len(context['rows'] or [])}")
    return "dryrun.html", context


def routes(svc: Services) -> list[Route]:
    return [
        Route("/login", login_form, methods=["GET"]),
        Route("/login", login_post(svc), methods=["POST"]),
        Route("/logout", page(svc, logout), methods=["POST"]),
        Route("/", page(svc, dashboard)),
        Route("/jobs", page(svc, jobs)),
        Route("/jobs/{job_id:int}", page(svc, job)),
        Route("/jobs/{job_id:int}/retry", page(svc, job_retry, write=True), methods=["POST"]),
        Route("/quarantine", page(svc, quarantine)),
        Route("/quarantine/bulk", page(svc, quarantine_bulk_confirm, admin_only=True), methods=["GET"]),
        Route("/quarantine/bulk", page(svc, quarantine_bulk, write=True), methods=["POST"]),
        Route("/quarantine/{qid:int}", page(svc, quarantine_entry)),
        Route("/quarantine/{qid:int}/release", page(svc, _confirm("release")), methods=["GET"]),
        Route("/quarantine/{qid:int}/release", page(svc, _do("release"), write=True), methods=["POST"]),
        Route("/quarantine/{qid:int}/purge", page(svc, _confirm("purge")), methods=["GET"]),
        Route("/quarantine/{qid:int}/purge", page(svc, _do("purge"), write=True), methods=["POST"]),
        Route("/destinations", page(svc, destinations)),
        Route("/destinations/resend", page(svc, destination_resend, write=True), methods=["POST"]),
        Route("/destinations/{name}/pause", page(svc, _pause(True), write=True), methods=["POST"]),
        Route("/destinations/{name}/resume", page(svc, _pause(False), write=True), methods=["POST"]),
        Route("/destinations/{name}/echo", page(svc, destination_echo, write=True), methods=["POST"]),
        Route("/audit", page(svc, audit)),
        Route("/config", page(svc, configuration)),
        Route("/dryrun", page(svc, dry_run_form, admin_only=True), methods=["GET"]),
        Route("/dryrun", page(svc, dry_run_post, write=True, admin_only=True), methods=["POST"]),
    ]


SESSION_MAX_AGE = int(timedelta(hours=8).total_seconds())
