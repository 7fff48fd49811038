"""The listener's DICOM acceptor: one thread per association, reading a blocking socket.

Connections reach it through the front door (:mod:`deid_router.scp.frontdoor`): allowed
hosts, TLS handshake and the whole A-ASSOCIATE-RQ within the ARTIM timeout, on one selector
thread. An :class:`Association` starts only with a complete request in hand, over a plain or
a TLS socket alike (both are read through :class:`deid_router.wire.PduStream`).

pynetdicom's acceptor passes every PDU through a polling reactor thread, its state machine
and a queue to a second thread: 3 to 6 ms of CPU per CT instance, more than all of our own
work before the acknowledgement. Here the association's thread reads the socket itself and
streams each data set fragment straight into its receive file, so receiving costs little
more than the copy. pynetdicom still decodes the A-ASSOCIATE-RQ, negotiates the presentation
contexts (its unrestricted storage negotiation) and encodes the A-ASSOCIATE-AC/RJ.
"""

from __future__ import annotations

import os
import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

from pynetdicom import pdu as pnd_pdu
from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification, SCP_SCU_RoleSelectionNegotiation
from pynetdicom import DEFAULT_TRANSFER_SYNTAXES
from pynetdicom.presentation import build_context, negotiate_unrestricted

from deid_router.observability.logging import get_logger
from deid_router import wire
from deid_router.errors import ListenerError
from deid_router.scp import commitment as sc
from deid_router.scp import statuses
from deid_router.scp.frontdoor import FrontDoor, FrontDoorSettings, Refusals
from deid_router.scp.receive import StoreRequest, create_file_meta
from deid_router.store.holding import RawFile

log = get_logger("scp")

VERIFICATION = "1.2.840.10008.1.1"
MAX_ASSOCIATE_RQ_BYTES = 1024 * 1024  # a request with hundreds of contexts is ~50 KB
MAX_CONTROL_PDU_BYTES = 1024
READ_BUFFER_BYTES = 64 * 1024
STREAM_CHUNK_BYTES = 1024 * 1024
REJECT_LINGER_SECONDS = 2.0


@dataclass(frozen=True)
class Rejection:
    """A-ASSOCIATE-RJ result, source and reason/diagnostic (PS3.8 9.3.4)."""

    result: int
    source: int
    diagnostic: int
    why: str


CALLING_AE_NOT_RECOGNIZED = Rejection(0x01, 0x01, 0x03, "calling_aet_not_allowed")
CALLED_AE_NOT_RECOGNIZED = Rejection(0x01, 0x01, 0x07, "called_aet_not_recognized")
LOCAL_LIMIT_EXCEEDED = Rejection(0x02, 0x03, 0x02, "local_limit_exceeded")


@dataclass(frozen=True)
class AcceptorSettings:
    ae_title: str
    allowed_calling_aets: tuple[str, ...]  # empty: any
    max_associations: int
    max_pdu_size: int  # advertised Maximum Length Received; 0: unlimited
    network_timeout_seconds: float  # idle between messages
    dimse_timeout_seconds: float  # silence within a message
    artim_timeout_seconds: float = 10.0  # from connection to the whole A-ASSOCIATE-RQ (and TLS handshake)
    allowed_hosts: tuple[str, ...] = ()  # CIDRs; empty: any
    max_pending_connections: int = 256  # connections without a complete A-ASSOCIATE-RQ yet
    max_pending_per_host: int = 32


StoreHandler = Callable[[StoreRequest], int]


# Only non-storage abstract syntaxes are negotiated against this list: every storage-like one
# (a storage SOP class, a private or an unknown UID) is accepted with the first transfer syntax
# the modality proposes, pynetdicom's unrestricted storage negotiation.
SUPPORTED_CONTEXTS = [build_context(VERIFICATION, DEFAULT_TRANSFER_SYNTAXES)]
# With storage commitment on, its SOP class too (pynetdicom knows it: never "storage-like").
COMMITMENT_CONTEXTS = [build_context(sc.STORAGE_COMMITMENT_PUSH, DEFAULT_TRANSFER_SYNTAXES)]


class Association:
    """One accepted connection, from A-ASSOCIATE-RQ to release or abort."""

    def __init__(self, sock: socket.socket, acceptor: Acceptor, request: bytes, peer: str = "") -> None:
        self.sock = sock
        self.acceptor = acceptor
        self.settings = acceptor.settings
        self.request = request  # the complete A-ASSOCIATE-RQ PDU the front door read
        self.peer = peer
        self.tls = isinstance(sock, ssl.SSLSocket)
        self.established = False
        self.calling_aet = ""
        self.called_aet = ""
        self._stream = wire.PduStream(sock, READ_BUFFER_BYTES)
        self._send_lock = threading.Lock()
        self._contexts: dict[int, str] = {}  # accepted context ID -> transfer syntax
        self._abstract: dict[int, str] = {}  # accepted context ID -> abstract syntax
        self._action: tuple[int, bytes, bytearray] | None = None  # N-ACTION-RQ awaiting its data set
        self._message_id = 0  # of the requests we send (N-EVENT-REPORT)
        self.open = True
        self._peer_max_pdu = 0
        self._command = bytearray()
        self._storing: tuple[int, wire.Command] | None = None  # context and C-STORE-RQ awaiting data
        self._file: RawFile | None = None
        self._chunk = memoryview(bytearray(STREAM_CHUNK_BYTES))

    # -- life cycle -------------------------------------------------------------------------

    def run(self) -> None:
        try:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.sock.settimeout(self.settings.network_timeout_seconds)
            if self._negotiate():
                if self._serve():
                    self._await_close()
        except wire.ProtocolError as exc:
            log.warning("association_aborted", reason=str(exc), calling_aet=self.calling_aet)
            self._send(wire.encode_abort(wire.ABORT_SOURCE_PROVIDER, exc.reason))
            self._await_close()
        except TimeoutError:
            log.warning("association_timed_out", calling_aet=self.calling_aet, established=self.established)
            self._send(wire.encode_abort(wire.ABORT_SOURCE_PROVIDER, wire.REASON_NOT_SPECIFIED))
            self._await_close()
        except (OSError, EOFError):
            pass  # the peer went away, or shutdown aborted us
        finally:
            self.open = False
            self._drop_partial()
            self._stream.close()

    def abort(self) -> None:
        """Abort from another thread (node shutdown): the peer keeps what was not acknowledged.

        Over TLS the A-ABORT is not sent: this thread must not write the TLS session while the
        association's own thread reads it; the peer sees the connection closed (an abort too).
        """
        if not self.tls:
            self._send(wire.encode_abort(wire.ABORT_SOURCE_USER, wire.REASON_NOT_SPECIFIED))
        try:
            # the plain socket's shutdown: wakes this association's blocked read (TLS or not)
            socket.socket.shutdown(self.sock, socket.SHUT_RDWR)
        except OSError:
            pass

    def _drop_partial(self) -> None:
        """Remove the receive file of a C-STORE the peer never finished."""
        if self._file is not None:
            self._file.discard()
            self._file = None
            log.info("instance_transfer_cut", calling_aet=self.calling_aet)

    # -- bytes ------------------------------------------------------------------------------

    def _send(self, data: bytes) -> None:
        with self._send_lock:
            try:
                self.sock.sendall(data)
            except OSError:
                pass

    # -- association negotiation (pynetdicom's PDU classes and negotiation) -----------------

    def _negotiate(self) -> bool:
        try:
            rq_pdu = pnd_pdu.A_ASSOCIATE_RQ()
            rq_pdu.decode(self.request)
            request = rq_pdu.to_primitive()
            self.calling_aet = str(request.calling_ae_title).strip()
            self.called_aet = str(request.called_ae_title).strip()
            contexts = list(request.presentation_context_definition_list)
        except Exception as exc:  # pynetdicom raises many things on a hostile request
            raise wire.ProtocolError(f"undecodable A-ASSOCIATE-RQ ({type(exc).__name__})") from exc

        rejection = self.acceptor.admit(self)
        if rejection is not None:
            self._reject(request, rejection)
            return False

        user_info = list(request.user_information)
        rq_roles = {
            item.sop_class_uid: (item.scu_role, item.scp_role)
            for item in user_info
            if isinstance(item, SCP_SCU_RoleSelectionNegotiation) and item.sop_class_uid is not None
        }
        results, roles = negotiate_unrestricted(contexts, self.acceptor.supported_contexts, rq_roles)
        self._contexts = {cast(int, cx.context_id): str(cx.transfer_syntax[0]) for cx in results if cx.result == 0}
        self._abstract = {cast(int, cx.context_id): str(cx.abstract_syntax) for cx in results if cx.result == 0}
        self._peer_max_pdu = next(
            (int(i.maximum_length_received or 0) for i in user_info if isinstance(i, MaximumLengthNotification)), 0
        )

        accept = wire.associate_primitive(
            request.calling_ae_title, request.called_ae_title, self.settings.max_pdu_size, list(roles)
        )
        accept.result = 0x00
        accept.result_source = 0x01
        accept.presentation_context_definition_results_list = results
        ac_pdu = pnd_pdu.A_ASSOCIATE_AC()
        ac_pdu.from_primitive(accept)
        self._send(ac_pdu.encode())
        self.established = True
        return True

    def _peer_host(self) -> str:
        try:
            return str(self.sock.getpeername()[0])
        except (OSError, IndexError):
            return ""

    def _reject(self, request: A_ASSOCIATE, rejection: Rejection) -> None:
        primitive = A_ASSOCIATE()
        primitive.result = rejection.result
        primitive.result_source = rejection.source
        primitive.diagnostic = rejection.diagnostic
        rj_pdu = pnd_pdu.A_ASSOCIATE_RJ()
        rj_pdu.from_primitive(primitive)
        log.warning("association_rejected", reason=rejection.why, calling_aet=self.calling_aet, peer=self.peer)
        # counted (and audited) before the peer can see the reject
        self.acceptor.refusals.count(rejection.why, self.peer or self._peer_host(), self.calling_aet)
        self._send(rj_pdu.encode())
        # The requestor closes the connection on A-ASSOCIATE-RJ; wait a moment for it so the
        # reject is not lost to a reset.
        try:
            self.sock.shutdown(socket.SHUT_WR)
            self.sock.settimeout(REJECT_LINGER_SECONDS)
            while self.sock.recv(4096):
                pass
        except OSError:
            pass

    # -- data phase -------------------------------------------------------------------------

    def _await_close(self) -> None:
        """After A-RELEASE-RP or an A-ABORT we sent, the requestor closes the connection (PS3.8
        Sta13): wait for that, bounded by ARTIM, so our close cannot cut off what we sent."""
        self.established = False  # no transfer any more: a clean stop need not wait for it
        try:
            self.sock.settimeout(self.settings.artim_timeout_seconds)
            while self.sock.recv(4096):
                pass
        except (OSError, ValueError):
            pass

    def _serve(self) -> bool:
        """The data phase; True when it ended with our A-RELEASE-RP (the peer closes next)."""
        limit = self.settings.max_pdu_size
        while True:
            pdu_type, length = self._stream.read_header()
            if pdu_type == wire.P_DATA_TF:
                if limit and length > limit:
                    # larger than the Maximum Length we advertised (PS3.8 9.3.1, AA-8)
                    raise wire.ProtocolError("P-DATA-TF longer than our maximum length", wire.REASON_INVALID_PARAMETER)
                self._read_p_data(length)
            elif pdu_type == wire.A_RELEASE_RQ:
                self._stream.read_body(length, MAX_CONTROL_PDU_BYTES)
                self._drop_partial()
                self._send(wire.encode_release_rp())
                return True
            elif pdu_type == wire.A_ABORT:
                self._stream.read_body(length, MAX_CONTROL_PDU_BYTES)
                return False
            elif pdu_type in (wire.A_ASSOCIATE_RQ, wire.A_ASSOCIATE_AC, wire.A_ASSOCIATE_RJ, wire.A_RELEASE_RP):
                raise wire.ProtocolError("unexpected PDU", wire.REASON_UNEXPECTED_PDU)
            else:
                raise wire.ProtocolError("unrecognized PDU", wire.REASON_UNRECOGNIZED_PDU)

    def _read_p_data(self, length: int) -> None:
        remaining = length
        while remaining:
            if remaining < wire.PDV_HEADER.size:
                raise wire.ProtocolError("truncated presentation data value")
            item_length, context_id, control = wire.PDV_HEADER.unpack(self._stream.read_exact(wire.PDV_HEADER.size))
            if item_length < 2 or item_length + 4 > remaining:
                raise wire.ProtocolError("presentation data value length out of range")
            remaining -= item_length + 4
            if context_id not in self._contexts:
                raise wire.ProtocolError("presentation context not accepted")
            size = item_length - 2
            if control & wire.PDV_COMMAND:
                self._read_command_fragment(context_id, size, last=bool(control & wire.PDV_LAST))
            else:
                self._read_data_fragment(context_id, size, last=bool(control & wire.PDV_LAST))

    def _read_command_fragment(self, context_id: int, size: int, last: bool) -> None:
        if self._storing is not None or self._action is not None:
            raise wire.ProtocolError("command fragment inside a data set")
        if len(self._command) + size > wire.MAX_COMMAND_BYTES:
            raise wire.ProtocolError("command set too large")
        self._command += self._stream.read_exact(size)
        if not last:
            return
        raw_command = bytes(self._command)
        command = wire.decode_command(raw_command)
        self._command.clear()
        if command.field & wire.RESPONSE_BIT:
            pass  # the modality's N-EVENT-REPORT-RSP to our storage commitment report
        elif command.field == sc.N_ACTION_RQ and command.has_data_set:
            if self._abstract.get(context_id) != sc.STORAGE_COMMITMENT_PUSH or self.acceptor.commitment is None:
                raise wire.ProtocolError("N-ACTION outside a storage commitment context")
            self._action = (context_id, raw_command, bytearray())
            self.sock.settimeout(self.settings.dimse_timeout_seconds)
        elif command.field == wire.C_ECHO_RQ and not command.has_data_set:
            self._respond(context_id, command, statuses.SUCCESS)
        elif command.field == wire.C_STORE_RQ and command.has_data_set:
            self._storing = (context_id, command)
            self.sock.settimeout(self.settings.dimse_timeout_seconds)
            self._file = self.acceptor.new_raw_file(
                create_file_meta(
                    sop_class_uid=command.text(command.sop_class_uid),
                    sop_instance_uid=command.text(command.sop_instance_uid),
                    transfer_syntax=self._contexts[context_id],
                ),
            )
        elif command.has_data_set:
            raise wire.ProtocolError("unsupported request with a data set")
        elif command.field == wire.C_CANCEL_RQ:
            pass  # nothing here runs long enough to be cancelled
        else:
            status = statuses.CANNOT_UNDERSTAND if command.field == wire.C_STORE_RQ else wire.UNRECOGNIZED_OPERATION
            self._respond(context_id, command, status)

    def _read_data_fragment(self, context_id: int, size: int, last: bool) -> None:
        if self._action is not None:
            self._read_action_fragment(context_id, size, last)
            return
        if self._storing is None or self._storing[0] != context_id or self._file is None:
            raise wire.ProtocolError("data set fragment without its command")
        receive_file, chunk = self._file, self._chunk
        while size:
            got = self._stream.readinto(chunk[: min(size, len(chunk))])
            receive_file.write(chunk[:got])
            size -= got
        if last:
            self._store()

    def _store(self) -> None:
        assert self._storing is not None and self._file is not None
        (context_id, command), receive_file = self._storing, self._file
        self._storing, self._file = None, None
        if receive_file.failed:
            log.error("instance_refused_write_failed", calling_aet=self.calling_aet)
            status = statuses.OUT_OF_RESOURCES
        else:
            status = self.acceptor.store(
                StoreRequest(
                    raw=receive_file,
                    command_sop_class_uid=command.text(command.sop_class_uid),
                    command_sop_instance_uid=command.text(command.sop_instance_uid),
                    transfer_syntax=self._contexts[context_id],
                    calling_aet=self.calling_aet,
                    called_aet=self.called_aet,
                )
            )
        receive_file.discard()  # kept when the intake committed it
        self._respond(context_id, command, status)
        self.sock.settimeout(self.settings.network_timeout_seconds)

    # -- storage commitment ---------------------------------------------------------------

    def _read_action_fragment(self, context_id: int, size: int, last: bool) -> None:
        assert self._action is not None
        action_context, raw_command, data = self._action
        if context_id != action_context:
            raise wire.ProtocolError("data set fragment without its command")
        if len(data) + size > sc.MAX_ACTION_BYTES:
            raise wire.ProtocolError("storage commitment request too large")
        data += self._stream.read_exact(size)
        if not last:
            return
        self._action = None
        self.sock.settimeout(self.settings.network_timeout_seconds)
        commitment = self.acceptor.commitment
        assert commitment is not None
        try:
            message_id, request = sc.parse_action(raw_command, bytes(data), self._contexts[context_id], self.calling_aet)
        except sc.ActionRejected as exc:
            log.warning("commitment_request_refused", reason=str(exc), status=exc.status, calling_aet=self.calling_aet)
            message_id = wire.decode_command(raw_command).message_id
            self._send(wire.encode_p_data(context_id, sc.encode_action_response(message_id, exc.status), True, self._peer_max_pdu))
            return
        self._send(wire.encode_p_data(context_id, sc.encode_action_response(message_id, sc.SUCCESS), True, self._peer_max_pdu))
        log.info("commitment_requested", instances=len(request.items), calling_aet=self.calling_aet)
        commitment.submit(request, lambda result: self._report(context_id, result))

    def _report(self, context_id: int, result: sc.CommitmentResult) -> bool:
        """Send the N-EVENT-REPORT on this association; False once it is gone.

        Also False over TLS: this runs on the commitment thread while the association's own
        thread is blocked reading, and one TLS session must never be read and written from two
        threads at once (OpenSSL forbids it; CPython can crash). The report then goes on a new
        association to the configured peer.
        """
        if not self.open or self.tls:
            return False
        with self._send_lock:
            self._message_id += 1
            message_id = self._message_id
        command, data = sc.encode_event_report(message_id, result, self._contexts[context_id])
        self._send(
            wire.encode_p_data(context_id, command, True, self._peer_max_pdu)
            + wire.encode_p_data(context_id, data, False, self._peer_max_pdu)
        )
        return self.open

    def _respond(self, context_id: int, command: wire.Command, status: int) -> None:
        self._send(wire.encode_p_data(context_id, wire.encode_response(command, status), True, self._peer_max_pdu))


LISTEN_BACKLOG = 512


def _bind(host: str, port: int, reuse_port: bool) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=LISTEN_BACKLOG, reuse_port=reuse_port)
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else type(exc).__name__
        raise ListenerError(f"cannot listen on {host}:{port}: {reason.lower()}") from exc


class Acceptor:
    """Listens on a plain and/or a TLS port and runs one :class:`Association` per complete
    A-ASSOCIATE-RQ the front door hands over."""

    def __init__(
        self,
        settings: AcceptorSettings,
        new_raw_file: Callable[[bytes], RawFile],
        store: StoreHandler,
        has_space: Callable[[], bool],
        commitment: sc.Commitment | None = None,
        on_refused: Callable[[str, str, str], None] | None = None,
    ) -> None:
        self.settings = settings
        self.new_raw_file = new_raw_file
        self.store_handler = store
        self.has_space = has_space
        self.commitment = commitment
        self.on_refused = on_refused  # (reason code, calling AE title, peer address): the audit trail
        self.supported_contexts = SUPPORTED_CONTEXTS + (COMMITMENT_CONTEXTS if commitment is not None else [])
        self._associations: set[Association] = set()
        self._lock = threading.Lock()
        self.refusals = Refusals(on_refused)
        self._tls_context: ssl.SSLContext | None = None
        self._front: FrontDoor | None = None

    def _front_door(self) -> FrontDoor:
        if self._front is None:
            s = self.settings
            self._front = FrontDoor(
                FrontDoorSettings(
                    allowed_hosts=s.allowed_hosts,
                    artim_timeout_seconds=s.artim_timeout_seconds,
                    max_pending=s.max_pending_connections,
                    max_pending_per_host=s.max_pending_per_host,
                    max_request_bytes=MAX_ASSOCIATE_RQ_BYTES,
                ),
                self._hand_off,
                self.refusals,
            )
            self._front.start()
        return self._front

    def start(self, host: str, port: int, reuse_port: bool) -> int:
        """Listen for plain DICOM on ``port``; return the bound port."""
        sock = _bind(host, port, reuse_port)
        self._front_door().add_listener(sock, None)
        return int(sock.getsockname()[1])

    def start_tls(self, host: str, port: int, reuse_port: bool, context: ssl.SSLContext) -> int:
        """Listen for DICOM over TLS on ``port`` with ``context``; return the bound port."""
        self._tls_context = context
        sock = _bind(host, port, reuse_port)
        self._front_door().add_listener(sock, self.tls_context)
        return int(sock.getsockname()[1])

    def tls_context(self) -> ssl.SSLContext:
        assert self._tls_context is not None
        return self._tls_context

    def set_tls_context(self, context: ssl.SSLContext) -> None:
        """New certificates for new connections; established associations keep their session."""
        self._tls_context = context

    def pending(self) -> int:
        """Connections that have not completed their A-ASSOCIATE-RQ (and TLS handshake) yet."""
        return self._front.pending() if self._front is not None else 0

    def _hand_off(self, sock: socket.socket, request: bytes, peer: str) -> None:
        threading.Thread(
            target=self.serve_connection, args=(sock, request, peer), name="dicom-association", daemon=True
        ).start()

    def serve_connection(self, sock: socket.socket, request: bytes, peer: str = "") -> None:
        association = Association(sock, self, request, peer)
        with self._lock:
            self._associations.add(association)
        try:
            association.run()
        finally:
            with self._lock:
                self._associations.discard(association)

    def admit(self, association: Association) -> Rejection | None:
        """The reason to refuse this association, if any (AE titles, limits, disk reserve)."""
        allowed = self.settings.allowed_calling_aets
        if allowed and association.calling_aet not in allowed:
            return CALLING_AE_NOT_RECOGNIZED
        if association.called_aet != self.settings.ae_title.strip():
            return CALLED_AE_NOT_RECOGNIZED
        with self._lock:
            others = len(self._associations) - 1
        if others >= self.settings.max_associations:
            return LOCAL_LIMIT_EXCEEDED
        if not self.has_space():
            # The modality keeps its images and tries again later instead of filling our disk.
            log.warning("association_refused_low_disk")
            return LOCAL_LIMIT_EXCEEDED
        return None

    def store(self, request: StoreRequest) -> int:
        try:
            return self.store_handler(request)
        except Exception as exc:  # never answer success, never kill the association thread
            log.error("instance_store_handler_failed", error=type(exc).__name__, calling_aet=request.calling_aet)
            return statuses.OUT_OF_RESOURCES

    def established(self) -> int:
        with self._lock:
            return sum(1 for a in self._associations if a.established)

    def stop_accepting(self) -> None:
        """Close the listening sockets and the connections still negotiating."""
        if self._front is not None:
            self._front.stop()
            self._front = None

    def abort_all(self) -> None:
        with self._lock:
            associations = list(self._associations)
        for association in associations:
            association.abort()
