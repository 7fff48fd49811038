"""A small pynetdicom Storage SCP that can fail on demand, for forwarding tests.

A real PACS cannot be told to answer 0xA700 once, reject an association, or hang after
accepting; this one can. Everything else is real: loopback sockets, real negotiation.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, cast

from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.presentation import AllStoragePresentationContexts, build_context

StatusSpec = int | Callable[[int], int]

_REJECT_RESULTS = {"permanent": 1, "transient": 2}


class FakePacs:
    """Storage SCP on 127.0.0.1:<free port>.

    ``status``: a fixed C-STORE status, or ``callable(n) -> status`` where n counts the
    C-STOREs received so far (0-based). ``reject``: ("permanent"|"transient", diagnostic[, source]).
    ``accepted_transfer_syntaxes``: restrict what is accepted (default: all pynetdicom knows).
    ``abort_when_idle``: abort an association (A-ABORT instead of a response) whose previous
    C-STORE was at least this many seconds ago, as archives that drop idle associations when
    the next request arrives do. ``abort_at``: abort at these C-STORE numbers (0-based, all
    associations counted together).
    """

    def __init__(
        self,
        status: StatusSpec = 0x0000,
        delay: float = 0.0,
        never_respond: bool = False,
        reject: tuple[Any, ...] | None = None,
        accepted_transfer_syntaxes: list[str] | None = None,
        store_dir: Path | None = None,
        ae_title: str = "FAKEPACS",
        sop_classes: list[str] | None = None,
        abort_when_idle: float | None = None,
        abort_at: frozenset[int] = frozenset(),
    ) -> None:
        self.status = status
        self.delay = delay
        self.never_respond = never_respond
        self.reject = reject
        self.store_dir = store_dir
        self.ae_title = ae_title
        self.port = 0
        self.received: list[tuple[str, str, float]] = []
        self.associations = 0
        self.abort_when_idle = abort_when_idle
        self.abort_at = abort_at
        self.aborted = 0  # associations this PACS aborted on purpose
        self._stores = 0
        self._last_store: dict[int, float] = {}
        self.connections = 0  # TCP connections accepted (an association or an attempt)
        self.open_connections = 0
        self.peak_connections = 0  # most connections open at once
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server: Any = None
        self._ae = AE(ae_title=ae_title)
        self._ae.maximum_pdu_size = 0
        self._ae.network_timeout = 30
        self._ae.dimse_timeout = 30
        syntaxes = list(accepted_transfer_syntaxes or ALL_TRANSFER_SYNTAXES)
        uids = sop_classes or [str(cx.abstract_syntax) for cx in AllStoragePresentationContexts]
        self._ae.supported_contexts = [build_context(uid, syntaxes) for uid in uids]

    # -- handlers -----------------------------------------------------------------------

    def _on_conn_open(self, event: evt.Event) -> None:
        with self._lock:
            self.connections += 1
            self.open_connections += 1
            self.peak_connections = max(self.peak_connections, self.open_connections)
        sock = event.assoc.dul.socket
        if sock is not None and sock.socket is not None:
            sock.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _on_conn_close(self, _: evt.Event) -> None:
        with self._lock:
            self.open_connections -= 1

    def _on_requested(self, event: evt.Event) -> None:
        if self.reject is None:
            return
        kind, diagnostic = self.reject[0], int(self.reject[1])
        result = _REJECT_RESULTS[kind]
        if len(self.reject) > 2:
            source = int(self.reject[2])
        else:
            source = 3 if (kind == "transient" and diagnostic in (1, 2)) else 1
        event.assoc.acse.send_reject(result, source, diagnostic)
        # As pynetdicom's own rejections do: wait for the DUL to put the A-ASSOCIATE-RJ on
        # the wire before the server shuts the socket down.
        event.assoc.kill()

    def _on_established(self, _: evt.Event) -> None:
        with self._lock:
            self.associations += 1

    def _should_abort(self, event: evt.Event) -> bool:
        now = time.monotonic()
        with self._lock:
            n = self._stores
            self._stores += 1
            last = self._last_store.get(id(event.assoc))
            self._last_store[id(event.assoc)] = now
            idle = self.abort_when_idle is not None and last is not None and now - last >= self.abort_when_idle
            if idle or n in self.abort_at:
                self.aborted += 1
                return True
        return False

    def _on_store(self, event: evt.Event) -> int:
        if self._should_abort(event):
            event.assoc.abort()
            return 0xA700  # never reaches the peer: the association is gone
        if self.never_respond:
            self._stopping.wait(120)
            return 0xA700
        with self._lock:
            n = len(self.received)
            uid = str(cast(C_STORE, event.request).AffectedSOPInstanceUID)
            ts = str(event.context.transfer_syntax)
            self.received.append((uid, ts, time.monotonic()))
        if self.store_dir is not None:
            (self.store_dir / f"{uid}.dcm").write_bytes(event.encoded_dataset(include_meta=True))
        if self.delay:
            time.sleep(self.delay)
        return self.status(n) if callable(self.status) else self.status

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> FakePacs:
        """Bind a free loopback port and serve in background threads."""
        handlers: list[Any] = [
            (evt.EVT_CONN_OPEN, self._on_conn_open),
            (evt.EVT_CONN_CLOSE, self._on_conn_close),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ESTABLISHED, self._on_established),
            (evt.EVT_C_STORE, self._on_store),
        ]
        self._server = self._ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=handlers)
        self.port = int(self._server.server_address[1])
        return self

    def stop(self) -> None:
        """Stop serving; unblocks a never-responding handler."""
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def __enter__(self) -> FakePacs:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
