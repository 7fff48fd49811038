"""One association we requested to a PACS, sending C-STOREs over a blocking socket.

pynetdicom's requestor runs a polling reactor thread per association and hands every PDU
through queues; on a worker it cost as much CPU as de-identifying the header, and its races
(a paused reactor taking a response off the queue, an unbounded send queue) needed
workarounds. Here the worker's own thread writes the command, streams the data set from the
file with ``sendfile`` in fragments the PACS accepts, and reads the response. pynetdicom
still encodes the A-ASSOCIATE-RQ and decodes the A-ASSOCIATE-AC/RJ.

Over DICOM TLS (destination ``tls = true``) the socket is wrapped right after the connect,
with the certificate and host name verified (:mod:`deid_router.tls`); ``sendfile`` cannot
hand file pages to a TLS session, so each fragment is read from the file and written
through it instead.

Failures are raised as :class:`AssociationFailure` carrying a fixed code that
:mod:`deid_router.forward.status` classifies; nothing here logs or raises a tag value.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from pynetdicom import pdu as pnd_pdu
from pynetdicom.presentation import build_context

from deid_router import wire
from deid_router.forward.status import reject_reason
from deid_router.scp.integrity import Malformed, read_meta
from deid_router.errors import TlsError
from deid_router.tls import ClientTls, client_tls, refusal_reason

if TYPE_CHECKING:
    from deid_router.config import DestinationConfig

MAX_RESPONSE_PDU_BYTES = 1024 * 1024
SEND_FRAGMENT_BYTES = 1024 * 1024  # per P-DATA-TF when the PACS sets no limit
READ_BUFFER_BYTES = 64 * 1024


class AssociationFailure(Exception):
    """The association could not be used: ``kind`` and ``detail`` are fixed codes."""

    def __init__(self, kind: str, detail: str = "") -> None:
        super().__init__(f"{kind}:{detail}" if detail else kind)
        self.kind = kind
        self.detail = detail


@dataclass(frozen=True)
class Timeouts:
    connect: float
    acse: float
    dimse: float
    network: float


class RequestedAssociation:
    """An established association; ``accepted[sop_class][transfer_syntax]`` is a context ID."""

    def __init__(self, sock: socket.socket, timeouts: Timeouts) -> None:
        self._sock = sock
        self._tls = isinstance(sock, ssl.SSLSocket)
        self._stream = wire.PduStream(sock, READ_BUFFER_BYTES)
        self._timeouts = timeouts
        self.accepted: dict[str, dict[str, int]] = {}
        self.peer_max_pdu = 0
        self.alive = False

    # -- opening ----------------------------------------------------------------------------

    @classmethod
    def open(
        cls, host: str, port: int, calling_aet: str, called_aet: str,
        pairs: list[tuple[str, str]], max_pdu: int, timeouts: Timeouts, tls: ClientTls | None = None,
    ) -> RequestedAssociation:
        """Connect (over TLS with ``tls``) and negotiate one presentation context per
        (SOP class, transfer syntax)."""
        try:
            sock = socket.create_connection((host, port), timeout=timeouts.connect)
            if tls is not None:
                sock = _wrap(sock, tls)
        except TimeoutError as exc:
            raise AssociationFailure("connect_timeout") from exc
        except ConnectionRefusedError as exc:
            raise AssociationFailure("connection_refused") from exc
        except OSError as exc:
            raise AssociationFailure("connect_failed") from exc
        assoc = cls(sock, timeouts)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(timeouts.acse)
            assoc._negotiate(calling_aet, called_aet, pairs, max_pdu)
        except BaseException:
            assoc._lost()
            raise
        return assoc

    def _negotiate(self, calling_aet: str, called_aet: str, pairs: list[tuple[str, str]], max_pdu: int) -> None:
        proposed: dict[int, tuple[str, str]] = {}
        contexts = []
        for index, (sop_class, syntax) in enumerate(pairs):
            context = build_context(sop_class, [syntax])
            context.context_id = 2 * index + 1
            proposed[2 * index + 1] = (sop_class, syntax)
            contexts.append(context)
        request = wire.associate_primitive(calling_aet, called_aet, max_pdu, [])
        request.presentation_context_definition_list = contexts
        rq_pdu = pnd_pdu.A_ASSOCIATE_RQ()
        rq_pdu.from_primitive(request)
        try:
            self._sock.sendall(rq_pdu.encode())
            pdu_type, body = self._stream.read_pdu(MAX_RESPONSE_PDU_BYTES)
        except TimeoutError as exc:
            raise AssociationFailure("acse_timeout") from exc
        except (OSError, EOFError, wire.ProtocolError) as exc:
            raise AssociationFailure("association_aborted") from exc
        raw = wire.PDU_HEADER.pack(pdu_type, len(body)) + body
        if pdu_type == wire.A_ASSOCIATE_RJ:
            rj = pnd_pdu.A_ASSOCIATE_RJ()
            rj.decode(raw)
            reply = rj.to_primitive()
            raise AssociationFailure(
                *reject_reason(int(reply.result or 1), int(reply.result_source or 0), int(reply.diagnostic or 0))
            )
        if pdu_type != wire.A_ASSOCIATE_AC:
            raise AssociationFailure("association_aborted")
        try:
            ac = pnd_pdu.A_ASSOCIATE_AC()
            ac.decode(raw)
            reply = ac.to_primitive()
            results = list(reply.presentation_context_definition_results_list)
            self.peer_max_pdu = int(reply.maximum_length_received or 0)
        except Exception as exc:  # an undecodable accept from a broken PACS
            raise AssociationFailure("invalid_response") from exc
        for result in results:
            context_id = int(result.context_id or 0)
            if result.result == 0x00 and context_id in proposed:
                sop_class, syntax = proposed[context_id]
                self.accepted.setdefault(sop_class, {})[syntax] = context_id
        self.alive = True
        if not self.accepted:
            # Accepted, but every presentation context refused: nothing can be sent.
            self.abort()
            raise AssociationFailure("sop_class_not_accepted")

    # -- C-STORE ----------------------------------------------------------------------------

    def store_file(self, context_id: int, message_id: int, sop_class: str, sop_instance: str, path: Path) -> int:
        """Send the data set of a Part 10 file as it is on disk; return the response status."""
        try:
            fh = open(path, "rb")
        except OSError as exc:
            raise AssociationFailure("file_read_failed", _errno(exc)) from exc
        with fh:
            try:
                size = os.fstat(fh.fileno()).st_size
                _syntax, offset = read_meta(fh, size)
            except (Malformed, ValueError) as exc:
                raise AssociationFailure("invalid_file") from exc
            except OSError as exc:
                raise AssociationFailure("file_read_failed", _errno(exc)) from exc
            self._send_command(context_id, message_id, sop_class, sop_instance)
            self._send_data_set(context_id, fh, offset, size - offset)
        return self._read_response(message_id)

    def store_bytes(self, context_id: int, message_id: int, sop_class: str, sop_instance: str, data: bytes) -> int:
        """Send an encoded data set held in memory; return the response status."""
        self._send_command(context_id, message_id, sop_class, sop_instance)
        self._send(wire.encode_p_data(context_id, data, False, self.peer_max_pdu))
        return self._read_response(message_id)

    def _send_command(self, context_id: int, message_id: int, sop_class: str, sop_instance: str) -> None:
        command = wire.encode_store_request(message_id, sop_class, sop_instance)
        self._send(wire.encode_p_data(context_id, command, True, self.peer_max_pdu))

    def _send_data_set(self, context_id: int, fh: BinaryIO, offset: int, length: int) -> None:
        limit = min(wire.fragment_limit(self.peer_max_pdu, SEND_FRAGMENT_BYTES), SEND_FRAGMENT_BYTES)
        self._sock.settimeout(self._timeouts.dimse)
        sent = 0
        while True:
            fragment = min(limit, length - sent)
            last = sent + fragment >= length
            header = wire.p_data_header(context_id, fragment, False, last)
            if self._tls:
                done = self._send_read(header, fh, offset + sent, fragment)
            else:
                self._send(header, more=fragment > 0)
                if fragment == 0:
                    return
                with self._sending():
                    done = self._sock.sendfile(fh, offset + sent, fragment)
            if done != fragment:
                self._lost()
                raise AssociationFailure("file_read_failed", "short_read")
            sent += fragment
            if last:
                return

    def _send_read(self, header: bytes, fh: BinaryIO, position: int, length: int) -> int:
        """One P-DATA-TF over TLS: header and fragment read from the file, in one write."""
        try:
            data = os.pread(fh.fileno(), length, position) if length else b""
        except OSError as exc:
            self._lost()
            raise AssociationFailure("file_read_failed", _errno(exc)) from exc
        self._send(header + data)
        return len(data)

    def _read_response(self, message_id: int) -> int:
        self._sock.settimeout(self._timeouts.dimse)
        command = bytearray()
        try:
            while True:
                pdu_type, body = self._stream.read_pdu(MAX_RESPONSE_PDU_BYTES)
                if pdu_type != wire.P_DATA_TF:
                    self._lost()
                    if pdu_type == wire.A_RELEASE_RQ:
                        self._send(wire.encode_release_rp())
                    raise AssociationFailure("association_aborted")
                pos = 0
                while pos < len(body):
                    if pos + wire.PDV_HEADER.size > len(body):
                        raise wire.ProtocolError("truncated presentation data value")
                    item_length, _context, control = wire.PDV_HEADER.unpack_from(body, pos)
                    if item_length < 2 or pos + 4 + item_length > len(body):
                        raise wire.ProtocolError("presentation data value length out of range")
                    if not control & wire.PDV_COMMAND:
                        raise wire.ProtocolError("data set in a C-STORE response")
                    command += body[pos + wire.PDV_HEADER.size : pos + 4 + item_length]
                    pos += 4 + item_length
                    if control & wire.PDV_LAST:
                        response = wire.decode_command(bytes(command))
                        if response.field != wire.C_STORE_RSP or response.status is None:
                            raise wire.ProtocolError("not a C-STORE response")
                        if response.message_id != message_id:
                            raise wire.ProtocolError("response to another message")
                        return response.status
        except TimeoutError as exc:
            self.abort()
            raise AssociationFailure("dimse_timeout") from exc
        except wire.ProtocolError as exc:
            self.abort()
            raise AssociationFailure("invalid_response") from exc
        except (OSError, EOFError) as exc:
            self._lost()
            raise AssociationFailure("association_aborted") from exc

    # -- bytes ------------------------------------------------------------------------------

    def _send(self, data: bytes, more: bool = False) -> None:
        with self._sending():
            if self._tls:
                self._sock.sendall(data)  # an SSLSocket takes no flags
            else:
                self._sock.sendall(data, socket.MSG_MORE if more else 0)

    @contextmanager
    def _sending(self) -> Iterator[None]:
        """A PACS that stops reading (timeout) or goes away ends the association."""
        try:
            yield
        except TimeoutError as exc:
            self._lost()
            raise AssociationFailure("dimse_timeout") from exc
        except OSError as exc:
            self._lost()
            raise AssociationFailure("association_aborted") from exc

    # -- idle and closing -------------------------------------------------------------------

    def peer_closed(self) -> bool:
        """While idle: has the PACS released, aborted or closed the association meanwhile?"""
        if not self.alive:
            return True
        try:
            readable, _, _ = select.select([self._sock], [], [], 0)
        except (OSError, ValueError):
            readable = [self._sock]
        if readable and self._tls and not self._application_data():
            return False  # TLS housekeeping (a TLS 1.3 session ticket), no DICOM
        if readable:  # a PACS sends nothing unasked: whatever it is, this association is over
            self.abort()
            return True
        return False

    def _application_data(self) -> bool:
        """Over TLS, a readable socket may carry only TLS records: read without blocking."""
        try:
            self._sock.setblocking(False)
            try:
                self._sock.recv(1)
            finally:
                self._sock.settimeout(self._timeouts.network)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return False
        except OSError:
            return True
        return True  # data or end of file: the association is over either way

    def release(self) -> None:
        """A-RELEASE-RQ, wait for the A-RELEASE-RP (ACSE timeout), close."""
        if self.alive:
            try:
                self._sock.settimeout(self._timeouts.acse)
                self._sock.sendall(wire.encode_release_rq())
                while True:
                    pdu_type = self._stream.read_pdu(MAX_RESPONSE_PDU_BYTES)[0]
                    if pdu_type == wire.A_RELEASE_RP or pdu_type == wire.A_ABORT:
                        break
                    if pdu_type == wire.A_RELEASE_RQ:
                        # release collision (PS3.8 9.2.3): as requestor we answer first, then
                        # wait for the acceptor's A-RELEASE-RP
                        self._sock.sendall(wire.encode_release_rp())
            except (OSError, EOFError, wire.ProtocolError):
                pass
        self._lost()

    def abort(self) -> None:
        if self.alive:
            try:
                self._sock.sendall(wire.encode_abort(wire.ABORT_SOURCE_USER, wire.REASON_NOT_SPECIFIED))
            except OSError:
                pass
        self._lost()

    def _lost(self) -> None:
        self.alive = False
        self._stream.close()


def tls_for(cfg: DestinationConfig) -> ClientTls | None:
    """The destination's TLS settings (None without ``tls = true``); files that became
    unusable since check-config fail like an unreachable PACS, naming no path."""
    try:
        return client_tls(cfg)
    except TlsError as exc:
        raise AssociationFailure("connect_failed", f"tls_{exc.key}_unusable") from exc


def _wrap(sock: socket.socket, tls: ClientTls) -> ssl.SSLSocket:
    """The TLS handshake within the connect timeout; a refused handshake is ``connect_failed``
    with a fixed code (``tls_certificate_expired``, ``tls_hostname_mismatch``, ...)."""
    try:
        return tls.context.wrap_socket(sock, server_hostname=tls.server_name)
    except ssl.SSLError as exc:
        sock.close()
        raise AssociationFailure("connect_failed", f"tls_{refusal_reason(exc)}") from exc
    except BaseException:
        sock.close()
        raise


def _errno(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, "unknown")
