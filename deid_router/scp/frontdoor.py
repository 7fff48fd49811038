"""The listener's front door: every connection until its A-ASSOCIATE-RQ has fully arrived.

One selector thread owns the listening sockets and every *pending* connection (accepted, no
complete A-ASSOCIATE-RQ yet). It checks the peer against ``allowed_hosts`` before reading a
byte, caps pending connections in total and per source address, drives TLS handshakes
non-blocking, and reads the request into a buffer no larger than what arrived. A connection
is dropped when its handshake and whole request have not arrived within the ARTIM timeout,
measured from the connection (PS3.8 9.1.5: a byte every few seconds does not extend it).
Only a complete request is handed to :meth:`Acceptor.serve_connection` on its own thread
with its 1 MiB receive buffer, so idle or trickling peers cost a socket and a few hundred
bytes each, never a thread or an association slot.

Refusals are logged (``association_refused`` with a fixed ``reason`` and the peer address,
never a tag value) and counted in :class:`Refusals`.
"""

from __future__ import annotations

import errno
import ipaddress
import selectors
import socket
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from deid_router import wire
from deid_router.observability.logging import get_logger
from deid_router.tls import refusal_reason

log = get_logger("scp")

TLS_HANDSHAKE_RECORD = 0x16  # first byte of a TLS ClientHello record
ACCEPT_BURST = 64  # connections accepted per wake-up of one listening socket
ACCEPT_PAUSE_SECONDS = 0.5

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
TlsContextSource = Callable[[], ssl.SSLContext]
Handoff = Callable[[socket.socket, bytes, str], None]


RefusalHook = Callable[[str, str, str], None]  # (reason code, calling AE title, peer address)


class Refusals:
    """Connections and associations refused, by fixed reason (thread-safe); each one is also
    passed to ``notify`` (the audit trail's Security Alert), which must not block."""

    def __init__(self, notify: RefusalHook | None = None) -> None:
        self._counts: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._notify = notify

    def count(self, reason: str, peer: str = "", calling_aet: str = "") -> None:
        with self._lock:
            self._counts[reason] += 1
        if self._notify is not None:
            try:
                self._notify(reason, calling_aet, peer)
            except Exception as exc:  # the audit trail never stops the listener
                log.error("refusal_notify_failed", error=type(exc).__name__)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)


class _Refused(Exception):
    """Internal: refuse this pending connection with ``reason``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class FrontDoorSettings:
    allowed_hosts: tuple[str, ...] = ()  # CIDRs; empty: any host
    artim_timeout_seconds: float = 10.0  # from the connection to the complete A-ASSOCIATE-RQ
    max_pending: int = 256
    max_pending_per_host: int = 32
    max_request_bytes: int = 1024 * 1024


@dataclass(eq=False)
class _Listening:
    sock: socket.socket
    tls: TlsContextSource | None
    paused_until: float = 0.0  # not watched until then (accept failed for lack of descriptors)


@dataclass(eq=False)
class _Pending:
    """A connection that has not yet delivered a whole A-ASSOCIATE-RQ."""

    sock: socket.socket
    host: str
    deadline: float
    tls: TlsContextSource | None
    stage: str = "request"  # "hello" (TLS port, nothing read) -> "handshake" -> "request"
    buf: bytearray = field(default_factory=bytearray)


def peer_host(address: object) -> str:
    """The textual IP address of a peer (an IPv4-mapped IPv6 address as IPv4)."""
    host = str(address[0]) if isinstance(address, tuple) else str(address)
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def host_allowed(host: str, networks: tuple[Network, ...]) -> bool:
    if not networks:
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return any(ip.version == net.version and ip in net for net in networks)


class FrontDoor:
    """The selector thread; ``handoff(sock, request, host)`` takes each complete request."""

    def __init__(self, settings: FrontDoorSettings, handoff: Handoff, refusals: Refusals) -> None:
        self.settings = settings
        self.networks: tuple[Network, ...] = tuple(ipaddress.ip_network(c) for c in settings.allowed_hosts)
        self.handoff = handoff
        self.refusals = refusals
        self._selector = selectors.DefaultSelector()
        self._listening: list[_Listening] = []
        self._pending: set[_Pending] = set()
        self._per_host: Counter[str] = Counter()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._lock = threading.Lock()
        self._stopping = False
        self._thread: threading.Thread | None = None

    # -- control (any thread) -------------------------------------------------------------

    def add_listener(self, sock: socket.socket, tls: TlsContextSource | None) -> None:
        sock.setblocking(False)
        entry = _Listening(sock, tls)
        self._listening.append(entry)
        self._selector.register(sock, selectors.EVENT_READ, entry)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="dicom-front-door", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Close the listening sockets and every pending connection."""
        self._stopping = True
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass
        if self._thread is not None:
            self._thread.join(timeout=5)
        for entry in self._listening:
            entry.sock.close()
        for pending in list(self._pending):
            self._close(pending)
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()

    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    # -- the loop -------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping:
            now = time.monotonic()
            with self._lock:
                earliest = min((p.deadline for p in self._pending), default=now + 1.0)
            earliest = min([earliest] + [e.paused_until for e in self._listening if e.paused_until])
            try:
                events = self._selector.select(max(0.0, min(earliest - now, 1.0)))
            except OSError:
                time.sleep(0.01)
                continue
            for key, _mask in events:
                if self._stopping:
                    return
                data = key.data
                try:
                    if data is None:
                        self._drain_wake()
                    elif isinstance(data, _Listening):
                        self._accept(data)
                    else:
                        self._advance(data)
                except Exception as exc:  # one bad connection must never stop the front door
                    log.error("front_door_error", error=type(exc).__name__)
                    if isinstance(data, _Pending):
                        self._close(data)
            self._resume_listening(time.monotonic())
            self._expire(time.monotonic())

    def _drain_wake(self) -> None:
        try:
            self._wake_r.recv(64)
        except OSError:
            pass

    def _accept(self, entry: _Listening) -> None:
        for _ in range(ACCEPT_BURST):
            try:
                sock, address = entry.sock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as exc:
                # Out of file descriptors (EMFILE, ENFILE): the socket stays readable, so stop
                # watching it for a moment instead of spinning; pending ones expire meanwhile.
                log.error("listener_accept_failed", error=errno.errorcode.get(exc.errno or 0, "unknown"))
                self._selector.unregister(entry.sock)
                entry.paused_until = time.monotonic() + ACCEPT_PAUSE_SECONDS
                return
            host = peer_host(address)
            if not host_allowed(host, self.networks):
                self._refuse_socket(sock, host, "host_not_allowed")
                continue
            with self._lock:
                full = len(self._pending) >= self.settings.max_pending
                host_full = self._per_host[host] >= self.settings.max_pending_per_host
            if full or host_full:
                self._refuse_socket(sock, host, "pending_limit" if full else "pending_host_limit")
                continue
            sock.setblocking(False)
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
            pending = _Pending(
                sock, host, time.monotonic() + self.settings.artim_timeout_seconds, entry.tls,
                stage="hello" if entry.tls is not None else "request",
            )
            with self._lock:
                self._pending.add(pending)
                self._per_host[host] += 1
            self._selector.register(sock, selectors.EVENT_READ, pending)

    def _resume_listening(self, now: float) -> None:
        for entry in self._listening:
            if entry.paused_until and entry.paused_until <= now:
                entry.paused_until = 0.0
                self._selector.register(entry.sock, selectors.EVENT_READ, entry)

    def _refuse_socket(self, sock: socket.socket, host: str, reason: str) -> None:
        log.warning("association_refused", reason=reason, peer=host)
        self.refusals.count(reason, host)
        try:
            sock.close()
        except OSError:
            pass

    # -- one pending connection -----------------------------------------------------------

    def _advance(self, p: _Pending) -> None:
        try:
            if p.stage == "hello":
                self._hello(p)
            if p.stage == "handshake":
                self._handshake(p)
            if p.stage == "request":
                self._read_request(p)
        except _Refused as exc:
            self._refuse(p, exc.reason)
        except ssl.SSLError as exc:
            self._refuse(p, f"tls_{refusal_reason(exc)}")
        except wire.ProtocolError as exc:
            log.warning("association_aborted", reason=str(exc), peer=p.host)
            self.refusals.count("protocol_error", p.host)
            self._send_quietly(p, wire.encode_abort(wire.ABORT_SOURCE_PROVIDER, exc.reason))
            self._close(p)
        except (EOFError, OSError):
            self._close(p)  # gone before asking anything: a port probe, not a refusal

    def _hello(self, p: _Pending) -> None:
        """On the TLS port: a plain DICOM client is refused before any handshake."""
        first = p.sock.recv(1, socket.MSG_PEEK)
        if not first:
            raise EOFError
        if first[0] != TLS_HANDSHAKE_RECORD:
            raise _Refused("tls_plain_client")
        assert p.tls is not None
        self._selector.unregister(p.sock)
        p.sock = p.tls().wrap_socket(p.sock, server_side=True, do_handshake_on_connect=False)
        self._selector.register(p.sock, selectors.EVENT_READ, p)
        p.stage = "handshake"

    def _handshake(self, p: _Pending) -> None:
        sock = p.sock
        assert isinstance(sock, ssl.SSLSocket)
        try:
            sock.do_handshake()
        except ssl.SSLWantReadError:
            self._selector.modify(sock, selectors.EVENT_READ, p)
            return
        except ssl.SSLWantWriteError:
            self._selector.modify(sock, selectors.EVENT_WRITE, p)
            return
        self._selector.modify(sock, selectors.EVENT_READ, p)
        p.stage = "request"
        log.debug("tls_established", peer=p.host, version=sock.version())

    def _read_request(self, p: _Pending) -> None:
        """Read exactly the A-ASSOCIATE-RQ (never beyond it), as far as it has arrived."""
        header = wire.PDU_HEADER.size
        while True:
            if len(p.buf) < header:
                want = header - len(p.buf)
            else:
                pdu_type, length = wire.PDU_HEADER.unpack_from(p.buf)
                if pdu_type == TLS_HANDSHAKE_RECORD and p.tls is None:
                    raise _Refused("tls_client_on_plain_port")  # a modality configured for TLS
                if pdu_type != wire.A_ASSOCIATE_RQ:
                    raise wire.ProtocolError("expected A-ASSOCIATE-RQ", wire.REASON_UNEXPECTED_PDU)
                if length > self.settings.max_request_bytes:
                    raise wire.ProtocolError("PDU length out of range")
                want = header + length - len(p.buf)
                if want == 0:
                    self._hand_off(p)
                    return
            try:
                chunk = p.sock.recv(min(want, 65536))
            except (BlockingIOError, InterruptedError, ssl.SSLWantReadError):
                return
            except ssl.SSLWantWriteError:
                return
            if not chunk:
                raise EOFError
            p.buf += chunk

    def _hand_off(self, p: _Pending) -> None:
        self._forget(p)
        try:
            p.sock.setblocking(True)
        except OSError:
            p.sock.close()
            return
        self.handoff(p.sock, bytes(p.buf), p.host)

    # -- endings --------------------------------------------------------------------------

    def _expire(self, now: float) -> None:
        with self._lock:
            late = [p for p in self._pending if p.deadline <= now]
        for p in late:
            # PS3.8 AA-2: ARTIM expired before the request: close the transport connection.
            stage = "tls_handshake" if p.stage in ("hello", "handshake") else "request"
            log.warning("association_refused", reason="artim_timeout", stage=stage, received=len(p.buf), peer=p.host)
            self.refusals.count("artim_timeout", p.host)
            self._close(p)

    def _refuse(self, p: _Pending, reason: str) -> None:
        log.warning("association_refused", reason=reason, peer=p.host)
        self.refusals.count(reason, p.host)
        self._close(p)

    def _send_quietly(self, p: _Pending, data: bytes) -> None:
        try:
            p.sock.send(data)
        except (OSError, ssl.SSLError):
            pass

    def _forget(self, p: _Pending) -> None:
        try:
            self._selector.unregister(p.sock)
        except (KeyError, ValueError, OSError):
            pass
        with self._lock:
            if p in self._pending:
                self._pending.discard(p)
                self._per_host[p.host] -= 1
                if self._per_host[p.host] <= 0:
                    del self._per_host[p.host]

    def _close(self, p: _Pending) -> None:
        self._forget(p)
        try:
            p.sock.close()
        except OSError:
            pass
