"""A small syslog collector for tests: RFC 5424 frames over UDP, or octet-counted over TCP."""

from __future__ import annotations

import re
import socket
import threading
from dataclasses import dataclass
from xml.etree import ElementTree as ET

_HEADER = re.compile(rb"^<(\d{1,3})>1 (\S+) (\S+) (\S+) (\S+) (\S+) (-|\[.*?\]) (.*)$", re.S)


@dataclass(frozen=True)
class SyslogMessage:
    priority: int
    timestamp: str
    hostname: str
    app_name: str
    procid: str
    msgid: str
    structured_data: str
    msg: bytes

    @property
    def facility(self) -> int:
        return self.priority // 8

    def xml(self) -> ET.Element:
        body = self.msg[3:] if self.msg.startswith(b"\xef\xbb\xbf") else self.msg
        return ET.fromstring(body)


def parse_rfc5424(frame: bytes) -> SyslogMessage:
    """Parse one RFC 5424 message; ValueError if it is not one."""
    m = _HEADER.match(frame)
    if m is None:
        raise ValueError(f"not an RFC 5424 message: {frame[:80]!r}")
    pri, ts, host, app, proc, msgid, sd, msg = m.groups()
    return SyslogMessage(int(pri), ts.decode(), host.decode(), app.decode(), proc.decode(), msgid.decode(), sd.decode(), msg)


class SyslogCollector:
    """Collects frames on 127.0.0.1 (``udp`` or ``tcp``) until stopped."""

    def __init__(self, transport: str = "tcp") -> None:
        self.transport = transport
        self.frames: list[bytes] = []
        self.arrived = threading.Condition()
        kind = socket.SOCK_DGRAM if transport == "udp" else socket.SOCK_STREAM
        self._sock = socket.socket(socket.AF_INET, kind)
        self._sock.bind(("127.0.0.1", 0))
        self.port = int(self._sock.getsockname()[1])
        if transport == "tcp":
            self._sock.listen(8)
        threading.Thread(target=self._serve, daemon=True).start()

    @property
    def url(self) -> str:
        return f"{self.transport}://127.0.0.1:{self.port}"

    def _add(self, frame: bytes) -> None:
        with self.arrived:
            self.frames.append(frame)
            self.arrived.notify_all()

    def _serve(self) -> None:
        while True:
            try:
                if self.transport == "udp":
                    data, _ = self._sock.recvfrom(65535)
                    self._add(data)
                else:
                    conn, _ = self._sock.accept()
                    threading.Thread(target=self._read_stream, args=(conn,), daemon=True).start()
            except OSError:
                return

    def _read_stream(self, conn: socket.socket) -> None:
        buf = b""
        with conn:
            while True:
                try:
                    chunk = conn.recv(65536)
                except OSError:
                    return
                if not chunk:
                    return
                buf += chunk
                while b" " in buf:  # octet counting: "LEN SP FRAME"
                    length, _, rest = buf.partition(b" ")
                    n = int(length)
                    if len(rest) < n:
                        break
                    self._add(rest[:n])
                    buf = rest[n:]

    def messages(self) -> list[SyslogMessage]:
        with self.arrived:
            return [parse_rfc5424(f) for f in self.frames]

    def wait_for(self, predicate, timeout: float = 30.0) -> list[SyslogMessage]:  # type: ignore[no-untyped-def]
        """Wait until ``predicate(messages)`` is true; return the messages."""
        with self.arrived:
            ok = self.arrived.wait_for(lambda: predicate([parse_rfc5424(f) for f in self.frames]), timeout)
        msgs = self.messages()
        assert ok, f"audit messages seen: {[m.xml().find('EventIdentification/EventID').get('originalText') for m in msgs]}"  # type: ignore[union-attr]
        return msgs

    def stop(self) -> None:
        self._sock.close()
