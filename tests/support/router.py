"""Drive a real ``deid-router serve`` process from tests: write its config, start it, wait for
its port, kill it (SIGKILL or SIGTERM), and read its status through the CLI."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]

# Every router a test started; tests/conftest.py SIGKILLs the survivors after each test, so a
# failing test never leaves a node running that a later test would collide with.
LIVE: set["RouterProcess"] = set()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.2, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(str(v))


def render_toml(doc: dict[str, Any]) -> str:
    """A tiny TOML writer for the shapes our config uses (tables, arrays of tables, one nesting)."""
    lines: list[str] = []
    for section, body in doc.items():
        if isinstance(body, list):
            for item in body:
                lines.append(f"[[{section}]]")
                nested = {k: v for k, v in item.items() if isinstance(v, dict)}
                for k, v in item.items():
                    if not isinstance(v, dict):
                        lines.append(f"{k} = {_toml_value(v)}")
                for k, v in nested.items():
                    lines.append(f"[{section}.{k}]")
                    lines.extend(f"{kk} = {_toml_value(vv)}" for kk, vv in v.items())
                lines.append("")
        else:
            lines.append(f"[{section}]")
            arrays = {k: v for k, v in body.items() if isinstance(v, list) and v and isinstance(v[0], dict)}
            tables = {k: v for k, v in body.items() if isinstance(v, dict)}
            for k, v in body.items():
                if k not in arrays and k not in tables:
                    lines.append(f"{k} = {_toml_value(v)}")
            lines.append("")
            for k, table in tables.items():  # [listener.tls]
                lines.append(f"[{section}.{k}]")
                lines.extend(f"{kk} = {_toml_value(vv)}" for kk, vv in table.items())
                lines.append("")
            for k, items in arrays.items():
                for item in items:
                    lines.append(f"[[{section}.{k}]]")
                    lines.extend(f"{kk} = {_toml_value(vv)}" for kk, vv in item.items())
                    lines.append("")
    return "\n".join(lines)


def dicom_destination(name: str, port: int, ae_title: str = "PACS", **extra: Any) -> dict[str, Any]:
    return {"name": name, "type": "dicom", "ae_title": ae_title, "host": "127.0.0.1", "port": port, **extra}


@dataclass(eq=False)
class RouterProcess:
    """One ``deid-router serve`` subprocess with its own folder, config and log file."""

    workdir: Path
    destinations: list[dict[str, Any]]
    listener: dict[str, Any] = field(default_factory=dict)
    queue: dict[str, Any] = field(default_factory=dict)
    deid: dict[str, Any] = field(default_factory=dict)
    storage: dict[str, Any] = field(default_factory=dict)
    routes: list[dict[str, Any]] | None = None
    # {"port": free_port()} turns the HTTP server on; None leaves [http] out (a router older than it)
    http: dict[str, Any] | None = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # more top-level tables ([storage_commitment], ...)
    env: dict[str, str] = field(default_factory=dict)
    extra_toml: str = ""  # appended to the config as written (e.g. [profiles.NAME] tables)
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        self.write_config()

    @property
    def ready_port(self) -> int:
        """The port that answers once the node listens (the TLS one when the plain port is off)."""
        if self.listener.get("plain", True) is False:
            return int(self.listener["tls"]["port"])
        return self.port

    @property
    def config_path(self) -> Path:
        return self.workdir / "router.toml"

    @property
    def log_path(self) -> Path:
        return self.workdir / "router.log"

    @property
    def secret_path(self) -> Path:
        return self.workdir / "var" / "secret.key"

    def write_config(self) -> None:
        doc: dict[str, Any] = {
            "listener": {"ae_title": "DEID_ROUTER", "host": "127.0.0.1", "port": self.port, **self.listener},
            "storage": {"root": "var", "min_free_mb": 1, **self.storage},
            "queue": {
                "max_attempts": 10, "retry_initial_seconds": 0.5, "retry_max_seconds": 2,
                "workers": 1, "lease_seconds": 10, "poll_seconds": 0.1, **self.queue,
            },
            "deid": {"secret_file": "var/secret.key", **self.deid},
            "destinations": self.destinations,
            "routes": self.routes or [{"name": "all", "destinations": [d["name"] for d in self.destinations]}],
            **self.extra,
        }
        if self.http is not None:
            doc["http"] = {"host": "127.0.0.1", "port": 0, **self.http}  # off unless a test asks (never 8080)
        self.config_path.write_text(render_toml(doc) + "\n" + self.extra_toml, encoding="utf-8")

    def start(self, timeout: float = 30.0) -> RouterProcess:
        env = {**os.environ, **self.env}
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "deid_router", "serve", "--config", str(self.config_path)],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.workdir,
        )
        log.close()
        LIVE.add(self)
        self.starts += 1
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"router exited with {self.proc.returncode}:\n{self.log_text()[-3000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.ready_port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.1)
        raise AssertionError(f"router did not listen within {timeout}s:\n{self.log_text()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL the whole node (its worker processes die with it)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
        time.sleep(0.3)  # let PDEATHSIG take the workers

    def terminate(self, timeout: float = 35.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.terminate()
            except subprocess.TimeoutExpired:
                self.kill()

    @property
    def http_url(self) -> str:
        assert self.http and self.http.get("port"), "start the router with http={'port': free_port()}"
        scheme = "https" if "tls" in self.http else "http"
        return f"{scheme}://127.0.0.1:{self.http['port']}"

    def add_user(self, name: str, role: str, password: str) -> None:
        """``deid-router user add`` with a password file (mode 0600, in the router's folder)."""
        path = self.workdir / f"{name}.password"
        path.write_text(password + "\n", encoding="utf-8")
        path.chmod(0o600)
        from deid_router.cli import main  # in-process: the same command, without a Python start-up

        args = ["user", "add", name, "--role", role, "--password-file", str(path), "--config", str(self.config_path)]
        assert main(args) == 0, f"deid-router {' '.join(args)} failed"

    def api_status(self, auth: tuple[str, str]) -> dict[str, Any]:
        """``GET /api/v1/status`` (the object of ``status --json``), without a CLI process per poll."""
        import httpx

        res = httpx.get(self.http_url + "/api/v1/status", auth=auth, timeout=30)
        res.raise_for_status()
        return dict(res.json())

    def wait_idle_api(self, auth: tuple[str, str], timeout: float, expect_done: int | None = None) -> dict[str, Any]:
        """:meth:`wait_idle` through the HTTP API (an HTTP-enabled router)."""
        last: dict[str, Any] = {}

        def idle() -> bool:
            nonlocal last
            last = self.api_status(auth)
            jobs = last["jobs"]
            busy = jobs.get("queued", 0) + jobs.get("running", 0) + jobs.get("retrying", 0)
            return busy == 0 and (expect_done is None or jobs.get("done", 0) >= expect_done)

        try:
            wait_until(idle, timeout, interval=0.3, what="the queue to drain")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; last status {last}\n{self.log_text()[-3000:]}") from None
        return last

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        # --config right after the command word: nested commands (quarantine list) need it there
        res = subprocess.run(
            [sys.executable, "-m", "deid_router", args[0], "--config", str(self.config_path), *args[1:]],
            capture_output=True, text=True, env={**os.environ, **self.env}, timeout=60,
        )
        if check and res.returncode != 0:
            raise AssertionError(f"deid-router {' '.join(args)} -> {res.returncode}\n{res.stdout}\n{res.stderr}")
        return res

    def status(self) -> dict[str, Any]:
        res = self.cli("status", "--json")
        return dict(json.loads(res.stdout))

    def wait_idle(self, timeout: float, expect_done: int | None = None) -> dict[str, Any]:
        """Wait until no job is queued, running or retrying (and, if given, ``expect_done`` are done)."""
        last: dict[str, Any] = {}

        def idle() -> bool:
            nonlocal last
            last = self.status()
            jobs = last["jobs"]
            busy = jobs.get("queued", 0) + jobs.get("running", 0) + jobs.get("retrying", 0)
            return busy == 0 and (expect_done is None or jobs.get("done", 0) >= expect_done)

        try:
            wait_until(idle, timeout, interval=0.5, what="the queue to drain")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; last status {last}\n{self.log_text()[-3000:]}") from None
        return last

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def __enter__(self) -> RouterProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
