"""``deid-router user add|remove|list``: works before the first serve, never stores the password."""

from __future__ import annotations

from pathlib import Path

import pytest

from deid_router.cli import main
from tests.support.configs import FOLDER_NODE


def test_user_add_list_remove_before_the_first_serve(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "router.toml"
    config.write_text(FOLDER_NODE, encoding="utf-8")
    pw = tmp_path / "pw"
    pw.write_text("correct horse battery\n", encoding="utf-8")
    assert not (tmp_path / "var").exists()
    assert main(["user", "add", "alice", "--role", "admin", "--password-file", str(pw), "--config", str(config)]) == 0
    assert main(["user", "--config", str(config), "add", "bob", "--role", "viewer", "--password-file", str(pw)]) == 0
    assert main(["user", "add", "alice", "--role", "viewer", "--password-file", str(pw), "--config", str(config)]) == 1
    db = (tmp_path / "var" / "queue.sqlite3").read_bytes()
    assert b"correct horse" not in db and b"$argon2id$" in db
    capsys.readouterr()
    assert main(["user", "list", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert [line.split("\t")[:2] for line in out.splitlines()] == [["alice", "admin"], ["bob", "viewer"]]
    assert main(["user", "remove", "bob", "--config", str(config)]) == 0
    assert main(["user", "remove", "bob", "--config", str(config)]) == 1


def test_user_add_refuses_a_short_password_and_a_missing_terminal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "router.toml"
    config.write_text(FOLDER_NODE, encoding="utf-8")
    pw = tmp_path / "pw"
    pw.write_text("short\n", encoding="utf-8")
    assert main(["user", "add", "alice", "--role", "admin", "--password-file", str(pw), "--config", str(config)]) == 2
    capsys.readouterr()
    assert main(["user", "add", "alice", "--role", "admin", "--config", str(config)]) == 2  # stdin is no tty here
    assert "--password-file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as usage:
        main(["user", "add", "x", "--role", "root", "--config", str(config)])
    assert usage.value.code == 2


def test_ctrl_d_at_the_password_prompt_adds_no_one_and_the_audit_names_the_login(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import getpass
    import sys

    config = tmp_path / "router.toml"
    config.write_text(FOLDER_NODE, encoding="utf-8")
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True)

    def eof(prompt: str = "") -> str:
        raise EOFError

    monkeypatch.setattr(getpass, "getpass", eof)
    assert main(["user", "add", "carol", "--role", "admin", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "no password given; no user added" in err and "Traceback" not in err

    # a service or a root shell without USER: the audit still names the login (LOGNAME, passwd)
    monkeypatch.delenv("USER", raising=False)
    monkeypatch.setenv("LOGNAME", "pacsadmin")
    pw = tmp_path / "pw"
    pw.write_text("correct horse battery\n", encoding="utf-8")
    assert main(["user", "add", "dave", "--role", "viewer", "--password-file", str(pw), "--config", str(config)]) == 0
    capsys.readouterr()
    assert main(["audit", "list", "--config", str(config)]) == 0
    assert "pacsadmin" in capsys.readouterr().out
