"""check-config and the network security keys: allow-lists, [listener.tls], destination TLS.

Certificates are real (openssl, tests/support/certs.py): check-config loads them into a TLS
context, so a key of another certificate or a file that is no PEM is named before serve.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from deid_router.cli import main
from deid_router.config import load_config
from tests.support.certs import Pki

BASE = """
[listener]
ae_title = "DEID_ROUTER"
port = 11112
{listener}

{listener_tls}

[storage]
root = "var"

[deid]
secret_file = "var/secret.key"

[[destinations]]
name = "pacs"
type = "dicom"
ae_title = "PACS"
host = "127.0.0.1"
port = 4242
{destination}

[[destinations]]
name = "outbox"
type = "folder"
path = "var/outbox"
{folder}

[[routes]]
name = "default"
destinations = ["pacs", "outbox"]
"""

TLS = """[listener.tls]
port = 2762
cert_file = "tls/router.crt"
key_file = "tls/router.key"
ca_file = "tls/ca.crt"
"""


@pytest.fixture(scope="module")
def tls_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("conf")
    pki = Pki(root / "tls", "ca")
    for name in ("router", "other"):
        issued = pki.issue(name)
        issued.cert.rename(root / "tls" / f"{name}.crt")
        issued.key.rename(root / "tls" / f"{name}.key")
    (root / "tls" / "junk.crt").write_text("not a certificate\n")
    return root


def _write(root: Path, listener: str = "", listener_tls: str = "", destination: str = "", folder: str = "") -> Path:
    path = root / "router.toml"
    path.write_text(
        BASE.format(listener=listener, listener_tls=listener_tls, destination=destination, folder=folder),
        encoding="utf-8",
    )
    return path


def _check(path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(["check-config", "--config", str(path)])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_network_keys_load_with_paths_against_the_config_folder(tls_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(
        tls_dir,
        listener='allowed_hosts = ["10.1.2.0/24", "127.0.0.1", "::1/128"]\nartim_timeout_seconds = 5',
        listener_tls=TLS,
        destination='tls = true\nca_file = "tls/ca.crt"\ncert_file = "tls/router.crt"\nkey_file = "tls/router.key"',
    )
    code, out = _check(path, capsys)
    assert code == 0, out
    cfg = load_config(path)
    li = cfg.listener
    assert li.allowed_hosts == ("10.1.2.0/24", "127.0.0.1/32", "::1/128")
    assert li.plain and li.artim_timeout_seconds == 5 and li.max_pending_connections == 256
    assert li.tls is not None and li.tls.port == 2762 and li.tls.require_client_cert
    assert li.tls.cert_file == tls_dir / "tls" / "router.crt" and li.tls.ca_file == tls_dir / "tls" / "ca.crt"
    pacs = cfg.destination("pacs")
    assert pacs.tls and pacs.ca_file == tls_dir / "tls" / "ca.crt" and pacs.server_name == ""
    assert not cfg.destination("outbox").tls


@pytest.mark.parametrize(
    ("parts", "key"),
    [
        ({"listener": 'allowed_hosts = ["10.1.2.300/24"]'}, "listener.allowed_hosts[0]"),
        ({"listener": 'allowed_hosts = ["127.0.0.1/32", "10.1.2.5/24"]'}, "listener.allowed_hosts[1]"),  # host bits
        ({"listener": "allowed_hosts = [\"any\"]"}, "listener.allowed_hosts[0]"),
        ({"listener": "plain = false"}, "listener.plain"),
        ({"listener": "artim_timeout_seconds = 0"}, "listener.artim_timeout_seconds"),
        ({"listener": "max_pending_per_host = 0"}, "listener.max_pending_per_host"),
        ({"listener_tls": TLS.replace("tls/router.crt", "tls/missing.crt")}, "listener.tls.cert_file"),
        ({"listener_tls": TLS.replace("tls/router.key", "tls/other.key")}, "listener.tls.key_file"),
        ({"listener_tls": TLS.replace("tls/ca.crt", "tls/junk.crt")}, "listener.tls.ca_file"),
        ({"listener_tls": TLS.replace('ca_file = "tls/ca.crt"\n', "")}, "listener.tls.ca_file"),
        ({"listener_tls": TLS.replace("port = 2762", "port = 11112")}, "listener.tls.port"),
        ({"listener_tls": TLS.replace("port = 2762\n", "")}, "listener.tls.port"),
        ({"listener_tls": TLS + "verify = false\n"}, "listener.tls.verify"),
        ({"destination": 'ca_file = "tls/ca.crt"'}, "destinations[0].ca_file"),  # without tls = true
        ({"destination": 'tls = true\ncert_file = "tls/router.crt"'}, "destinations[0].key_file"),
        ({"destination": 'tls = true\nca_file = "tls/nope.crt"'}, "destinations[0].ca_file"),
        ({"destination": 'tls = "yes"'}, "destinations[0].tls"),
        ({"folder": "tls = true"}, "destinations[1].tls"),
    ],
)
def test_each_network_mistake_exits_2_naming_the_key(
    tls_dir: Path, capsys: pytest.CaptureFixture[str], parts: dict[str, str], key: str
) -> None:
    code, out = _check(_write(tls_dir, **parts), capsys)
    assert code == 2, out
    assert key in out, out
    assert "Traceback" not in out


def test_without_client_certificates_no_ca_is_needed(tls_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tls = TLS.replace('ca_file = "tls/ca.crt"\n', "require_client_cert = false\n")
    code, out = _check(_write(tls_dir, listener="plain = false", listener_tls=tls), capsys)
    assert code == 0, out
    cfg = load_config(tls_dir / "router.toml")
    assert cfg.listener.tls is not None and cfg.listener.tls.ca_file is None and not cfg.listener.plain
