"""PS3.8 corners at the byte level: our advertised Maximum Length is enforced on receive, and
after A-RELEASE-RP the acceptor waits for the requestor to close (ARTIM) instead of closing
first; on the requestor side a release collision is answered and the release completes."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from deid_router import wire
from deid_router.forward.association import RequestedAssociation, Timeouts
from deid_router.scp.acceptor import Acceptor, AcceptorSettings
from deid_router.scp.receive import StoreRequest
from deid_router.store.holding import Holding
from tests.unit.scp.test_acceptor_wire import CT, EXPLICIT_LE, _associate, _command

VERIFICATION = "1.2.840.10008.1.1"

MAX_PDU = 16384


def _acceptor(tmp_path: Path, max_pdu: int, artim: float = 10) -> tuple[Acceptor, int]:
    holding = Holding(tmp_path / "var", "test")
    holding.prepare()

    def store(req: StoreRequest) -> int:
        req.raw.commit()
        return 0x0000

    acceptor = Acceptor(
        AcceptorSettings("DEID_ROUTER", (), max_associations=4, max_pdu_size=max_pdu,
                         network_timeout_seconds=10, dimse_timeout_seconds=10, artim_timeout_seconds=artim),
        holding.new_raw_file, store, has_space=lambda: True,
    )
    return acceptor, acceptor.start("127.0.0.1", 0, reuse_port=False)


@pytest.fixture
def limited(tmp_path: Path) -> Iterator[int]:
    acceptor, port = _acceptor(tmp_path, MAX_PDU)
    yield port
    acceptor.stop_accepting()
    acceptor.abort_all()


def test_a_p_data_longer_than_our_maximum_length_is_aborted(limited: int) -> None:
    stream = _associate(limited, [(CT, EXPLICIT_LE)])
    fragment = b"\0" * (MAX_PDU + 100)
    stream.sock.sendall(wire.p_data_header(1, len(fragment), command=False, last=False) + fragment)
    pdu_type, body = stream.read_pdu(1 << 20)
    assert pdu_type == wire.A_ABORT
    assert body[2:4] == bytes((wire.ABORT_SOURCE_PROVIDER, wire.REASON_INVALID_PARAMETER))


def test_a_p_data_within_our_maximum_length_is_taken(limited: int) -> None:
    stream = _associate(limited, [(VERIFICATION, EXPLICIT_LE)])
    echo = _command(wire.C_ECHO_RQ, 7, False, VERIFICATION)
    stream.sock.sendall(wire.encode_p_data(1, echo, True, MAX_PDU))
    pdu_type, body = stream.read_pdu(1 << 20)
    assert pdu_type == wire.P_DATA_TF
    assert wire.decode_command(body[6:]).status == 0x0000
    stream.sock.sendall(wire.encode_release_rq())
    assert stream.read_pdu(1 << 20)[0] == wire.A_RELEASE_RP


def test_after_release_rp_the_acceptor_waits_for_the_requestor_to_close(tmp_path: Path) -> None:
    acceptor, port = _acceptor(tmp_path, 0, artim=1.5)
    try:
        stream = _associate(port, [(CT, EXPLICIT_LE)])
        stream.sock.sendall(wire.encode_release_rq())
        assert stream.read_pdu(1 << 20)[0] == wire.A_RELEASE_RP
        stream.sock.settimeout(0.5)
        with pytest.raises(TimeoutError):  # the acceptor has not closed: it waits for us
            stream.sock.recv(1)
        stream.sock.settimeout(5)
        start = time.monotonic()
        assert stream.sock.recv(1) == b""  # ... until ARTIM, then it closes
        assert time.monotonic() - start < 3
    finally:
        acceptor.stop_accepting()
        acceptor.abort_all()


def test_release_collision_on_the_requestor_side_completes() -> None:
    """The PACS sends its own A-RELEASE-RQ while we wait for our A-RELEASE-RP: we answer
    with A-RELEASE-RP, and our release completes when its A-RELEASE-RP comes."""
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]
    seen: list[int] = []

    def pacs() -> None:
        conn, _ = srv.accept()
        stream = wire.PduStream(conn)
        pdu_type, _ = stream.read_pdu(1 << 16)
        seen.append(pdu_type)  # our A-RELEASE-RQ
        conn.sendall(wire.encode_release_rq())  # collision
        pdu_type, _ = stream.read_pdu(1 << 16)
        seen.append(pdu_type)  # our A-RELEASE-RP to its request
        conn.sendall(wire.encode_release_rp())
        conn.close()

    t = threading.Thread(target=pacs, daemon=True)
    t.start()
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    assoc = RequestedAssociation(sock, Timeouts(connect=5, acse=5, dimse=5, network=5))
    assoc.alive = True
    assoc.release()
    t.join(5)
    srv.close()
    assert seen == [wire.A_RELEASE_RQ, wire.A_RELEASE_RP]
    assert not assoc.alive
