"""DICOM upper layer and DIMSE command bytes (PS3.8, PS3.7), for both ends of a C-STORE.

Only what the listener (an acceptor of C-STORE and C-ECHO) and the forwarder (a requestor of
C-STORE) need: PDU framing, P-DATA-TF encoding, the release and abort PDUs, and the command
sets of C-STORE/C-ECHO requests and responses (always implicit VR little endian, group 0000).
A-ASSOCIATE PDUs are decoded and encoded with pynetdicom's PDU classes by the callers
(:mod:`deid_router.scp.acceptor`, :mod:`deid_router.forward.association`), from the
primitive :func:`associate_primitive` starts for both.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass
from typing import Any, BinaryIO, cast

from pydicom.uid import UID
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
)

from deid_router.elements import UNDEFINED, Malformed, Window, elements

APPLICATION_CONTEXT_NAME = "1.2.840.10008.3.1.1.1"  # the DICOM application context (PS3.7 A.2.1)
# Sent in A-ASSOCIATE-RQ/AC and written into received files' meta, as before (pynetdicom's).
IMPLEMENTATION_CLASS_UID = str(PYNETDICOM_IMPLEMENTATION_UID)
IMPLEMENTATION_VERSION_NAME = str(PYNETDICOM_IMPLEMENTATION_VERSION)

# PDU types (PS3.8 9.3.1)
A_ASSOCIATE_RQ = 0x01
A_ASSOCIATE_AC = 0x02
A_ASSOCIATE_RJ = 0x03
P_DATA_TF = 0x04
A_RELEASE_RQ = 0x05
A_RELEASE_RP = 0x06
A_ABORT = 0x07

PDU_HEADER = struct.Struct(">BxL")  # type, reserved, length
PDV_HEADER = struct.Struct(">LBB")  # item length, presentation context ID, message control header
PDV_COMMAND = 0x01
PDV_LAST = 0x02

# A-ABORT sources and provider reasons (PS3.8 9.3.8)
ABORT_SOURCE_USER = 0x00
ABORT_SOURCE_PROVIDER = 0x02
REASON_NOT_SPECIFIED = 0x00
REASON_UNRECOGNIZED_PDU = 0x01
REASON_UNEXPECTED_PDU = 0x02
REASON_INVALID_PARAMETER = 0x06

# DIMSE command fields (PS3.7 E.1)
C_STORE_RQ = 0x0001
C_STORE_RSP = 0x8001
C_ECHO_RQ = 0x0030
C_CANCEL_RQ = 0x0FFF  # answered by the operation it cancels, never by itself
RESPONSE_BIT = 0x8000
NO_DATA_SET = 0x0101
UNRECOGNIZED_OPERATION = 0x0211

MAX_COMMAND_BYTES = 64 * 1024  # a command set is a few hundred bytes; more is hostile


class ProtocolError(Exception):
    """The peer broke the protocol: the association is aborted with ``reason``."""

    def __init__(self, message: str, reason: int = REASON_INVALID_PARAMETER) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Command:
    """The parts of a DIMSE command set either end acts on."""

    field: int
    message_id: int  # Message ID of a request, Message ID Being Responded To of a response or cancel
    has_data_set: bool
    sop_class_uid: bytes  # as sent, padding included: echoed in the response
    sop_instance_uid: bytes
    status: int | None = None  # responses only

    @staticmethod
    def text(value: bytes) -> str:
        return value.decode("latin-1").rstrip("\0 ")


def decode_command(data: bytes) -> Command:
    """Parse a command set; :class:`ProtocolError` for anything malformed."""
    values: dict[int, bytes] = {}
    try:
        for _pos, tag, _vr, length, value, end in elements(Window.of_bytes(data), 0, len(data), implicit=True):
            if tag >> 16 != 0x0000 or length == UNDEFINED:
                raise ProtocolError("malformed command set")
            values[tag & 0xFFFF] = data[value:end]
    except Malformed as exc:
        raise ProtocolError(f"malformed command set ({exc})") from exc

    def us(elem: int) -> int:
        value = values.get(elem)
        if value is None or len(value) != 2:
            raise ProtocolError(f"command element (0000,{elem:04X}) missing or not US")
        return int.from_bytes(value, "little")

    field = us(0x0100)
    response = bool(field & RESPONSE_BIT)
    return Command(
        field=field,
        message_id=us(0x0120 if response or field == C_CANCEL_RQ else 0x0110),
        has_data_set=us(0x0800) != NO_DATA_SET,
        sop_class_uid=values.get(0x0002, b""),
        sop_instance_uid=values.get(0x1000, b""),
        status=us(0x0900) if response else None,
    )


def _element(elem: int, value: bytes) -> bytes:
    return struct.pack("<HHL", 0x0000, elem, len(value)) + value


def _uid(value: bytes) -> bytes:
    value = value[:64]
    return value + b"\0" if len(value) % 2 else value


def encode_response(request: Command, status: int) -> bytes:
    """The response command set (no data set) to ``request`` with ``status``."""
    body = b"".join((
        _element(0x0002, _uid(request.sop_class_uid)) if request.sop_class_uid else b"",
        _element(0x0100, struct.pack("<H", request.field | RESPONSE_BIT)),
        _element(0x0120, struct.pack("<H", request.message_id)),
        _element(0x0800, struct.pack("<H", NO_DATA_SET)),
        _element(0x0900, struct.pack("<H", status)),
        _element(0x1000, _uid(request.sop_instance_uid)) if request.sop_instance_uid else b"",
    ))
    return _element(0x0000, struct.pack("<L", len(body))) + body


def encode_store_request(message_id: int, sop_class_uid: str, sop_instance_uid: str) -> bytes:
    """A C-STORE-RQ command set (medium priority, a data set follows)."""
    body = b"".join((
        _element(0x0002, _uid(sop_class_uid.encode("ascii", "replace"))),
        _element(0x0100, struct.pack("<H", C_STORE_RQ)),
        _element(0x0110, struct.pack("<H", message_id)),
        _element(0x0700, struct.pack("<H", 0x0000)),
        _element(0x0800, struct.pack("<H", 0x0001)),
        _element(0x1000, _uid(sop_instance_uid.encode("ascii", "replace"))),
    ))
    return _element(0x0000, struct.pack("<L", len(body))) + body


def p_data_header(context_id: int, fragment_length: int, command: bool, last: bool) -> bytes:
    """PDU and PDV headers of a P-DATA-TF carrying one fragment of ``fragment_length`` bytes."""
    control = (PDV_COMMAND if command else 0) | (PDV_LAST if last else 0)
    return PDU_HEADER.pack(P_DATA_TF, fragment_length + PDV_HEADER.size) + PDV_HEADER.pack(
        fragment_length + 2, context_id, control
    )


def encode_p_data(context_id: int, payload: bytes, command: bool, peer_max_pdu: int) -> bytes:
    """P-DATA-TF PDUs carrying ``payload`` as one message part, fragmented for the peer.

    ``peer_max_pdu`` is the peer's Maximum Length Received: the largest variable field of a
    P-DATA-TF it accepts, 0 for no limit.
    """
    limit = fragment_limit(peer_max_pdu, max(1, len(payload)))
    pdus = []
    for start in range(0, max(1, len(payload)), limit):
        fragment = payload[start : start + limit]
        pdus.append(p_data_header(context_id, len(fragment), command, start + limit >= len(payload)) + fragment)
    return b"".join(pdus)


def fragment_limit(peer_max_pdu: int, unlimited: int) -> int:
    """Largest fragment one P-DATA-TF may carry for a peer (``unlimited`` when it set no limit)."""
    return max(1, peer_max_pdu - PDV_HEADER.size) if peer_max_pdu else unlimited


def encode_release_rq() -> bytes:
    return PDU_HEADER.pack(A_RELEASE_RQ, 4) + b"\0\0\0\0"


def encode_release_rp() -> bytes:
    return PDU_HEADER.pack(A_RELEASE_RP, 4) + b"\0\0\0\0"


def encode_abort(source: int, reason: int) -> bytes:
    return PDU_HEADER.pack(A_ABORT, 4) + bytes((0, 0, source, reason))


def associate_primitive(calling_aet: str, called_aet: str, max_pdu: int, items: list[Any]) -> A_ASSOCIATE:
    """An A-ASSOCIATE (request or accept) with our user information: the Maximum Length
    we receive (0: unlimited), our implementation class and version, then ``items``."""
    primitive = A_ASSOCIATE()
    primitive.application_context_name = UID(APPLICATION_CONTEXT_NAME)
    primitive.calling_ae_title = calling_aet
    primitive.called_ae_title = called_aet
    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = max_pdu
    implementation = ImplementationClassUIDNotification()
    implementation.implementation_class_uid = UID(IMPLEMENTATION_CLASS_UID)
    version = ImplementationVersionNameNotification()
    version.implementation_version_name = IMPLEMENTATION_VERSION_NAME
    primitive.user_information = [max_length, implementation, version, *items]
    return primitive


class PduStream:
    """A connected socket, read through a buffer as PDUs; closing it closes the socket."""

    def __init__(self, sock: socket.socket, buffer_bytes: int = 64 * 1024) -> None:
        self.sock = sock
        self._rfile = cast(BinaryIO, sock.makefile("rb", buffering=buffer_bytes))

    def read_exact(self, size: int) -> bytes:
        data = self._rfile.read(size)
        if len(data) != size:
            raise EOFError("connection closed")
        return data

    def readinto(self, view: memoryview) -> int:
        """Read up to ``len(view)`` bytes (at least one); EOFError when the peer closed."""
        got = self._rfile.readinto(view)  # type: ignore[attr-defined]
        if not got:
            raise EOFError("connection closed")
        return int(got)

    def read_header(self) -> tuple[int, int]:
        """(PDU type, length of the PDU's body)."""
        pdu_type, length = PDU_HEADER.unpack(self.read_exact(PDU_HEADER.size))
        return int(pdu_type), int(length)

    def read_body(self, length: int, limit: int) -> bytes:
        if length > limit:
            raise ProtocolError("PDU length out of range")
        return self.read_exact(length)

    def read_pdu(self, limit: int) -> tuple[int, bytes]:
        pdu_type, length = self.read_header()
        return pdu_type, self.read_body(length, limit)

    def close(self) -> None:
        for closeable in (self._rfile, self.sock):
            try:
                closeable.close()
            except OSError:
                pass
