"""The listener's front door, in process: allowed hosts, ARTIM, pending caps, DICOM TLS.

Real sockets on loopback (Linux routes all of 127.0.0.0/8 to lo, so a client bound to
127.0.3.1 is another host to the listener), real TLS with openssl-made certificates, and
pynetdicom as the modality.
"""

from __future__ import annotations

import shutil
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.uid import UID
from pynetdicom import AE
from pynetdicom import pdu as pnd_pdu
from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from deid_router import wire
from deid_router.scp.acceptor import Acceptor, AcceptorSettings
from deid_router.store.holding import Holding
from deid_router.tls import server_context
from tests.support.certs import Issued, Pki

VERIFICATION = "1.2.840.10008.1.1"


def _settings(**kw: object) -> AcceptorSettings:
    base: dict[str, object] = dict(
        ae_title="DEID_ROUTER", allowed_calling_aets=(), max_associations=4, max_pdu_size=0,
        network_timeout_seconds=10, dimse_timeout_seconds=10, artim_timeout_seconds=10,
    )
    base.update(kw)
    return AcceptorSettings(**base)  # type: ignore[arg-type]


class _Node:
    def __init__(self, tmp_path: Path, **kw: object) -> None:
        self.holding = Holding(tmp_path / "var", "test")
        self.holding.prepare()
        self.acceptor = Acceptor(_settings(**kw), self.holding.new_raw_file, lambda req: 0, has_space=lambda: True)
        self.port = 0
        self.tls_port = 0

    def close(self) -> None:
        self.acceptor.stop_accepting()
        self.acceptor.abort_all()


@pytest.fixture
def make_node(tmp_path: Path) -> Iterator[object]:
    nodes: list[_Node] = []

    def make(tls: ssl.SSLContext | None = None, **kw: object) -> _Node:
        node = _Node(tmp_path / f"n{len(nodes)}", **kw)
        node.port = node.acceptor.start("127.0.0.1", 0, reuse_port=False)
        if tls is not None:
            node.tls_port = node.acceptor.start_tls("127.0.0.1", 0, False, tls)
        nodes.append(node)
        return node

    yield make
    for node in nodes:
        node.close()


def _request_pdu(calling: str = "MODALITY") -> bytes:
    request = A_ASSOCIATE()
    request.application_context_name = UID("1.2.840.10008.3.1.1.1")
    request.calling_ae_title = calling
    request.called_ae_title = "DEID_ROUTER"
    cx = build_context(VERIFICATION, ["1.2.840.10008.1.2"])
    cx.context_id = 1
    request.presentation_context_definition_list = [cx]
    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = 0
    request.user_information = [max_length]
    rq = pnd_pdu.A_ASSOCIATE_RQ()
    rq.from_primitive(request)
    return bytes(rq.encode())


def _connect(port: int, source: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket()
    sock.bind((source, 0))
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    return sock


def _closed_by_peer(sock: socket.socket, timeout: float) -> bool:
    """True when the listener closed the connection (EOF or reset) within ``timeout``."""
    sock.settimeout(timeout)
    try:
        while True:
            if not sock.recv(4096):
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def _echo(port: int, source: str = "127.0.0.1", tls: tuple[ssl.SSLContext, str] | None = None) -> int | None:
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = 10
    assoc = ae.associate("127.0.0.1", port, ae_title="DEID_ROUTER", bind_address=(source, 0), tls_args=tls)
    if not assoc.is_established:
        return None
    try:
        return int(assoc.send_c_echo().Status)
    finally:
        assoc.release()


def _settle(done: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait for the listener's own thread to finish what the client has already seen."""
    deadline = time.monotonic() + timeout
    while not done() and time.monotonic() < deadline:
        time.sleep(0.05)


# -- allowed hosts --------------------------------------------------------------------------


def test_a_host_outside_allowed_hosts_is_closed_before_anything_is_read(make_node) -> None:  # type: ignore[no-untyped-def]
    node = make_node(allowed_hosts=("127.0.0.2/32",))
    sock = _connect(node.port, "127.0.0.1")
    start = time.monotonic()
    assert _closed_by_peer(sock, 5), "the refused host was not disconnected"
    assert time.monotonic() - start < 3, "refused at the ARTIM timeout, not at accept"
    sock.close()
    assert _echo(node.port, "127.0.0.1") is None  # a real modality from that host: no association
    assert _echo(node.port, "127.0.0.2") == 0x0000  # the allowed host associates
    assert node.acceptor.refusals.snapshot()["host_not_allowed"] == 2


# -- ARTIM and pending caps -------------------------------------------------------------------


def test_a_request_in_pieces_within_artim_is_served(make_node) -> None:  # type: ignore[no-untyped-def]
    node = make_node(artim_timeout_seconds=3)
    request = _request_pdu()
    sock = _connect(node.port)
    stream = wire.PduStream(sock)
    for piece in (request[:3], request[3:40], request[40:]):
        sock.sendall(piece)
        time.sleep(0.4)
    pdu_type, _ = stream.read_pdu(1 << 20)
    assert pdu_type == wire.A_ASSOCIATE_AC
    sock.sendall(wire.encode_release_rq())
    assert stream.read_pdu(64)[0] == wire.A_RELEASE_RP
    stream.close()


def test_a_peer_trickling_its_request_is_dropped_at_artim_from_the_connection(make_node) -> None:  # type: ignore[no-untyped-def]
    artim = 1.5
    node = make_node(artim_timeout_seconds=artim)
    request = _request_pdu()
    sock = _connect(node.port)
    connected = time.monotonic()
    sock.settimeout(0.3)
    closed_at = None
    for byte in request:  # one byte every 0.3 s: each byte would reset a per-read timeout
        try:
            sock.send(bytes([byte]))
            if sock.recv(1) == b"":
                closed_at = time.monotonic()
                break
        except TimeoutError:
            continue
        except (ConnectionResetError, BrokenPipeError):
            closed_at = time.monotonic()
            break
    sock.close()
    assert closed_at is not None, "a trickling peer was never dropped"
    assert artim - 0.2 <= closed_at - connected <= artim + 2.0
    assert node.acceptor.refusals.snapshot() == {"artim_timeout": 1}
    assert node.acceptor.pending() == 0 and node.acceptor.established() == 0


def test_pending_connections_are_capped_per_host_and_in_total(make_node) -> None:  # type: ignore[no-untyped-def]
    node = make_node(max_pending_connections=6, max_pending_per_host=3)
    held = [_connect(node.port, "127.0.3.1") for _ in range(3)]
    extra = _connect(node.port, "127.0.3.1")  # a fourth idle connection from the same host
    assert _closed_by_peer(extra, 3)
    held += [_connect(node.port, "127.0.3.2") for _ in range(3)]  # another host still gets in
    _settle(lambda: node.acceptor.pending() == 6)
    assert node.acceptor.pending() == 6
    beyond = _connect(node.port, "127.0.3.3")  # the total cap
    assert _closed_by_peer(beyond, 3)
    assert not any(_closed_by_peer(s, 0.05) for s in held)  # the pending ones are left alone
    assert node.acceptor.refusals.snapshot() == {"pending_host_limit": 1, "pending_limit": 1}
    for sock in held[:2]:
        sock.close()
    _settle(lambda: node.acceptor.pending() == 4)
    assert _echo(node.port, "127.0.3.9") == 0x0000  # room again once pending ones leave
    for sock in held[2:] + [extra, beyond]:
        sock.close()


def test_idle_connections_do_not_take_association_slots(make_node) -> None:  # type: ignore[no-untyped-def]
    node = make_node(max_associations=2)
    idle = [_connect(node.port, f"127.0.4.{i}") for i in range(1, 21)]
    _settle(lambda: node.acceptor.pending() == 20)
    assert node.acceptor.pending() == 20 and node.acceptor.established() == 0
    assert _echo(node.port) == 0x0000  # 20 idle peers, 2 slots: the modality still associates
    for sock in idle:
        sock.close()


@pytest.fixture(scope="module")
def fuzz_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Node]:
    node = _Node(tmp_path_factory.mktemp("fuzz"), artim_timeout_seconds=1.0)
    node.port = node.acceptor.start("127.0.0.1", 0, reuse_port=False)
    yield node
    node.close()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    head=st.one_of(
        st.binary(max_size=64),
        st.builds(lambda n, b: wire.PDU_HEADER.pack(wire.A_ASSOCIATE_RQ, n) + b,
                  st.integers(0, 0xFFFFFFFF), st.binary(max_size=64)),
        st.builds(lambda cut: _request_pdu()[:cut], st.integers(0, 200)),
    ),
)
def test_whatever_arrives_before_the_request_the_front_door_keeps_serving(fuzz_node: _Node, head: bytes) -> None:
    sock = _connect(fuzz_node.port)
    sock.sendall(head)
    sock.close()
    assert _echo(fuzz_node.port) == 0x0000
    deadline = time.monotonic() + 5
    while fuzz_node.acceptor.pending() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert fuzz_node.acceptor.pending() == 0  # nothing left behind once the peers are gone


# -- DICOM TLS -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    if shutil.which("openssl") is None:
        pytest.fail("openssl is required (apt-get install -y openssl)")
    root = tmp_path_factory.mktemp("pki")
    ca = Pki(root / "ca", "ca")
    rogue = Pki(root / "rogue", "rogue")
    return {
        "ca": ca, "server": ca.issue("router"), "server2": ca.issue("router-renewed"),
        "client": ca.issue("modality"), "expired": ca.issue("old-modality", expired=True),
        "rogue": rogue.issue("intruder"),
    }


def _server_ctx(pki: dict[str, object], name: str = "server") -> ssl.SSLContext:
    ca, cert = pki["ca"], pki[name]
    assert isinstance(ca, Pki) and isinstance(cert, Issued)
    return server_context(cert.cert, cert.key, ca.cert, require_client_cert=True)


def _client_ctx(pki: dict[str, object], name: str | None = "client") -> ssl.SSLContext:
    ca = pki["ca"]
    assert isinstance(ca, Pki)
    ctx = ssl.create_default_context(cafile=str(ca.cert))
    if name is not None:
        cert = pki[name]
        assert isinstance(cert, Issued)
        ctx.load_cert_chain(str(cert.cert), str(cert.key))
    return ctx


def _tls_refused(port: int, ctx: ssl.SSLContext) -> bool:
    """True when the handshake or the first read over it fails (the listener refused us)."""
    sock = _connect(port)
    try:
        with ctx.wrap_socket(sock, server_hostname="localhost") as tls:
            tls.sendall(_request_pdu())  # TLS 1.3: a refused client certificate shows here
            return tls.recv(1) == b""
    except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
        return True


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
def test_mutual_tls_association_and_every_refusal_is_counted(make_node, pki) -> None:  # type: ignore[no-untyped-def]
    node = make_node(tls=_server_ctx(pki))
    assert _echo(node.tls_port, tls=(_client_ctx(pki), "localhost")) == 0x0000

    assert _tls_refused(node.tls_port, _client_ctx(pki, None))  # no client certificate
    assert _tls_refused(node.tls_port, _client_ctx(pki, "expired"))
    assert _tls_refused(node.tls_port, _client_ctx(pki, "rogue"))  # signed by another CA
    old = _client_ctx(pki)
    old.minimum_version = old.maximum_version = ssl.TLSVersion.TLSv1_1
    old.set_ciphers("DEFAULT@SECLEVEL=0")
    assert _tls_refused(node.tls_port, old)
    plain = _connect(node.tls_port)
    plain.sendall(_request_pdu())  # a plain DICOM client on the TLS port
    assert _closed_by_peer(plain, 3)
    plain.close()

    expected = {
        "tls_no_client_certificate": 1,
        "tls_certificate_expired": 1,
        "tls_untrusted_ca": 1,
        "tls_protocol_version": 1,
        "tls_plain_client": 1,
    }
    _settle(lambda: node.acceptor.refusals.snapshot() == expected)
    assert node.acceptor.refusals.snapshot() == expected
    assert _echo(node.port) == 0x0000  # the plain port is unaffected
    assert _tls_refused(node.port, _client_ctx(pki))  # and a TLS client there is told apart
    _settle(lambda: "tls_client_on_plain_port" in node.acceptor.refusals.snapshot())
    assert node.acceptor.refusals.snapshot()["tls_client_on_plain_port"] == 1


def test_allowed_calling_aets_apply_over_tls_with_an_a_associate_rj(make_node, pki) -> None:  # type: ignore[no-untyped-def]
    node = make_node(tls=_server_ctx(pki), allowed_calling_aets=("CT01",))
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.tls_port, ae_title="DEID_ROUTER", tls_args=(_client_ctx(pki), "localhost"))
    assert assoc.is_rejected  # the A-ASSOCIATE-RJ arrives through the TLS session
    assert node.acceptor.refusals.snapshot() == {"calling_aet_not_allowed": 1}


def test_a_stalled_tls_handshake_is_dropped_at_artim(make_node, pki) -> None:  # type: ignore[no-untyped-def]
    node = make_node(tls=_server_ctx(pki), artim_timeout_seconds=1.0)
    sock = _connect(node.tls_port)
    started = time.monotonic()
    sock.sendall(b"\x16\x03\x01")  # the first bytes of a ClientHello, then nothing
    assert _closed_by_peer(sock, 5)
    assert 0.8 <= time.monotonic() - started <= 3.0
    sock.close()
    assert node.acceptor.refusals.snapshot() == {"artim_timeout": 1}
    assert _echo(node.tls_port, tls=(_client_ctx(pki), "localhost")) == 0x0000


def test_new_certificates_serve_new_connections_while_an_association_stays_up(make_node, pki) -> None:  # type: ignore[no-untyped-def]
    node = make_node(tls=_server_ctx(pki))
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.tls_port, ae_title="DEID_ROUTER", tls_args=(_client_ctx(pki), "localhost"))
    assert assoc.is_established

    node.acceptor.set_tls_context(_server_ctx(pki, "server2"))
    with _client_ctx(pki).wrap_socket(_connect(node.tls_port), server_hostname="localhost") as tls:
        subject = dict(x[0] for x in tls.getpeercert()["subject"])  # type: ignore[index]
    assert subject["commonName"] == "router-renewed"
    assert assoc.send_c_echo().Status == 0x0000  # the association from before carries on
    assoc.release()
