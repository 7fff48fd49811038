"""A loopback TCP proxy a test can cut and restore, to make a database "go away" on demand.

``cut()`` closes every proxied connection and the listening socket, so new connections are
refused at once (what a client sees when the database server is down); ``restore()`` listens
again on the same port. Threads only, no event loop: the proxy lives in the test process.
"""

from __future__ import annotations

import socket
import threading
from types import TracebackType

from sqlalchemy.engine import make_url


class TcpProxy:
    """Forward 127.0.0.1:<port> to ``upstream`` (host, port) until cut."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.port = 0
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self.accepted = 0
        # lose_commit_reply(): connections that sent the marker, and those whose replies are dropped
        self._marker: bytes | None = None
        self._marked: set[socket.socket] = set()
        self._mute: set[socket.socket] = set()
        self.replies_lost = 0

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> TcpProxy:
        self._listen()
        return self

    def _listen(self) -> None:
        srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("127.0.0.1", self.port))
        srv.listen(64)
        self.port = int(srv.getsockname()[1])
        self._listener = srv
        self._accept_thread = threading.Thread(target=self._accept_loop, args=(srv,), daemon=True)
        self._accept_thread.start()

    def cut(self) -> None:
        """Drop every connection and refuse new ones (connection refused)."""
        with self._lock:
            srv, self._listener = self._listener, None
            conns, self._conns = list(self._conns), set()
        if srv is not None:
            try:
                srv.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            srv.close()
        if self._accept_thread is not None:
            self._accept_thread.join(timeout=5)
        for c in conns:
            _close(c)

    def restore(self) -> None:
        """Listen again on the same port."""
        with self._lock:
            if self._listener is not None:
                return
        self._listen()

    def stop(self) -> None:
        self.cut()

    def lose_commit_reply(self, marker: bytes) -> None:
        """On the next connection that sends ``marker`` and then a COMMIT, forward the COMMIT
        but drop the server's reply and close the connection: the transaction is committed
        while the client sees the connection fail (the outcome-unknown case of a commit)."""
        with self._lock:
            self._marker = marker

    @property
    def is_cut(self) -> bool:
        return self._listener is None

    # -- plumbing -----------------------------------------------------------------------

    def _accept_loop(self, srv: socket.socket) -> None:
        while True:
            try:
                client, _ = srv.accept()
            except OSError:
                return  # listener closed by cut()
            try:
                upstream = socket.create_connection(self.upstream, timeout=5)
                upstream.settimeout(None)
            except OSError:
                _close(client)
                continue
            with self._lock:
                if self._listener is not srv:  # cut meanwhile
                    _close(client)
                    _close(upstream)
                    return
                self._conns.update((client, upstream))
                self.accepted += 1
            threading.Thread(target=self._pump, args=(client, upstream, client), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, client), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, client: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                if src is client:
                    with self._lock:
                        if self._marker is not None and self._marker in data:
                            self._marked.add(client)
                        elif client in self._marked and b"COMMIT" in data:
                            self._marked.clear()
                            self._marker = None
                            self._mute.add(client)
                elif client in self._mute:
                    with self._lock:
                        self._mute.discard(client)
                        self.replies_lost += 1
                    break  # the reply to COMMIT never reaches the client
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with self._lock:
                self._conns.discard(src)
                self._conns.discard(dst)
            _close(src)
            _close(dst)

    def url_for(self, database_url: str) -> str:
        """``database_url`` rewritten to go through this proxy."""
        return make_url(database_url).set(host="127.0.0.1", port=self.port).render_as_string(hide_password=False)

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _close(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        s.close()
    except OSError:
        pass


def proxy_for_url(database_url: str) -> TcpProxy:
    """A started proxy in front of the server named in ``database_url``."""
    url = make_url(database_url)
    return TcpProxy(url.host or "127.0.0.1", int(url.port or 5432)).start()
