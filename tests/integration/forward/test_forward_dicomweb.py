"""DICOMweb (STOW-RS) destination against a tiny local HTTP server that answers what each test
needs: the request a server sees (multipart/related, batches, auth, Content-Length), and how
every answer is classified: as the C-STORE status it carries, or like the association failure
it amounts to (refused, dropped), so retries, pauses and quarantine are the DIMSE ones.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import threading
import tracemalloc
from collections.abc import Callable, Iterator
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from deid_router.config import DestinationConfig
from deid_router.forward.base import Delivery, build_destination
from deid_router.forward.status import classify_status
from deid_router.jobs.outcome import Outcome, OutcomeKind
from tests.support.router import free_port

Answer = Callable[[dict[str, Any]], tuple[int, bytes]]


class StowServer:
    """Records each request (headers, parts) and answers with ``answer(request)``."""

    def __init__(self, answer: Answer, keep_parts: bool = True) -> None:
        self.requests: list[dict[str, Any]] = []
        self.answer = answer
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                return

            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                length = int(self.headers.get("Content-Length", "0"))
                remaining, body = length, bytearray()
                while remaining:
                    chunk = self.rfile.read(min(remaining, 1 << 20))
                    if not chunk:
                        break
                    remaining -= len(chunk)
                    if keep_parts:
                        body += chunk
                req = {"path": self.path, "headers": dict(self.headers), "length": length,
                       "parts": _parts(self.headers.get("Content-Type", ""), bytes(body)) if keep_parts else []}
                outer.requests.append(req)
                status, payload = outer.answer(req)
                if status == 0:  # drop the connection without an answer
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.send_response(status)
                self.send_header("Content-Type", "application/dicom+json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/dicom-web"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _parts(content_type: str, body: bytes) -> list[tuple[str, bytes]]:
    msg = BytesParser(policy=HTTP).parsebytes(f"Content-Type: {content_type}\r\n\r\n".encode() + body)
    return [(p.get_content_type(), p.get_payload(decode=True)) for p in msg.iter_parts()]


@pytest.fixture
def server() -> Iterator[Callable[..., StowServer]]:
    made: list[StowServer] = []

    def make(answer: Answer, **kw: Any) -> StowServer:
        s = StowServer(answer, **kw)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


def _items(tmp_path: Path, n: int, size: int = 1000) -> list[Delivery]:
    out = []
    for i in range(n):
        p = tmp_path / f"work{i}.dcm"
        p.write_bytes(os.urandom(size))
        out.append(Delivery(i + 1, p, "1.2.840.10008.5.1.4.1.1.2", f"2.25.{i + 1}", "2.25.100", "2.25.200",
                            "1.2.840.10008.1.2.1"))
    return out


def _dest(url: str, **kw: Any) -> Any:
    return build_destination(DestinationConfig(name="web", type="dicomweb", url=url, connect_timeout_seconds=2,
                                               network_timeout_seconds=5, **kw), "DEID_ROUTER")


def _response(referenced: dict[str, int | None] = {}, failed: dict[str, int | None] = {}) -> bytes:  # noqa: B006
    def items(m: dict[str, int | None], reason_tag: str) -> list[dict[str, Any]]:
        out = []
        for uid, reason in m.items():
            item: dict[str, Any] = {"00081150": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.2"]},
                                    "00081155": {"vr": "UI", "Value": [uid]}}
            if reason is not None:
                item[reason_tag] = {"vr": "US", "Value": [reason]}
            out.append(item)
        return out

    doc: dict[str, Any] = {}
    if referenced:
        doc["00081199"] = {"vr": "SQ", "Value": items(referenced, "00081196")}
    if failed:
        doc["00081198"] = {"vr": "SQ", "Value": items(failed, "00081197")}
    return json.dumps(doc).encode()


def _all_stored(req: dict[str, Any]) -> tuple[int, bytes]:
    return 200, _response(referenced={f"2.25.{i + 1}": None for i in range(100)})


def test_stow_request_is_multipart_related_in_batches_with_the_file_bytes(tmp_path: Path, server: Any) -> None:
    srv = server(_all_stored)
    items = _items(tmp_path, 5)
    out = _dest(srv.url, instances_per_request=2).send(items)
    assert all(o.kind is OutcomeKind.DELIVERED for o in out.values()) and set(out) == {1, 2, 3, 4, 5}
    assert [len(r["parts"]) for r in srv.requests] == [2, 2, 1]
    req = srv.requests[0]
    assert req["path"] == "/dicom-web/studies"
    ctype = req["headers"]["Content-Type"]
    assert ctype.startswith("multipart/related;") and 'type="application/dicom"' in ctype
    assert "Transfer-Encoding" not in req["headers"]  # a plain Content-Length: servers need not take chunks
    assert req["headers"]["Accept"] == "application/dicom+json"
    sent = [payload for r in srv.requests for _, payload in r["parts"]]
    assert sent == [i.path.read_bytes() for i in items]
    assert {t for r in srv.requests for t, _ in r["parts"]} == {"application/dicom"}


def test_basic_and_bearer_auth_come_from_files(tmp_path: Path, server: Any) -> None:
    srv = server(_all_stored)
    (tmp_path / "pw").write_text("s3cret\n")
    (tmp_path / "token").write_text("tok-123\n")
    _dest(srv.url, username="router", password_file=tmp_path / "pw").send(_items(tmp_path, 1))
    _dest(srv.url, token_file=tmp_path / "token").send(_items(tmp_path, 1))
    assert srv.requests[0]["headers"]["Authorization"] == "Basic " + base64.b64encode(b"router:s3cret").decode()
    assert srv.requests[1]["headers"]["Authorization"] == "Bearer tok-123"


def test_409_with_failed_sop_sequence_is_the_matching_c_store_failure(tmp_path: Path, server: Any) -> None:
    srv = server(lambda req: (409, _response(failed={"2.25.1": 0xA900, "2.25.2": 0x0122})))
    out = _dest(srv.url).send(_items(tmp_path, 2))
    assert out[1] == classify_status(0xA900) == Outcome(OutcomeKind.PERMANENT, 0xA900, "status_0xA900")
    assert out[2] == classify_status(0x0122)


def test_202_partial_failure_each_instance_as_its_c_store_status(tmp_path: Path, server: Any) -> None:
    srv = server(lambda req: (202, _response(referenced={"2.25.1": None, "2.25.2": 0xB000},
                                             failed={"2.25.3": 0xA700, "2.25.4": 0xC000})))
    out = _dest(srv.url).send(_items(tmp_path, 5))
    assert out[1].kind is OutcomeKind.DELIVERED
    assert out[2] == classify_status(0xB000) and out[2].kind is OutcomeKind.DELIVERED_WARNING
    assert out[3] == classify_status(0xA700) and out[3].kind is OutcomeKind.RETRY  # out of resources: retried
    assert out[4] == classify_status(0xC000) and out[4].kind is OutcomeKind.PERMANENT
    assert out[5].kind is OutcomeKind.RETRY and "not_acknowledged" in out[5].reason  # never taken as stored


@pytest.mark.parametrize(
    ("status", "kind"),
    [(409, OutcomeKind.PERMANENT), (400, OutcomeKind.PERMANENT), (415, OutcomeKind.PERMANENT),
     (500, OutcomeKind.RETRY), (408, OutcomeKind.RETRY), (503, OutcomeKind.UNAVAILABLE),
     (502, OutcomeKind.UNAVAILABLE), (401, OutcomeKind.UNAVAILABLE), (403, OutcomeKind.UNAVAILABLE)],
)
def test_http_status_without_per_instance_answer(tmp_path: Path, server: Any, status: int, kind: OutcomeKind) -> None:
    srv = server(lambda req: (status, b"<html>no json</html>"))
    out = _dest(srv.url).send(_items(tmp_path, 2))
    assert {o.kind for o in out.values()} == {kind}
    assert {o.reason for o in out.values()} == {f"http_{status}"}


def test_connection_refused_is_unavailable_and_the_rest_are_not_tried(tmp_path: Path) -> None:
    out = _dest(f"http://127.0.0.1:{free_port()}/dicom-web", instances_per_request=1).send(_items(tmp_path, 3))
    assert {o.kind for o in out.values()} == {OutcomeKind.UNAVAILABLE}
    assert {o.reason for o in out.values()} == {"connection_refused"}


def test_connection_dropped_mid_request_is_unavailable(tmp_path: Path, server: Any) -> None:
    srv = server(lambda req: (0, b""))
    out = _dest(srv.url).send(_items(tmp_path, 2))
    assert {o.kind for o in out.values()} == {OutcomeKind.UNAVAILABLE}
    assert {o.reason for o in out.values()} == {"association_lost"}


def test_large_instance_is_streamed_from_its_file(tmp_path: Path, server: Any) -> None:
    size = 96 * 1024 * 1024
    big = tmp_path / "big.dcm"
    with open(big, "wb") as fh:
        fh.truncate(size)  # sparse: the bytes are never in memory on either side
    srv = server(lambda req: (200, _response(referenced={"2.25.1": None})), keep_parts=False)
    item = Delivery(1, big, "1.2.840.10008.5.1.4.1.1.2", "2.25.1", "2.25.100", "2.25.200", "1.2.840.10008.1.2.1")
    dest = _dest(srv.url)
    tracemalloc.start()
    try:
        out = dest.send([item])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert out[1].kind is OutcomeKind.DELIVERED
    assert srv.requests[0]["length"] > size
    assert peak < 16 * 1024 * 1024, f"peak {peak / 2**20:.1f} MiB for a {size / 2**20:.0f} MiB instance"


def _openssl(*args: str, cwd: Path) -> None:
    import subprocess

    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _make_pki(d: Path) -> None:
    """A CA and a server certificate for 127.0.0.1 signed by it; a second, unrelated CA."""
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
             "-days", "2", "-subj", "/CN=test-ca", cwd=d)
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "other.key", "-out", "other.crt",
             "-days", "2", "-subj", "/CN=other-ca", cwd=d)
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
             "-subj", "/CN=127.0.0.1", cwd=d)
    (d / "ext.cnf").write_text("subjectAltName = IP:127.0.0.1\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", "server.crt", "-days", "2", "-extfile", "ext.cnf", cwd=d)


def test_https_is_verified_against_ca_file(tmp_path: Path, server: Any) -> None:
    import shutil
    import ssl

    if shutil.which("openssl") is None:
        from tests.conftest import missing

        missing("openssl is not installed")
    pki = tmp_path / "pki"
    pki.mkdir()
    _make_pki(pki)
    srv = server(_all_stored)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki / "server.crt", pki / "server.key")
    srv.server.socket = ctx.wrap_socket(srv.server.socket, server_side=True)
    url = f"https://127.0.0.1:{srv.port}/dicom-web"
    ok = _dest(url, ca_file=pki / "ca.crt").send(_items(tmp_path, 1))
    assert ok[1].kind is OutcomeKind.DELIVERED
    wrong = _dest(url, ca_file=pki / "other.crt").send(_items(tmp_path, 1))
    assert (wrong[1].kind, wrong[1].reason) == (OutcomeKind.UNAVAILABLE, "connect_failed:tls")  # never sent unverified
    assert len(srv.requests) == 1


def test_413_for_a_batch_is_retried_one_instance_per_request(tmp_path: Path, server: Any) -> None:
    def answer(req: dict[str, Any]) -> tuple[int, bytes]:
        if len(req["parts"]) > 1:
            return 413, b""
        return 200, _response(referenced={f"2.25.{i + 1}": None for i in range(3)})

    srv = server(answer)
    out = _dest(srv.url, instances_per_request=3).send(_items(tmp_path, 3))
    assert {o.kind for o in out.values()} == {OutcomeKind.DELIVERED}
    assert [len(r["parts"]) for r in srv.requests] == [3, 1, 1, 1]


def test_an_xml_response_is_read_too(tmp_path: Path, server: Any) -> None:
    xml = b"""<?xml version="1.0" encoding="UTF-8"?>
<NativeDicomModel>
 <DicomAttribute tag="00081199" vr="SQ"><Item number="1">
  <DicomAttribute tag="00081155" vr="UI"><Value number="1">2.25.1</Value></DicomAttribute>
 </Item></DicomAttribute>
 <DicomAttribute tag="00081198" vr="SQ"><Item number="1">
  <DicomAttribute tag="00081155" vr="UI"><Value number="1">2.25.2</Value></DicomAttribute>
  <DicomAttribute tag="00081197" vr="US"><Value number="1">43264</Value></DicomAttribute>
 </Item></DicomAttribute>
</NativeDicomModel>"""
    srv = server(lambda req: (202, xml))
    out = _dest(srv.url).send(_items(tmp_path, 2))
    assert out[1].kind is OutcomeKind.DELIVERED
    assert out[2] == classify_status(0xA900)  # 43264
