"""Database or disk trouble during de-identification is retried, never mistaken for a bad instance."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file

from deid_router.config import DeidConfig
from deid_router.deid.engine import Deidentifier
from deid_router.deid.keys import Keys
from deid_router.errors import QueueError


class DownCrosswalk:
    def record(self, kind: str, original: str, pseudonym: str) -> None:
        raise QueueError("queue database error during crosswalk_record")


def test_crosswalk_failure_propagates_as_queue_error(tmp_path: Path) -> None:
    deid = Deidentifier(DeidConfig(secret_file=tmp_path / "k"), Keys(b"k" * 32), DownCrosswalk())
    src = Path(str(get_testdata_file("CT_small.dcm", download=False)))
    with pytest.raises(QueueError):
        deid.deidentify_file(src, io.BytesIO())


def test_missing_source_is_an_os_error_not_a_quarantine(tmp_path: Path) -> None:
    deid = Deidentifier(DeidConfig(secret_file=tmp_path / "k"), Keys(b"k" * 32))
    with pytest.raises(OSError):
        deid.deidentify_file(tmp_path / "gone.dcm", io.BytesIO())


def test_a_sequence_pydicom_cannot_parse_is_quarantined_not_retried(tmp_path: Path) -> None:
    """pydicom reports a malformed sequence as OSError ("No tag to read at file position"):
    it is the instance, not the disk, so it must be a DeidError (quarantine) rather than an
    error the worker retries forever. Found by the 3,000-example engine fuzz run."""
    import struct

    from deid_router.errors import DeidError

    src = Path(str(get_testdata_file("CT_small.dcm", download=False)))
    data = src.read_bytes()
    from pynetdicom.dsutils import split_dataset

    _meta, offset = split_dataset(src)
    # (0008,1140) Referenced Image Sequence, explicit VR, defined length 4: too short for an item
    bad_sq = struct.pack("<HH2sHL", 0x0008, 0x1140, b"SQ", 0, 4) + b"\x01\x02\x03\x04"
    # insert it in tag order: right after the last group-0008 element
    pos = offset
    while struct.unpack("<H", data[pos:pos + 2])[0] == 0x0008:
        vr = data[pos + 4:pos + 6]
        if vr in (b"OB", b"OW", b"SQ", b"UN", b"UT", b"UC", b"UR", b"OF", b"OD", b"OL", b"OV", b"SV", b"UV"):
            pos += 12 + struct.unpack("<L", data[pos + 8:pos + 12])[0]
        else:
            pos += 8 + struct.unpack("<H", data[pos + 6:pos + 8])[0]
    hostile = tmp_path / "bad-sq.dcm"
    hostile.write_bytes(data[:pos] + bad_sq + data[pos:])
    deid = Deidentifier(DeidConfig(secret_file=tmp_path / "k"), Keys(b"k" * 32))
    with pytest.raises(DeidError) as info:
        deid.deidentify_file(hostile, io.BytesIO())
    assert info.value.reason == "invalid_dataset"
