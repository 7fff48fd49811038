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

    def preassigned(self, patient_id: str) -> str | None:
        return None


def test_crosswalk_failure_propagates_as_queue_error(tmp_path: Path) -> None:
    deid = Deidentifier(DeidConfig(secret_file=tmp_path / "k"), Keys(b"k" * 32), DownCrosswalk())
    src = Path(str(get_testdata_file("CT_small.dcm", download=False)))
    with pytest.raises(QueueError):
        deid.deidentify_file(src, io.BytesIO())


def test_missing_source_is_an_os_error_not_a_quarantine(tmp_path: Path) -> None:
    deid = Deidentifier(DeidConfig(secret_file=tmp_path / "k"), Keys(b"k" * 32))
    with pytest.raises(OSError):
        deid.deidentify_file(tmp_path / "gone.dcm", io.BytesIO())
