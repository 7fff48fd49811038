"""The listener's acceptor at the byte level: what a broken or hostile peer gets, and that the
node keeps serving others. Well-behaved peers (dcmtk, pynetdicom, Orthanc) are the e2e tests."""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.uid import UID
from pynetdicom import AE
from pynetdicom import pdu as pnd_pdu
from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from deid_router import wire
from deid_router.scp.acceptor import Acceptor, AcceptorSettings
from deid_router.scp.receive import StoreRequest
from deid_router.store.holding import Holding

CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"


@pytest.fixture
def node(tmp_path: Path) -> Iterator[tuple[int, Holding, list[StoreRequest]]]:
    holding = Holding(tmp_path / "var", "test")
    holding.prepare()
    received: list[StoreRequest] = []

    def store(req: StoreRequest) -> int:
        req.raw.commit()
        received.append(req)
        return 0x0000

    acceptor = Acceptor(
        AcceptorSettings("DEID_ROUTER", (), max_associations=4, max_pdu_size=0,
                         network_timeout_seconds=10, dimse_timeout_seconds=10, artim_timeout_seconds=10),
        holding.new_raw_file, store, has_space=lambda: True,
    )
    port = acceptor.start("127.0.0.1", 0, reuse_port=False)
    yield port, holding, received
    acceptor.stop_accepting()
    acceptor.abort_all()


def _connect(port: int) -> wire.PduStream:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    return wire.PduStream(sock)


def _associate(port: int, contexts: list[tuple[str, str]], max_pdu: int = 0) -> wire.PduStream:
    request = A_ASSOCIATE()
    request.application_context_name = UID("1.2.840.10008.3.1.1.1")
    request.calling_ae_title = "MODALITY"
    request.called_ae_title = "DEID_ROUTER"
    cxs = []
    for index, (sop, ts) in enumerate(contexts):
        cx = build_context(sop, [ts])
        cx.context_id = 2 * index + 1
        cxs.append(cx)
    request.presentation_context_definition_list = cxs
    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = max_pdu
    request.user_information = [max_length]
    rq = pnd_pdu.A_ASSOCIATE_RQ()
    rq.from_primitive(request)
    stream = _connect(port)
    stream.sock.sendall(rq.encode())
    pdu_type, _body = stream.read_pdu(1 << 20)
    assert pdu_type == wire.A_ASSOCIATE_AC
    return stream


def _command(field: int, message_id: int, has_data_set: bool, sop_class: str = CT) -> bytes:
    uid = sop_class.encode() + (b"\0" if len(sop_class) % 2 else b"")
    body = b"".join(
        struct.pack("<HHL", 0, elem, len(value)) + value
        for elem, value in (
            (0x0002, uid),
            (0x0100, struct.pack("<H", field)),
            (0x0120 if field == wire.C_CANCEL_RQ else 0x0110, struct.pack("<H", message_id)),
            (0x0800, struct.pack("<H", 0x0001 if has_data_set else 0x0101)),
        )
    )
    return struct.pack("<HHLL", 0, 0, 4, len(body)) + body


def _abort_then_closed(stream: wire.PduStream) -> bool:
    pdu_type, _ = stream.read_pdu(1024)
    if pdu_type != wire.A_ABORT:
        return False
    with pytest.raises((EOFError, OSError)):
        stream.read_header()
    return True


def _echo_still_works(port: int) -> None:
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="DEID_ROUTER")
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()


def test_junk_instead_of_an_association_request_is_aborted_and_others_still_served(node: tuple) -> None:
    port, _holding, _received = node
    stream = _connect(port)
    stream.sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
    assert _abort_then_closed(stream)
    _echo_still_works(port)


def test_a_hostile_pdu_length_is_refused_without_reading_it(node: tuple) -> None:
    port, _holding, _received = node
    stream = _connect(port)
    stream.sock.sendall(wire.PDU_HEADER.pack(wire.A_ASSOCIATE_RQ, 0xFFFFFFF0) + b"\0" * 64)
    assert _abort_then_closed(stream)
    _echo_still_works(port)


def test_data_on_a_context_never_accepted_aborts_and_leaves_no_file(node: tuple) -> None:
    port, holding, received = node
    stream = _associate(port, [(CT, EXPLICIT_LE)])
    stream.sock.sendall(wire.encode_p_data(1, _command(wire.C_STORE_RQ, 1, True), True, 0))
    fragment = b"\x08\x00\x16\x00UI\x04\x001.2\0"
    stream.sock.sendall(wire.p_data_header(1, len(fragment), command=False, last=False) + fragment)
    stream.sock.sendall(wire.encode_p_data(3, b"\0" * 8, False, 0))  # context 3 was never proposed
    assert _abort_then_closed(stream)
    assert received == []
    assert [p for p in holding.raw_dir.rglob("*") if p.is_file()] == []


def test_an_unknown_request_is_answered_unrecognized_operation(node: tuple) -> None:
    port, _holding, _received = node
    stream = _associate(port, [(CT, EXPLICIT_LE)])
    stream.sock.sendall(wire.encode_p_data(1, _command(0x0020, 7, False), True, 0))  # a C-FIND-RQ
    pdu_type, body = stream.read_pdu(1 << 20)
    assert pdu_type == wire.P_DATA_TF
    response = wire.decode_command(body[wire.PDV_HEADER.size :])
    assert (response.field, response.message_id, response.status) == (0x8020, 7, wire.UNRECOGNIZED_OPERATION)


def test_a_cancel_gets_no_response_and_the_association_goes_on(node: tuple) -> None:
    port, _holding, _received = node
    stream = _associate(port, [(Verification, EXPLICIT_LE)])
    stream.sock.sendall(wire.encode_p_data(1, _command(wire.C_CANCEL_RQ, 4, False, Verification), True, 0))
    stream.sock.sendall(wire.encode_p_data(1, _command(wire.C_ECHO_RQ, 5, False, Verification), True, 0))
    pdu_type, body = stream.read_pdu(1 << 20)
    assert pdu_type == wire.P_DATA_TF
    response = wire.decode_command(body[wire.PDV_HEADER.size :])
    assert (response.field, response.message_id, response.status) == (0x8030, 5, 0x0000)


def test_responses_fit_the_requestors_maximum_pdu(node: tuple) -> None:
    port, _holding, _received = node
    stream = _associate(port, [(Verification, EXPLICIT_LE)], max_pdu=32)
    stream.sock.sendall(wire.encode_p_data(1, _command(wire.C_ECHO_RQ, 3, False, Verification), True, 0))
    command, pdus = b"", 0
    while True:
        pdu_type, body = stream.read_pdu(1 << 20)
        assert pdu_type == wire.P_DATA_TF and len(body) <= 32
        pdus += 1
        command += body[wire.PDV_HEADER.size :]
        if body[5] & wire.PDV_LAST:
            break
    assert pdus > 1
    response = wire.decode_command(command)
    assert (response.field, response.message_id, response.status) == (0x8030, 3, 0x0000)
