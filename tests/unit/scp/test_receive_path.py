"""The acknowledgement path reads each received file once, without pydicom: its answers must
be pydicom's, and the file meta it writes must be pydicom's bytes."""

from __future__ import annotations

import warnings
from pathlib import Path

import pydicom.data
import pytest
from pydicom import dcmread

from deid_router.scp.integrity import Malformed
from deid_router.scp.listener import read_complete_header
from deid_router.scp.receive import create_file_meta

TEST_FILES = sorted(Path(pydicom.data.__file__).parent.joinpath("test_files").rglob("*.dcm"))


def _pydicom_facts(path: Path) -> tuple[str, str, str] | None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ds = dcmread(path, stop_before_pixels=True)
            return str(ds.SOPClassUID), str(ds.SOPInstanceUID), str(ds.get("Modality", "") or "")
        except Exception:
            return None


@pytest.mark.parametrize("path", TEST_FILES, ids=lambda p: p.name)
def test_header_facts_match_pydicom_on_its_test_files(path: Path) -> None:
    """Each of pydicom's test files: the same SOP class, instance and modality as pydicom, or
    reported as skipped with the reason (never passed over in silence)."""
    if path.read_bytes()[128:132] != b"DICM":
        pytest.skip("no Part 10 prefix: not a file a C-STORE receive could produce")
    expected = _pydicom_facts(path)
    if expected is None:
        pytest.skip("pydicom cannot read its SOP class and instance either")
    try:
        got = read_complete_header(path)
    except Malformed:
        pytest.skip("refused as incomplete (the truncation and fuzz tests check refusals)")
    assert got == expected


def test_most_of_pydicoms_test_files_are_compared() -> None:
    comparable = 0
    for path in TEST_FILES:
        if path.read_bytes()[128:132] == b"DICM" and _pydicom_facts(path) is not None:
            try:
                read_complete_header(path)
            except Malformed:
                continue
            comparable += 1
    assert comparable >= 40, f"only {comparable} files compared"


def test_files_without_part10_prefix_are_refused(tmp_path: Path) -> None:
    bad = tmp_path / "nometa.dcm"
    bad.write_bytes(b"\0" * 200)
    with pytest.raises(Malformed):
        read_complete_header(bad)


@pytest.mark.parametrize("sop_instance", ["1.2.3.4", "1.2.3.45", "1.2.826.0.1.3680043.8.498." + "9" * 36])
def test_received_file_meta_bytes_are_pydicoms(sop_instance: str) -> None:
    import io

    from pydicom.filewriter import write_file_meta_info as pydicom_write
    from pynetdicom.dsutils import create_file_meta as pynetdicom_meta

    args = {"sop_class_uid": "1.2.840.10008.5.1.4.1.1.2", "sop_instance_uid": sop_instance,
            "transfer_syntax": "1.2.840.10008.1.2.4.50"}
    theirs = io.BytesIO()
    theirs.write(b"\0" * 128 + b"DICM")
    pydicom_write(theirs, pynetdicom_meta(**args))  # type: ignore[arg-type]
    assert create_file_meta(**args) == theirs.getvalue()
