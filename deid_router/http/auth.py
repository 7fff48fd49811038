"""Who is asking: HTTP Basic for the API, a signed session for the console, roles, and a
rate limit on failed logins.

A verified (user, password) pair is remembered for a minute by its keyed hash, so an API
client polling every second does not pay argon2's 64 MiB and ~50 ms per request.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from deid_router.db.operations import UserStore
from deid_router.http.passwords import verify_password
from deid_router.observability.logging import get_logger

log = get_logger("http.auth")

ADMIN = "admin"
VIEWER = "viewer"
FAILURES_ALLOWED = 5  # per client address within FAILURE_WINDOW_SECONDS
FAILURE_WINDOW_SECONDS = 60.0
_VERIFIED_TTL_SECONDS = 60.0


@dataclass(frozen=True)
class Principal:
    name: str
    role: str

    @property
    def is_admin(self) -> bool:
        return self.role == ADMIN


class RateLimited(Exception):
    """Too many failed logins from this client: try again after ``retry_after`` seconds."""

    def __init__(self, retry_after: float) -> None:
        super().__init__("too many failed logins")
        self.retry_after = retry_after


class FailedLogins:
    """Sliding window of failed logins per client address."""

    def __init__(self, allowed: int = FAILURES_ALLOWED, window: float = FAILURE_WINDOW_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.allowed = allowed
        self.window = window
        self.clock = clock
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def _recent(self, client: str, now: float) -> deque[float]:
        q = self._failures.setdefault(client, deque())
        while q and q[0] <= now - self.window:
            q.popleft()
        return q

    def check(self, client: str) -> None:
        now = self.clock()
        with self._lock:
            q = self._recent(client, now)
            if len(q) >= self.allowed:
                raise RateLimited(q[0] + self.window - now)

    def failed(self, client: str) -> None:
        now = self.clock()
        with self._lock:
            self._recent(client, now).append(now)


class Authenticator:
    """Checks passwords against the users table; logs failures without the typed name."""

    def __init__(self, users: UserStore, cache_key: bytes) -> None:
        self.users = users
        self.failures = FailedLogins()
        self._cache_key = cache_key
        self._verified: dict[str, tuple[float, str, str]] = {}  # mac -> (expires, hash, role)
        self._lock = threading.Lock()

    def _mac(self, name: str, password: str) -> str:
        return hmac.new(self._cache_key, f"{name}\0{password}".encode(), hashlib.sha256).hexdigest()

    def login(self, name: str, password: str, client: str) -> Principal | None:
        """The user, or None (a failure, counted); raises RateLimited once too many failed."""
        self.failures.check(client)
        user = self.users.get(name)
        mac = self._mac(name, password)
        if user is not None:
            with self._lock:
                cached = self._verified.get(mac)
            if cached and cached[0] > time.monotonic() and cached[1] == user.password_hash:
                return Principal(user.name, user.role)
            if verify_password(user.password_hash, password):
                with self._lock:
                    self._verified[mac] = (time.monotonic() + _VERIFIED_TTL_SECONDS, user.password_hash, user.role)
                return Principal(user.name, user.role)
        self.failures.failed(client)
        log.warning("login_failed", client=client, known_user=user is not None,
                    user_hash=hashlib.sha256(name.encode()).hexdigest()[:12])
        return None

    def current(self, name: str) -> Principal | None:
        """The session's user as the database has it now (a removed user is logged out)."""
        user = self.users.get(name)
        return None if user is None else Principal(user.name, user.role)


def basic_credentials(header: str | None) -> tuple[str, str] | None:
    """``(user, password)`` from an ``Authorization: Basic ...`` header."""
    if not header or not header.lower().startswith("basic "):
        return None
    try:
        decoded = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    name, sep, password = decoded.partition(":")
    return (name, password) if sep else None
