"""DICOM TLS end to end, with real peers: dcmtk storescu and storescp with +tls, openssl.

A modality with a certificate signed by the configured CA sends through the router's TLS
listener; the router forwards over TLS (verifying the PACS certificate and host name, with
its own client certificate) to a storescp that only speaks TLS; the instance arrives
de-identified. Untrusted, expired and missing client certificates, a plain client on the TLS
port and a TLS 1.1 client are refused, each logged with its reason. SIGHUP swaps the
listener's certificate for new connections.
"""

from __future__ import annotations

import json
import shutil
import signal
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from deid_router.deid.keys import Keys
from tests.conftest import require_tool
from tests.support.certs import Issued, Pki
from tests.support.corpus import make_series
from tests.support.peers import StoreSCP, free_port, peer_env, storescu, storescu_acknowledged
from tests.support.router import RouterProcess, dicom_destination, wait_until

pytestmark = pytest.mark.e2e


class _Pki:
    def __init__(self, root: Path) -> None:
        self.ca = Pki(root / "ca", "ca")
        self.rogue_ca = Pki(root / "rogue", "rogue")
        self.router = self.ca.issue("router")
        self.router_renewed = self.ca.issue("router-renewed")
        self.pacs = self.ca.issue("pacs")
        self.modality = self.ca.issue("modality")
        self.expired = self.ca.issue("old-modality", expired=True)
        self.intruder = self.rogue_ca.issue("intruder")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> _Pki:
    if shutil.which("openssl") is None:
        pytest.fail("openssl is required (apt-get install -y openssl)")
    return _Pki(tmp_path_factory.mktemp("pki"))


def _tls_args(cert: Issued, ca: Path) -> list[str]:
    """dcmtk's options for mutual TLS: our key and certificate, the CA we trust."""
    return ["+tls", str(cert.key), str(cert.cert), "+cf", str(ca)]


def _listener_tls(pki: _Pki, port: int, cert: Path | None = None, key: Path | None = None) -> dict[str, object]:
    return {
        "port": port,
        "cert_file": str(cert or pki.router.cert),
        "key_file": str(key or pki.router.key),
        "ca_file": str(pki.ca.cert),
    }


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


def _refusal_reasons(router: RouterProcess) -> list[str]:
    return [str(e.get("reason")) for e in _events(router, "association_refused")]


@pytest.fixture
def tls_pacs(tmp_path: Path, pki: _Pki) -> Iterator[StoreSCP]:
    require_tool("storescp")
    require_tool("storescu")
    scp = StoreSCP(tmp_path / "pacs", ae_title="PACS", extra=_tls_args(pki.pacs, pki.ca.cert))
    try:
        yield scp
    finally:
        scp.stop()


def _tls_destination(pki: _Pki, port: int, **extra: object) -> dict[str, object]:
    return dicom_destination(
        "pacs", port, "PACS", tls=True, ca_file=str(pki.ca.cert),
        cert_file=str(pki.router.cert), key_file=str(pki.router.key), connect_timeout_seconds=5, **extra,
    )


def test_storescu_over_tls_reaches_a_tls_pacs_de_identified(tmp_path: Path, pki: _Pki, tls_pacs: StoreSCP) -> None:
    files = make_series(tmp_path / "in", 2, rows=32, cols=32)
    tls_port = free_port()
    router = RouterProcess(
        tmp_path / "router", [_tls_destination(pki, tls_pacs.port)],
        listener={"plain": False, "tls": _listener_tls(pki, tls_port)},
    )
    with router:
        result = storescu("127.0.0.1", tls_port, files, extra=_tls_args(pki.modality, pki.ca.cert))
        assert storescu_acknowledged(result) == 2, result.stdout + result.stderr
        router.wait_idle(60, expect_done=2)
        received = tls_pacs.wait_for_instances(2, timeout=30)
    keys = Keys.load_or_create(router.secret_path)
    originals = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    assert set(received) == {keys.uid(str(ds.SOPInstanceUID)) for ds in originals}
    for path in tls_pacs.files():
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert ds.PatientIdentityRemoved == "YES"
        assert ds.PatientID != originals[0].PatientID and ds.PatientName != originals[0].PatientName
    plain_echo = subprocess.run(["echoscu", "-to", "5", "-ta", "5", "-aec", "PACS", "127.0.0.1", str(tls_pacs.port)],
                                capture_output=True, text=True, timeout=30, env=peer_env())
    assert plain_echo.returncode != 0  # that PACS only speaks TLS: the instances came over TLS


def test_a_pacs_certificate_for_another_name_is_not_trusted(tmp_path: Path, pki: _Pki, tls_pacs: StoreSCP) -> None:
    files = make_series(tmp_path / "in", 1, rows=16, cols=16)
    router = RouterProcess(tmp_path / "router", [_tls_destination(pki, tls_pacs.port, server_name="pacs.example.org")])
    with router:
        result = storescu("127.0.0.1", router.port, files)
        assert storescu_acknowledged(result) == 1
        wait_until(
            lambda: any(e.get("reason") == "connect_failed:tls_hostname_mismatch" for e in _events(router, "job_finished")),
            30, 0.5, "the job to be retried for the hostname mismatch",
        )
        assert router.status()["jobs"].get("done", 0) == 0
    assert tls_pacs.files() == []  # nothing was sent to a PACS whose name did not match


def test_untrusted_expired_missing_certificates_plain_and_tls11_clients_are_refused(
    tmp_path: Path, pki: _Pki, tls_pacs: StoreSCP
) -> None:
    files = make_series(tmp_path / "in", 1, rows=16, cols=16)
    tls_port = free_port()
    router = RouterProcess(
        tmp_path / "router", [_tls_destination(pki, tls_pacs.port)], listener={"tls": _listener_tls(pki, tls_port)}
    )
    with router:
        for cert in (pki.intruder, pki.expired):  # they trust our CA; theirs is not trusted
            refused = storescu("127.0.0.1", tls_port, files, extra=_tls_args(cert, pki.ca.cert), timeout=60)
            assert storescu_acknowledged(refused) == 0, refused.stdout
        anonymous = storescu("127.0.0.1", tls_port, files, extra=["+tla", "+cf", str(pki.ca.cert)], timeout=60)
        assert storescu_acknowledged(anonymous) == 0
        plain = storescu("127.0.0.1", tls_port, files, timeout=60)
        assert storescu_acknowledged(plain) == 0
        # TLS 1.1 (SECLEVEL=0 so that OpenSSL 3 offers it at all): the listener must say no
        s_client = subprocess.run(
            ["openssl", "s_client", "-connect", f"127.0.0.1:{tls_port}", "-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0",
             "-cert", str(pki.modality.cert), "-key", str(pki.modality.key), "-CAfile", str(pki.ca.cert)],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30,
        )
        assert s_client.returncode != 0
        wait_until(lambda: len(_refusal_reasons(router)) >= 5, 10, 0.2, "five refusals in the log")
        reasons = _refusal_reasons(router)
        assert sorted(reasons) == sorted([
            "tls_untrusted_ca", "tls_certificate_expired", "tls_no_client_certificate", "tls_plain_client",
            "tls_protocol_version",
        ]), reasons
        assert all(e.get("peer") == "127.0.0.1" for e in _events(router, "association_refused"))

        ok = storescu("127.0.0.1", tls_port, files, extra=_tls_args(pki.modality, pki.ca.cert))
        assert storescu_acknowledged(ok) == 1  # a trusted modality still gets through
        router.wait_idle(60, expect_done=1)
    assert len(tls_pacs.files()) == 1


def _served_common_name(port: int, pki: _Pki) -> str:
    ctx = ssl.create_default_context(cafile=str(pki.ca.cert))
    ctx.load_cert_chain(str(pki.modality.cert), str(pki.modality.key))
    import socket

    with ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10), server_hostname="localhost") as s:
        subject = dict(x[0] for x in s.getpeercert()["subject"])  # type: ignore[index]
    return str(subject["commonName"])


def test_sighup_serves_renewed_certificates_without_dropping_an_association(tmp_path: Path, pki: _Pki) -> None:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    live = tmp_path / "live"
    live.mkdir()
    cert, key = live / "router.crt", live / "router.key"
    shutil.copy(pki.router.cert, cert)
    shutil.copy(pki.router.key, key)
    tls_port = free_port()
    router = RouterProcess(
        tmp_path / "router", [{"name": "out", "type": "folder", "path": "var/outbox"}],
        listener={"tls": _listener_tls(pki, tls_port, cert, key), "processes": 2},  # the node forwards SIGHUP
    )
    with router:
        wait_until(lambda: len(_events(router, "listener_started")) == 2, 30, 0.2, "both listener processes")
        assert _served_common_name(tls_port, pki) == "router"
        ctx = ssl.create_default_context(cafile=str(pki.ca.cert))
        ctx.load_cert_chain(str(pki.modality.cert), str(pki.modality.key))
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", tls_port, ae_title="DEID_ROUTER", tls_args=(ctx, "localhost"))
        assert assoc.is_established

        shutil.copy(pki.router_renewed.cert, cert)
        shutil.copy(pki.router_renewed.key, key)
        assert router.proc is not None
        router.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: len(_events(router, "tls_reloaded")) == 2, 10, 0.1, "the reload in both processes")
        # SO_REUSEPORT spreads connections over both listener processes: every one serves the new one
        assert {_served_common_name(tls_port, pki) for _ in range(8)} == {"router-renewed"}
        assert assoc.send_c_echo().Status == 0x0000  # established before the reload, still served
        assoc.release()

        key.write_text("not a key")  # a broken renewal keeps the certificate in use
        router.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: len(_events(router, "tls_reload_failed")) == 2, 10, 0.1, "the failed reloads")
        assert {_served_common_name(tls_port, pki) for _ in range(8)} == {"router-renewed"}
        assert router.proc.poll() is None


def test_orthanc_with_dicom_tls_as_the_destination(tmp_path: Path, pki: _Pki) -> None:
    from tests.support.peers import Orthanc

    require_tool("Orthanc")
    orthanc = Orthanc(
        tmp_path / "orthanc", ae_title="ORTHANC", start=False,
        extra_config={
            "DicomTlsEnabled": True,
            "DicomTlsCertificate": str(pki.pacs.cert),
            "DicomTlsPrivateKey": str(pki.pacs.key),
            "DicomTlsTrustedCertificates": str(pki.ca.cert),
            "DicomTlsRemoteCertificateRequired": True,
        },
    )
    orthanc.start()
    try:
        files = make_series(tmp_path / "in", 1, rows=16, cols=16)
        dest = _tls_destination(pki, orthanc.port)
        dest["ae_title"] = "ORTHANC"
        with RouterProcess(tmp_path / "router", [dest]) as router:
            assert storescu_acknowledged(storescu("127.0.0.1", router.port, files)) == 1
            router.wait_idle(60, expect_done=1)
        keys = Keys.load_or_create(router.secret_path)
        original = str(pydicom.dcmread(files[0], stop_before_pixels=True).SOPInstanceUID)
        assert set(orthanc.wait_for_instances(1, timeout=30)) == {keys.uid(original)}
        # and a plain association to that Orthanc port fails: it really only speaks TLS
        echo = subprocess.run(["echoscu", "-to", "5", "-ta", "5", "-aec", "ORTHANC", "127.0.0.1", str(orthanc.port)],
                              capture_output=True, text=True, timeout=30, env=peer_env())
        assert echo.returncode != 0
    finally:
        orthanc.close()
