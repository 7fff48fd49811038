"""The uvicorn server thread: real sockets, real TLS with an openssl-made certificate."""

from __future__ import annotations

import socket
import ssl
import subprocess
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from deid_router.config import HttpConfig
from deid_router.errors import HttpServerError
from deid_router.http.server import HttpServer


async def hello(request: Request) -> PlainTextResponse:
    return PlainTextResponse("hello")


APP = Starlette(routes=[Route("/", hello)])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_serves_and_stops_and_a_taken_port_is_a_clear_error() -> None:
    server = HttpServer(HttpConfig(port=_free_port()), APP)
    server.start()
    try:
        assert httpx.get(f"http://127.0.0.1:{server.port}/").text == "hello"
        with pytest.raises(HttpServerError, match=f"127.0.0.1:{server.port}"):
            HttpServer(HttpConfig(port=server.port), APP).start()
    finally:
        server.stop()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{server.port}/", timeout=2)


def test_tls(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )
    server = HttpServer(HttpConfig(port=_free_port(), cert_file=cert, key_file=key), APP)
    server.start()
    try:
        assert httpx.get(f"https://127.0.0.1:{server.port}/", verify=ssl.create_default_context(cafile=str(cert))).text == "hello"
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{server.port}/", timeout=3)
    finally:
        server.stop()
