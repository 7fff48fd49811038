"""Where pseudonyms are recorded and pre-assigned subject ids come from.

The engine only sees the ``Crosswalk`` protocol; the database-backed implementation lives
elsewhere. ``CsvPreassigned`` adds a clinical-trial mapping (PatientID -> SubjectID).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Protocol

from deid_router.errors import ConfigError


class Crosswalk(Protocol):
    def record(self, kind: str, original: str, pseudonym: str) -> None: ...

    def preassigned(self, patient_id: str) -> str | None: ...


class NullCrosswalk:
    """Records nothing and pre-assigns nothing."""

    def record(self, kind: str, original: str, pseudonym: str) -> None:
        return None

    def preassigned(self, patient_id: str) -> str | None:
        return None


def load_patient_mapping(path: Path) -> dict[str, str]:
    """Read a CSV with header ``PatientID,SubjectID``; other columns are ignored."""
    mapping: dict[str, str] = {}
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        fields = [f.strip() for f in (reader.fieldnames or [])]
        if "PatientID" not in fields or "SubjectID" not in fields:
            raise ConfigError([(str(path), "deid.patient_mapping_csv", "needs a header row PatientID,SubjectID")])
        for lineno, row in enumerate(reader, start=2):
            clean = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
            pid, sid = clean.get("PatientID", ""), clean.get("SubjectID", "")
            if not pid and not sid:
                continue
            if not pid or not sid or len(sid) > 64 or "\\" in sid:
                raise ConfigError([(str(path), f"line {lineno}", "PatientID and SubjectID (<= 64 chars, no backslash) are required")])
            if pid in mapping and mapping[pid] != sid:
                raise ConfigError([(str(path), f"line {lineno}", "PatientID mapped twice to different subjects")])
            mapping[pid] = sid
    return mapping


class CsvPreassigned:
    """Wraps another crosswalk; pre-assigned subject ids come from a CSV mapping."""

    def __init__(self, inner: Crosswalk, mapping: dict[str, str]) -> None:
        self.inner = inner
        self.mapping = mapping

    @classmethod
    def from_csv(cls, inner: Crosswalk, path: Path) -> CsvPreassigned:
        return cls(inner, load_patient_mapping(path))

    def record(self, kind: str, original: str, pseudonym: str) -> None:
        self.inner.record(kind, original, pseudonym)

    def preassigned(self, patient_id: str) -> str | None:
        found = self.mapping.get(patient_id)
        return found if found is not None else self.inner.preassigned(patient_id)
