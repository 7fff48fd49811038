"""The pydantic tables behind the configuration: what an operator can write is exactly what the
node reads, an absent key is the documented default, and a destination type is one model in
the registry."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest

from deid_router import config as c
from deid_router.cli import main
from deid_router.forward.registry import handler_for, types

MINIMAL = """
[[destinations]]
name = "outbox"
type = "folder"
path = "out"

[[routes]]
destinations = ["outbox"]
"""


def _keys(dataclass: type) -> set[str]:
    return {f.name for f in fields(dataclass)}


@pytest.mark.parametrize(
    ("table", "dataclass", "differences"),
    [
        (c.ListenerTable, c.ListenerConfig, set()),
        (c.ListenerTlsTable, c.ListenerTlsConfig, set()),
        (c.StorageTable, c.StorageConfig, set()),
        (c.QueueTable, c.QueueConfig, set()),
        (c.DeidTable, c.DeidConfig, set()),
        (c.RuleTable, c.DeidRule, set()),
        (c.ProfileTable, c.DeidConfig, {"secret_file", "scope"}),  # one secret; the scope is the profile's
        (c.RouteTable, c.RouteConfig, set()),
        (c.StorageCommitmentTable, c.StorageCommitmentConfig, set()),
        (c.PeerTable, c.CommitmentPeerConfig, set()),
        (c.AuditTable, c.AuditConfig, set()),
        (c.HttpTable, c.HttpConfig, {"tls", "cert_file", "key_file"}),  # [http.tls] holds the two files
    ],
)
def test_every_table_key_is_a_config_field_and_back(table: type[c.Table], dataclass: type, differences: set[str]) -> None:
    assert set(table.model_fields) ^ _keys(dataclass) == differences


def test_destination_types_together_have_every_destination_field() -> None:
    keys = set().union(*(t.model.model_fields for t in types()))
    assert keys == _keys(c.DestinationConfig)
    for t in types():
        assert handler_for(t.name) is t and t.model.type_name() == t.name


def test_an_absent_key_is_the_dataclass_default(tmp_path: Path) -> None:
    (tmp_path / "router.toml").write_text(MINIMAL, encoding="utf-8")
    cfg = c.load_config(tmp_path / "router.toml")
    assert cfg.listener == c.ListenerConfig()
    assert cfg.storage == c.StorageConfig(root=tmp_path / "var")
    assert cfg.queue == c.QueueConfig(url=f"sqlite:///{tmp_path / 'var' / 'queue.sqlite3'}")
    assert cfg.deid == c.DeidConfig(secret_file=tmp_path / "var" / "secret.key")
    assert cfg.destinations == (c.DestinationConfig(name="outbox", type="folder", path=tmp_path / "out"),)
    assert cfg.routes == (c.RouteConfig(name="route0", destinations=("outbox",)),)
    assert (cfg.http, cfg.audit, cfg.storage_commitment) == (c.HttpConfig(), c.AuditConfig(), c.StorageCommitmentConfig())
    assert cfg.profiles == ()
    assert isinstance(cfg.queue.retry_initial_seconds, float) and isinstance(cfg.listener.allowed_hosts, tuple)


def test_numbers_are_never_converted_from_text_but_ints_are_floats(tmp_path: Path) -> None:
    path = tmp_path / "router.toml"
    path.write_text("[queue]\nlease_seconds = 5\n" + MINIMAL, encoding="utf-8")
    assert c.load_config(path).queue.lease_seconds == 5.0
    path.write_text('[queue]\nlease_seconds = "5"\nworkers = true\n' + MINIMAL, encoding="utf-8")
    with pytest.raises(c.ConfigError) as err:
        c.load_config(path)
    assert sorted((k, r) for _, k, r in err.value.problems) == [
        ("queue.lease_seconds", "must be a float, got str"),
        ("queue.workers", "must be a int, got bool"),
    ]


def test_mistakes_in_several_tables_and_a_dangling_reference_are_reported_together(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = MINIMAL.replace('destinations = ["outbox"]', 'destinations = ["outbox", "pacs"]\nprofile = "trial"')
    text += '\n[listener]\nprot = 1\n[profiles.trial]\noptoins = []\n[[destinations]]\nname = "web"\ntype = "dicomweb"\nurl = "http://x"\nae_title = "PACS"\n'
    (tmp_path / "router.toml").write_text(text, encoding="utf-8")
    assert main(["check-config", "--config", str(tmp_path / "router.toml")]) == 2
    out = capsys.readouterr().err
    assert ": listener.prot: unknown key (allowed: ae_title, host, port," in out
    assert ": profiles.trial.optoins: unknown key (allowed: options," in out
    assert ": routes[0].destinations: names unknown destination 'pacs'" in out
    assert ": destinations[1].ae_title: is only allowed for type 'dicom'" in out
    assert "routes[0].profile" not in out  # the profile exists, though it has a mistake of its own
