"""``[http]``: defaults, mistakes named by key, TLS files in pairs."""

from __future__ import annotations

from pathlib import Path

import pytest

from deid_router.config import load_config
from deid_router.errors import ConfigError
from tests.support.configs import FOLDER_NODE as BASE


def _load(tmp_path: Path, http: str) -> object:
    p = tmp_path / "router.toml"
    p.write_text(BASE + http, encoding="utf-8")
    return load_config(p)


def test_http_defaults_to_the_contract_and_port_0_turns_it_off(tmp_path: Path) -> None:
    cfg = load_config((tmp_path / "a.toml", (tmp_path / "a.toml").write_text(BASE))[0])
    assert (cfg.http.host, cfg.http.port, cfg.http.cert_file) == ("127.0.0.1", 8080, None)
    off = _load(tmp_path, "[http]\nport = 0\n")
    assert off.http.port == 0  # type: ignore[attr-defined]


def test_tls_files_resolve_against_the_config_folder(tmp_path: Path) -> None:
    (tmp_path / "c.pem").write_text("x")
    (tmp_path / "k.pem").write_text("x")
    cfg = _load(tmp_path, '[http]\nport = 8443\n[http.tls]\ncert_file = "c.pem"\nkey_file = "k.pem"\n')
    assert cfg.http.cert_file == tmp_path / "c.pem" and cfg.http.key_file == tmp_path / "k.pem"  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("http", "key"),
    [
        ("[http]\nport = 70000\n", "http.port"),
        ("[http]\nport = -1\n", "http.port"),
        ('[http]\nport = "80"\n', "http.port"),
        ("[http]\nprot = 80\n", "http.prot"),
        ('[http.tls]\ncert_file = "missing.pem"\nkey_file = "missing.pem"\n', "http.tls.cert_file"),
        ('[http.tls]\ncert_file = "router.toml"\n', "http.tls"),
        ('[http.tls]\nca_file = "router.toml"\n', "http.tls.ca_file"),
    ],
)
def test_each_http_mistake_names_its_key(tmp_path: Path, http: str, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, http)
    assert key in [k for _, k, _ in err.value.problems], err.value.problems
