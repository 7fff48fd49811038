"""The listener's front door on a running node: idle and trickling peers cannot starve it,
and hosts outside ``listener.allowed_hosts`` are turned away before negotiation.

Linux routes all of 127.0.0.0/8 to the loopback interface, so clients bound to 127.0.5.x are
distinct hosts to the node (the per-host cap on pending connections counts them apart).
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from contextlib import contextmanager
import ssl
import threading
import time
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom import pdu as pnd_pdu
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pydicom.uid import UID

from tests.conftest import require_tool
from tests.support.certs import Pki
from tests.support.corpus import make_series
from tests.support.peers import echoscu, free_port, storescu, storescu_acknowledged
from tests.support.procmon import RssSampler
from tests.support.router import RouterProcess, wait_until
from tests.support.syslog_collector import SyslogCollector

pytestmark = pytest.mark.e2e

ARTIM = 5.0  # the lower end of the 5-10 s the issue asks for (default 10)


def _events(router: RouterProcess, event: str) -> list[dict[str, object]]:
    out = []
    for line in router.log_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("event") == event:
            out.append(record)
    return out


@contextmanager
def _stopped_after(collector: SyslogCollector) -> Iterator[SyslogCollector]:
    try:
        yield collector
    finally:
        collector.stop()


def _request_pdu() -> bytes:
    request = A_ASSOCIATE()
    request.application_context_name = UID("1.2.840.10008.3.1.1.1")
    request.calling_ae_title = "TRICKLER"
    request.called_ae_title = "DEID_ROUTER"
    cx = build_context("1.2.840.10008.1.1", ["1.2.840.10008.1.2"])
    cx.context_id = 1
    request.presentation_context_definition_list = [cx]
    rq = pnd_pdu.A_ASSOCIATE_RQ()
    rq.from_primitive(request)
    return bytes(rq.encode())


def _connect(port: int, source: str) -> socket.socket:
    sock = socket.socket()
    sock.bind((source, 0))
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    return sock


class _Peer(threading.Thread):
    """One connection that sends nothing (idle) or one byte of a request every ``every`` s;
    records how long after connecting the node closed it."""

    def __init__(self, port: int, source: str, every: float | None) -> None:
        super().__init__(daemon=True)
        self.sock = _connect(port, source)
        self.connected = time.monotonic()
        self.every = every
        self.closed_after: float | None = None
        self.sent = 0

    def run(self) -> None:
        request = _request_pdu()
        self.sock.settimeout(self.every or 0.5)
        deadline = self.connected + 4 * ARTIM
        try:
            while time.monotonic() < deadline:
                if self.every is not None and self.sent < len(request) - 1:  # never completes it
                    self.sock.send(request[self.sent : self.sent + 1])
                    self.sent += 1
                try:
                    if self.sock.recv(1) == b"":
                        break
                except TimeoutError:
                    continue
            else:
                return
        except (ConnectionResetError, BrokenPipeError):
            pass
        self.closed_after = time.monotonic() - self.connected
        self.sock.close()


def test_idle_and_trickling_peers_do_not_starve_the_listener(tmp_path: Path) -> None:
    require_tool("storescu")
    files = make_series(tmp_path / "in", 2, rows=64, cols=64)
    router = RouterProcess(
        tmp_path / "router", [{"name": "out", "type": "folder", "path": "var/outbox"}],
        listener={"artim_timeout_seconds": ARTIM, "max_associations": 4},
    )
    with router:
        assert router.proc is not None
        warm = storescu("127.0.0.1", router.port, [files[0]])  # the node has received once: warm
        assert storescu_acknowledged(warm) == 1
        router.wait_idle(60, expect_done=1)
        time.sleep(1.0)
        with RssSampler(router.proc.pid, interval=0.05) as rss:
            time.sleep(0.3)
            baseline_mb = rss.peak_sum_mb
            idle = [_Peer(router.port, f"127.0.5.{1 + i // 10}", None) for i in range(100)]
            trickle = [_Peer(router.port, f"127.0.6.{1 + i}", 1.0) for i in range(10)]
            for peer in idle + trickle:
                peer.start()
            time.sleep(0.5)  # every one of them is connected and waiting

            started = time.monotonic()
            result = storescu("127.0.0.1", router.port, [files[1]], timeout=30)
            elapsed = time.monotonic() - started
            assert storescu_acknowledged(result) == 1, result.stdout + result.stderr
            assert elapsed < 2.0, f"the modality waited {elapsed:.1f} s behind 110 idle peers"
            first = min(p.connected for p in idle + trickle)
            assert started + elapsed < first + ARTIM, "storescu did not run while all 110 peers were pending"

            for peer in idle + trickle:
                peer.join(timeout=4 * ARTIM)
        grown_mb = rss.peak_sum_mb - baseline_mb
        print(f"storescu behind 110 pending peers: {elapsed:.2f} s; node RSS {baseline_mb:.1f} MB, +{grown_mb:.1f} MB at peak")

        closed = [p.closed_after for p in idle + trickle]
        assert all(c is not None for c in closed), f"{closed.count(None)} peers were never dropped"
        assert all(ARTIM - 0.5 <= c <= ARTIM + 3.0 for c in closed if c is not None), sorted(c for c in closed if c)
        assert all(p.sent >= 2 for p in trickle)  # they did trickle: each byte did not extend ARTIM
        assert grown_mb < 20, f"the node grew by {grown_mb:.1f} MB with 110 pending connections"
        refused = [e for e in _events(router, "association_refused") if e.get("reason") == "artim_timeout"]
        assert len(refused) >= 110
        router.wait_idle(60, expect_done=2)


def test_a_host_outside_allowed_hosts_is_refused_before_negotiation(tmp_path: Path) -> None:
    require_tool("echoscu")
    pki = Pki(tmp_path / "pki")
    server, client = pki.issue("router"), pki.issue("modality")
    tls_port = free_port()
    collector = SyslogCollector("tcp")  # each refusal is also a DICOM audit Security Alert
    router = RouterProcess(
        tmp_path / "router", [{"name": "out", "type": "folder", "path": "var/outbox"}],
        listener={
            "allowed_hosts": ["127.0.0.2/32"],
            "tls": {"port": tls_port, "cert_file": str(server.cert), "key_file": str(server.key),
                    "ca_file": str(pki.cert)},
        },
        extra={"audit": {"syslog_url": collector.url, "source_id": "front-door-test"}},
    )
    ctx = ssl.create_default_context(cafile=str(pki.cert))
    ctx.load_cert_chain(str(client.cert), str(client.key))
    with _stopped_after(collector), router:
        assert not echoscu("127.0.0.1", router.port)  # dcmtk from 127.0.0.1: refused
        raw = _connect(router.port, "127.0.0.1")
        raw.sendall(_request_pdu())
        try:
            answer = raw.recv(4096)
        except ConnectionResetError:  # closed with our request unread
            answer = b""
        assert answer == b""  # closed: no A-ASSOCIATE-RJ, nothing negotiated
        raw.close()
        with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError)):
            ctx.wrap_socket(_connect(tls_port, "127.0.0.1"), server_hostname="localhost")  # TLS: no handshake

        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(Verification)
        for port, tls in ((router.port, None), (tls_port, (ctx, "localhost"))):
            assoc = ae.associate("127.0.0.1", port, ae_title="DEID_ROUTER", bind_address=("127.0.0.2", 0), tls_args=tls)
            assert assoc.is_established, f"the allowed host was refused on port {port}"
            assert assoc.send_c_echo().Status == 0x0000
            assoc.release()
        wait_until(lambda: len(_events(router, "association_refused")) >= 3, 10, 0.1, "the refusals in the log")
        refusals = _events(router, "association_refused")
        alerts = collector.wait_for(lambda ms: len(ms) >= len(refusals), 10)
    reasons = [o.get("ParticipantObjectID") for m in alerts for o in m.xml().findall("ParticipantObjectIdentification")]
    assert set(reasons) == {"host_not_allowed"}
    assert refusals and all(e["reason"] == "host_not_allowed" and e["peer"] == "127.0.0.1" for e in refusals)
    assert len(refusals) >= 3  # echoscu, the raw request and the TLS client (plus the start-up probe)
    assert not _events(router, "association_rejected")  # never got as far as an A-ASSOCIATE-RJ
