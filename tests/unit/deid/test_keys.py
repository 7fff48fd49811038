from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import pytest

from deid_router.deid.keys import Keys
from deid_router.errors import ConfigError

UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


def test_secret_file_created_0600_in_new_dirs_and_reloaded(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "secret.key"
    k1 = Keys.load_or_create(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert len(path.read_text().strip()) == 64
    k2 = Keys.load_or_create(path)
    assert k1.uid("1.2.3") == k2.uid("1.2.3")
    assert [p.name for p in path.parent.iterdir()] == ["secret.key"]  # no temp file left


def test_bad_secret_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "secret.key"
    path.write_text("nothex")
    with pytest.raises(ConfigError):
        Keys.load_or_create(path)


@pytest.mark.parametrize("original", ["1.2.3", "1.2.840.113619.2.55.3.604688119.969.1268071029.320", "", "x" * 200])
def test_uid_is_valid(original: str) -> None:
    uid = Keys(b"s" * 32).uid(original)
    assert len(uid) <= 64 and UID_RE.match(uid) and uid.startswith("2.25.")


def test_derivations_are_keyed_and_separated() -> None:
    a, b = Keys(b"a" * 32), Keys(b"b" * 32)
    assert a.uid("1.2.3") != b.uid("1.2.3")
    assert a.pseudonym("patient_id", "X", 10) != b.pseudonym("patient_id", "X", 10)
    assert a.pseudonym("patient_id", "X", 10) != a.pseudonym("accession_number", "X", 10)
    p = a.pseudonym("patient_id", "X", 60)
    assert len(p) == 60 and p.isalnum() and p.upper() == p
    assert a.token("uid", "1.2") != b.token("uid", "1.2") and len(a.token("uid", "1.2")) == 64
    offs = {a.day_offset(str(i), -10, -5) for i in range(200)}
    assert offs == set(range(-10, -4))


def test_encrypt_roundtrip_random_nonce_and_wrong_key_fails() -> None:
    a, b = Keys(b"a" * 32), Keys(b"b" * 32)
    blob = a.encrypt("DOE^JOHN")
    assert a.decrypt(blob) == "DOE^JOHN" and blob != a.encrypt("DOE^JOHN")
    assert b"DOE" not in blob
    with pytest.raises(Exception):
        b.decrypt(blob)
