"""[storage_commitment] and [audit]: mistakes exit 2 naming the key; the defaults are what the README says."""

from __future__ import annotations

from pathlib import Path

import pytest

from deid_router.config import load_config
from tests.unit.config.test_config import GOOD, check, write


@pytest.mark.parametrize(
    ("table", "key"),
    [
        ('[storage_commitment]\ncommitment = "maybe"', "storage_commitment.commitment"),
        ('[storage_commitment]\ncomitment = "held"', "storage_commitment.comitment"),
        ('[[storage_commitment.peers]]\nae_title = "MODALITY"\nhost = "127.0.0.1"', "storage_commitment.peers[0].port"),
        ('[[storage_commitment.peers]]\nae_title = "MODALITY"\nhost = "h"\nport = 70000', "storage_commitment.peers[0].port"),
    ],
)
def test_each_commitment_mistake_exits_2_naming_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], table: str, key: str
) -> None:
    code, out = check(write(tmp_path, GOOD + "\n" + table + "\n"), capsys)
    assert code == 2, out
    assert key in out


def test_commitment_is_on_by_default_and_means_durably_held(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, GOOD))
    assert cfg.storage_commitment.enabled
    assert cfg.storage_commitment.commitment == "held"
    assert cfg.storage_commitment.peers == ()


@pytest.mark.parametrize(
    ("table", "key"),
    [
        ('[audit]\nsyslog_url = "http://collector:514"', "audit.syslog_url"),
        ('[audit]\nsyslog = "udp://collector:514"', "audit.syslog"),
        ('[audit]\nsyslog_url = "tls://collector:6514"\nca_file = "missing-ca.crt"', "audit.ca_file"),
    ],
)
def test_each_audit_mistake_exits_2_naming_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], table: str, key: str
) -> None:
    code, out = check(write(tmp_path, GOOD + "\n" + table + "\n"), capsys)
    assert code == 2, out
    assert key in out
