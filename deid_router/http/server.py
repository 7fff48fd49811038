"""uvicorn on a thread of the node's main process, on a socket bound before the node starts
(a port in use is a clear error at start, not a log line later)."""

from __future__ import annotations

import socket
import threading
import time

import uvicorn
from starlette.types import ASGIApp

from deid_router.config import HttpConfig
from deid_router.errors import HttpServerError
from deid_router.observability.logging import get_logger

log = get_logger("http.server")


class HttpServer:
    def __init__(self, config: HttpConfig, app: ASGIApp) -> None:
        self.config = config
        self.app = app
        self._sock: socket.socket | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._port = config.port

    @property
    def port(self) -> int:
        """The bound port (the configured one; useful when that was chosen by the OS)."""
        return self._port

    def start(self, timeout: float = 15.0) -> None:
        family = socket.AF_INET6 if ":" in self.config.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.config.host, self.config.port))
        except OSError as exc:
            sock.close()
            raise HttpServerError(
                f"cannot listen for HTTP on {self.config.host}:{self.config.port} ({exc.strerror}); "
                "change [http] port (0: no HTTP server)"
            ) from exc
        sock.listen(128)
        self._port = int(sock.getsockname()[1])
        sock.set_inheritable(False)
        self._sock = sock
        tls = self.config.cert_file is not None
        cfg = uvicorn.Config(
            self.app, log_config=None, access_log=False, lifespan="off", server_header=False,
            proxy_headers=False, timeout_graceful_shutdown=2,
            ssl_certfile=str(self.config.cert_file) if tls else None,
            ssl_keyfile=str(self.config.key_file) if tls and self.config.key_file else None,
        )
        self._server = uvicorn.Server(cfg)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, name="http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise HttpServerError("the HTTP server did not start (see the log)")
            time.sleep(0.02)
        log.info("http_started", host=self.config.host, port=self.port, tls=tls)

    def begin_stop(self) -> None:
        """Ask the server to close (returns at once; ``stop`` waits for it)."""
        if self._server is not None:
            self._server.should_exit = True

    def stop(self, timeout: float = 5.0) -> None:
        if self._server is None:
            return
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
        if self._sock is not None:
            self._sock.close()
        self._server = None
        log.info("http_stopped")
