"""The ASGI application: health and metrics (no login), the JSON API and the console."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from prometheus_client import CONTENT_TYPE_LATEST

from deid_router.http import api, console
from deid_router.http.services import Services
from deid_router.observability.logging import get_logger
from deid_router.observability.metrics import render

log = get_logger("http")

SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; form-action 'self'; frame-ancestors 'none'",
}


class SecurityHeaders:
    """Pure ASGI middleware: the headers of SECURITY_HEADERS on every response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for k, v in SECURITY_HEADERS.items():
                    if k not in headers:
                        headers[k] = v
            await send(message)

        await self.app(scope, receive, with_headers)


class ErrorBoundary:
    """Outermost: an unexpected exception becomes a bare 500 and one log line naming only its
    type. uvicorn would otherwise log the traceback, whose message may quote a value (a
    pydicom error about an uploaded file, say)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking)
        except Exception as exc:  # the boundary: nothing escapes to the server's traceback log
            log.error("http_request_failed", error=type(exc).__name__, path=scope.get("path", ""))
            if not started:
                await PlainTextResponse("internal error", status_code=500)(scope, receive, send)


def build_app(svc: Services) -> Starlette:
    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        problems = await run_in_threadpool(svc.readiness.problems)
        if problems:
            return JSONResponse({"ready": False, "reasons": problems}, status_code=503)
        return JSONResponse({"ready": True})

    async def metrics(request: Request) -> Response:
        body = await run_in_threadpool(render, svc.metrics)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    app = Starlette(
        routes=[
            Route("/healthz", healthz),
            Route("/readyz", readyz),
            Route("/metrics", metrics),
            *api.routes(svc),
            *console.routes(svc),
        ],
        middleware=[
            Middleware(ErrorBoundary),
            Middleware(SecurityHeaders),
            Middleware(
                SessionMiddleware, secret_key=svc.session_secret, session_cookie="deid_router_session",
                max_age=console.SESSION_MAX_AGE, same_site="strict", https_only=svc.config.http.cert_file is not None,
            )
        ],
    )

    return app
