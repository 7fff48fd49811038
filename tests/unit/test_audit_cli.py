"""``deid-router audit list``: the audit trail newest first, read from the node's existing
database only (a wrong ``--config`` creates nothing), in the forms the README writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deid_router.cli import main
from tests.support.configs import FOLDER_NODE


def _config(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "router.toml"
    path.write_text(FOLDER_NODE, encoding="utf-8")
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_audit_list_on_a_missing_database_is_exit_2_and_creates_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _config(tmp_path / "typo")
    code, out, err = run(capsys, "audit", "list", "--config", str(config))
    assert code == 2, (out, err)
    assert f"no queue database at {tmp_path / 'typo' / 'var' / 'queue.sqlite3'}" in err, err
    assert sorted(p.name for p in (tmp_path / "typo").iterdir()) == ["router.toml"]  # no var/, no secret


def test_admin_actions_show_in_audit_list_with_their_user_newest_first(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = str(_config(tmp_path))
    pw = tmp_path / "pw"
    pw.write_text("correct horse battery\n", encoding="utf-8")
    monkeypatch.setenv("USER", "carol")
    assert main(["user", "add", "alice", "--role", "admin", "--password-file", str(pw), "--config", config]) == 0
    monkeypatch.setenv("USER", "dave")
    assert main(["user", "remove", "alice", "--config", config]) == 0
    capsys.readouterr()
    db = tmp_path / "var" / "queue.sqlite3"
    mtime = db.stat().st_mtime_ns

    code, out, err = run(capsys, "audit", "list", "--config", config)
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 2
    assert lines[0].split()[3:6] == ["dave", "user_remove", "user=alice"]
    assert lines[1].split()[3:7] == ["carol", "user_add", "user=alice", "role=admin"]
    assert lines[0].endswith("user=alice") and " UTC " in lines[0]

    for argv in (["audit", "list", "--config", config, "--limit", "1", "--json"],
                 ["--config", config, "audit", "list", "--json", "--limit", "1"],
                 ["audit", "--config", config, "list", "--limit", "1", "--json"]):
        code, out, err = run(capsys, *argv)
        assert code == 0, (argv, err)
        (record,) = json.loads(out)
        assert (record["user"], record["action"], record["detail"]) == ("dave", "user_remove", "user=alice")
        assert record["at"].endswith("+00:00")
    code, out, _ = run(capsys, "audit", "list", "--limit", "0", "--json", "--config", config)
    assert [r["action"] for r in json.loads(out)] == ["user_remove", "user_add"]
    code, _, err = run(capsys, "audit", "list", "--limit", "-1", "--config", config)
    assert code == 2 and "--limit" in err
    assert db.stat().st_mtime_ns == mtime  # reading the trail wrote nothing to it
