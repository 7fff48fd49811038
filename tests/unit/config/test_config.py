"""Bad configuration: each mistake gives exit 2 and a message naming the key."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from deid_router.cli import main
from deid_router.config import load_config

GOOD = """
[listener]
ae_title = "DEID_ROUTER"
port = 11112

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

[[destinations]]
name = "outbox"
type = "folder"
path = "var/outbox"

[[routes]]
name = "default"
destinations = ["pacs", "outbox"]
[routes.match]
modality = "CT"
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "router.toml"
    p.write_text(text, encoding="utf-8")
    return p


def check(path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(["check-config", "--config", str(path)])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_good_config_is_ok_and_paths_resolve_against_its_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, GOOD)
    code, out = check(path, capsys)
    assert code == 0, out
    cfg = load_config(path)
    assert cfg.storage.root == tmp_path / "var"
    assert cfg.queue.url == f"sqlite:///{tmp_path / 'var' / 'queue.sqlite3'}"
    assert cfg.destination("outbox").path == tmp_path / "var" / "outbox"
    assert cfg.routes[0].match == {"modality": "CT"}


@pytest.mark.parametrize(
    ("old", "new", "key"),
    [
        ('port = 11112', 'port = 11112\nprot = 1', "listener.prot"),  # typo: unknown key
        ('[deid]', '[deid]\noptions = ["retain_everything"]', "deid.options"),
        ('[deid]', '[deid]\nburned_in_annotation = "maybe"', "deid.burned_in_annotation"),
        ('destinations = ["pacs", "outbox"]', 'destinations = ["pacs", "nowhere"]', "routes[0].destinations"),
        ('port = 11112', 'port = "eleven"', "listener.port"),
        ('port = 4242', 'port = 70000', "destinations[0].port"),
        ('type = "dicom"', 'type = "ftp"', "destinations[0].type"),
        ('ae_title = "PACS"', 'ae_title = "THIS_AE_TITLE_IS_FAR_TOO_LONG"', "destinations[0].ae_title"),
        ('name = "outbox"', 'name = "pacs"', "destinations[1].name"),
        ('[routes.match]\nmodality = "CT"', '[routes.match]\nmodalty = "CT"', "routes[0].match.modalty"),
        ('[deid]', '[deid]\n[[deid.rules]]\ntag = "NotAKeyword"\naction = "keep"', "deid.rules[0].tag"),
        ('[deid]', '[deid]\n[[deid.rules]]\ntag = "PatientName"\naction = "replace"', "deid.rules[0].value"),
        ('[deid]', '[deid]\n[[deid.rules]]\ntag = "(0010,0010)"\naction = "obliterate"', "deid.rules[0].action"),
        ('[storage]', '[storage]\nkeep_raw_hours = -1', "storage.keep_raw_hours"),
        ('[storage]', '[queue]\nbusy_timeout_seconds = 0\n[storage]', "queue.busy_timeout_seconds"),
        ('port = 11112', 'port = 11112\nprocesses = -1', "listener.processes"),
        ('[storage]', '[queue]\nworker_nice = 20\n[storage]', "queue.worker_nice"),
    ],
)
def test_each_mistake_exits_2_naming_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], old: str, new: str, key: str
) -> None:
    assert old in GOOD
    path = write(tmp_path, GOOD.replace(old, new, 1))
    code, out = check(path, capsys)
    assert code == 2
    assert key in out
    assert "Traceback" not in out


def test_every_problem_is_reported_at_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = GOOD.replace("port = 11112", "port = 11112\nprot = 1").replace('type = "dicom"', 'type = "ftp"')
    code, out = check(write(tmp_path, text), capsys)
    assert code == 2
    assert "listener.prot" in out and "destinations[0].type" in out


def test_unreadable_and_missing_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = check(tmp_path / "absent.toml", capsys)
    assert code == 2 and "file not found" in out
    code, out = check(write(tmp_path, "[listener\n"), capsys)
    assert code == 2 and "not valid TOML" in out


def test_storage_root_that_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "afile").write_text("x")
    code, out = check(write(tmp_path, GOOD.replace('root = "var"', 'root = "afile/var"')), capsys)
    assert code == 2 and "storage.root" in out


def test_mapping_csv_must_exist(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = check(write(tmp_path, GOOD.replace("[deid]", '[deid]\npatient_mapping_csv = "nope.csv"')), capsys)
    assert code == 2 and "deid.patient_mapping_csv" in out


def test_config_from_environment_and_missing_config(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    env = {**os.environ, "DEID_ROUTER_CONFIG": str(path)}
    ok = subprocess.run([sys.executable, "-m", "deid_router", "check-config"], env=env, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    env.pop("DEID_ROUTER_CONFIG")
    bad = subprocess.run([sys.executable, "-m", "deid_router", "check-config"], env=env, capture_output=True, text=True)
    assert bad.returncode == 2
    assert "DEID_ROUTER_CONFIG" in bad.stderr and "Traceback" not in bad.stderr


def test_queue_url_env_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEID_ROUTER_QUEUE_URL", "postgresql+psycopg://postgres@127.0.0.1/test")
    assert load_config(write(tmp_path, GOOD)).queue.url.startswith("postgresql+psycopg://")


def test_usage_error_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["frobnicate"])
    assert exc.value.code == 2
