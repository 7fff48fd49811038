"""``/api/v1``: JSON for what the CLI does. HTTP Basic; viewer reads, admin also writes.

Writes take ``Content-Type: application/json`` (a body of ``{}`` will do): a cross-site HTML
form cannot send that, so a browser that remembers Basic credentials cannot be made to
release or purge by another site.
"""

from __future__ import annotations

import json
from datetime import datetime
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from deid_router.errors import QueueError
from deid_router.http.actions import NotFound
from deid_router.http.auth import Principal, RateLimited, basic_credentials
from deid_router.http.serialize import plain
from deid_router.http.services import Services
from deid_router.jobs.states import ALL_STATES

Handler = Callable[[Request, Services, Principal], Any]


def _error(status: int, message: str, **headers: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers or None)


def _client(request: Request) -> str:
    return request.client.host if request.client else "-"


def endpoint(svc: Services, handler: Handler, write: bool = False) -> Callable[[Request], Awaitable[Response]]:
    """Authenticate, authorise, run ``handler`` off the event loop, translate errors."""

    async def run(request: Request) -> Response:
        creds = basic_credentials(request.headers.get("authorization"))
        if creds is None:
            return _error(401, "login required (HTTP Basic)", **{"WWW-Authenticate": 'Basic realm="deid-router"'})
        try:
            who = await run_in_threadpool(svc.auth.login, creds[0], creds[1], _client(request))
        except RateLimited as exc:
            return _error(429, "too many failed logins; try again later", **{"Retry-After": str(int(exc.retry_after) + 1)})
        except QueueError:
            return _error(503, "queue database unavailable")
        if who is None:
            return _error(401, "wrong user or password", **{"WWW-Authenticate": 'Basic realm="deid-router"'})
        body: Any = None
        if write:
            if not who.is_admin:
                return _error(403, "admin role required")
            if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
                return _error(415, "send Content-Type: application/json")
            raw = await request.body()
            try:
                body = json.loads(raw) if raw else {}
            except ValueError:
                return _error(400, "body is not JSON")
            if not isinstance(body, dict):
                return _error(400, "body must be a JSON object")
        request.state.body = body
        try:
            result = await run_in_threadpool(handler, request, svc, who)
        except NotFound as exc:
            return _error(404, str(exc))
        except QueueError:
            return _error(503, "queue database unavailable")
        except ValueError as exc:
            return _error(400, str(exc))
        return result if isinstance(result, Response) else JSONResponse(plain(result))

    return run


def _int(request: Request, name: str) -> int:
    try:
        return int(request.path_params[name])
    except (KeyError, ValueError):
        raise ValueError(f"{name} must be an integer") from None


def status(request: Request, svc: Services, who: Principal) -> Any:
    return svc.reports.status(svc.states)


def quarantine_list(request: Request, svc: Services, who: Principal) -> Any:
    closed = request.query_params.get("all") in ("1", "true", "yes")
    return {"entries": svc.reports.quarantine(include_closed=closed)}


def quarantine_show(request: Request, svc: Services, who: Principal) -> Any:
    rows = svc.reports.quarantine(qid=_int(request, "qid"))
    if not rows:
        raise NotFound(f"no quarantine entry {request.path_params['qid']}")
    return rows[0]


def quarantine_release(request: Request, svc: Services, who: Principal) -> Any:
    qid = _int(request, "qid")
    return {"entry": qid, "outcome": svc.actions.release(who, qid)}


def quarantine_purge(request: Request, svc: Services, who: Principal) -> Any:
    qid = _int(request, "qid")
    return {"entry": qid, "outcome": svc.actions.purge(who, qid)}


def jobs_list(request: Request, svc: Services, who: Principal) -> Any:
    q = request.query_params
    state = q.get("state") or None
    if state is not None and state not in {s.value for s in ALL_STATES}:
        raise ValueError(f"state must be one of {', '.join(s.value for s in ALL_STATES)}")
    try:
        limit = min(max(int(q.get("limit", "100")), 1), 1000)
        before = int(q["before"]) if q.get("before") else None
    except ValueError:
        raise ValueError("limit and before must be integers") from None
    try:
        since = datetime.fromisoformat(q["since"]) if q.get("since") else None
    except ValueError:
        raise ValueError("since must be an ISO 8601 time, e.g. 2024-05-01T12:00:00+00:00") from None
    if since is not None and since.tzinfo is None:
        raise ValueError("since needs a UTC offset, e.g. 2024-05-01T12:00:00+00:00")
    return {"jobs": svc.reports.jobs(state, q.get("destination") or None, limit, before, since)}


def job_show(request: Request, svc: Services, who: Principal) -> Any:
    job_id = _int(request, "job_id")
    state = svc.repo.job_state(job_id)
    if state is None:
        raise NotFound(f"no job {job_id}")
    return {"id": job_id, "state": state[0], "attempts": state[1], "events": svc.reports.job_events(job_id)}


def job_retry(request: Request, svc: Services, who: Principal) -> Any:
    job_id = _int(request, "job_id")
    return {"job": job_id, "outcome": svc.actions.retry(who, job_id)}


def destinations(request: Request, svc: Services, who: Principal) -> Any:
    states = svc.states.all()
    return {
        "destinations": [
            {
                "name": d.name, "type": d.type,
                "paused": bool(states[d.name].paused) if d.name in states else False,
                "reason": states[d.name].reason if d.name in states and states[d.name].paused else "",
            }
            for d in svc.config.destinations
        ]
    }


def _pause(paused: bool) -> Handler:
    def handler(request: Request, svc: Services, who: Principal) -> Any:
        name = str(request.path_params["name"])
        reason = str((request.state.body or {}).get("reason", ""))
        svc.actions.set_paused(who, name, paused, reason)
        return {"destination": name, "paused": paused}

    return handler


def destination_echo(request: Request, svc: Services, who: Principal) -> Any:
    name = str(request.path_params["name"])
    return {"destination": name, **svc.actions.echo(who, name, svc.config).__dict__}


def resend(request: Request, svc: Services, who: Principal) -> Any:
    """``{"destination": NAME, "study_uid": UID}`` (or ``"series_uid"``): what was queued."""
    body = request.state.body or {}
    fields = {k: body.get(k) for k in ("destination", "study_uid", "series_uid")}
    if not all(v is None or isinstance(v, str) for v in fields.values()) or fields["destination"] is None:
        raise ValueError("destination, and study_uid or series_uid, must be strings")
    return svc.actions.resend(who, fields["destination"], study=fields["study_uid"], series=fields["series_uid"])


def audit(request: Request, svc: Services, who: Principal) -> Any:
    return {"events": svc.reports.audit()}


def routes(svc: Services) -> list[Route]:
    p = "/api/v1"
    return [
        Route(f"{p}/status", endpoint(svc, status)),
        Route(f"{p}/quarantine", endpoint(svc, quarantine_list)),
        Route(f"{p}/quarantine/{{qid}}", endpoint(svc, quarantine_show)),
        Route(f"{p}/quarantine/{{qid}}/release", endpoint(svc, quarantine_release, write=True), methods=["POST"]),
        Route(f"{p}/quarantine/{{qid}}/purge", endpoint(svc, quarantine_purge, write=True), methods=["POST"]),
        Route(f"{p}/jobs", endpoint(svc, jobs_list)),
        Route(f"{p}/jobs/{{job_id}}", endpoint(svc, job_show)),
        Route(f"{p}/jobs/{{job_id}}/retry", endpoint(svc, job_retry, write=True), methods=["POST"]),
        Route(f"{p}/destinations", endpoint(svc, destinations)),
        Route(f"{p}/destinations/{{name}}/pause", endpoint(svc, _pause(True), write=True), methods=["POST"]),
        Route(f"{p}/destinations/{{name}}/resume", endpoint(svc, _pause(False), write=True), methods=["POST"]),
        Route(f"{p}/destinations/{{name}}/echo", endpoint(svc, destination_echo, write=True), methods=["POST"]),
        Route(f"{p}/resend", endpoint(svc, resend, write=True), methods=["POST"]),
        Route(f"{p}/audit", endpoint(svc, audit)),
    ]
