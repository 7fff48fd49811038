"""The acknowledgement path reads each received file once, without pydicom: its answers must
be pydicom's, and the digest taken while receiving must be the file's."""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import pydicom.data
import pytest
from pydicom import dcmread

from deid_router.scp.integrity import Malformed
from deid_router.scp.listener import GuardedReceiveFile, read_complete_header

TEST_FILES = sorted(Path(pydicom.data.__file__).parent.joinpath("test_files").rglob("*.dcm"))


def _pydicom_facts(path: Path) -> tuple[str, str, str] | None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ds = dcmread(path, stop_before_pixels=True)
            return str(ds.SOPClassUID), str(ds.SOPInstanceUID), str(ds.get("Modality", "") or "")
        except Exception:
            return None


def test_header_facts_match_pydicom_on_its_test_files() -> None:
    compared = 0
    for path in TEST_FILES:
        expected = _pydicom_facts(path)
        if expected is None or path.read_bytes()[128:132] != b"DICM":
            continue  # not a Part 10 file a C-STORE receive could produce
        try:
            got = read_complete_header(path)
        except Malformed:
            continue  # refused as incomplete: checked by the truncation and fuzz tests
        assert got == expected, path.name
        compared += 1
    assert compared >= 40, f"only {compared} files compared"


def test_files_without_part10_prefix_are_refused(tmp_path: Path) -> None:
    bad = tmp_path / "nometa.dcm"
    bad.write_bytes(b"\0" * 200)
    with pytest.raises(Malformed):
        read_complete_header(bad)


def test_digest_taken_while_receiving_is_the_files(tmp_path: Path) -> None:
    recv = GuardedReceiveFile(dir=str(tmp_path), delete=False, mode="wb", suffix=".dcm")
    chunks = [b"\0" * 128, b"DICM", bytes(range(256)) * 2000, b"x" * 300_000, b"tail"]
    for chunk in chunks:
        recv.write(chunk)
        recv.file.flush()
    recv.close()
    content = Path(recv.name).read_bytes()
    assert content == b"".join(chunks)
    assert recv.sha256() == hashlib.sha256(content).hexdigest()
