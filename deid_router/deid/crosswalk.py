"""Where pseudonyms are recorded, and the clinical-trial mapping (PatientID -> SubjectID).

The engine only sees the ``Crosswalk`` protocol; the database-backed implementation lives
elsewhere. The mapping CSV is read by :func:`load_patient_mapping`, once, by the engine that
uses it (``deid.patient_mapping_csv``); no crosswalk holds a copy.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Protocol

from deid_router.deid.keys import Keys
from deid_router.errors import ConfigError


class Crosswalk(Protocol):
    def record(self, kind: str, original: str, pseudonym: str) -> None: ...


class NullCrosswalk:
    """Records nothing."""

    def record(self, kind: str, original: str, pseudonym: str) -> None:
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


def crosswalk_token(keys: Keys, kind: str, original: str) -> str:
    """The keyed token the crosswalk table is unique on (with ``kind``), never the original."""
    return keys.token(f"crosswalk:{kind}", original)


CrosswalkRow = tuple[str, str, str, bytes]  # kind, token, pseudonym, original encrypted


class BufferedCrosswalk:
    """A ``Crosswalk`` that keeps its rows for the caller to store in batches.

    The offline batch de-identifies in worker processes that never open the database: each
    hands its rows back with a chunk's results (``take``) and the parent stores them with
    ``JobRepository.crosswalk_record_many``, one transaction per chunk.
    """

    def __init__(self, keys: Keys) -> None:
        self._keys = keys
        self._seen: set[tuple[str, str]] = set()
        self._rows: list[CrosswalkRow] = []

    def record(self, kind: str, original: str, pseudonym: str) -> None:
        token = crosswalk_token(self._keys, kind, original)
        if (kind, token) in self._seen:
            return
        self._rows.append((kind, token, pseudonym, self._keys.encrypt(original)))
        self._seen.add((kind, token))

    def take(self) -> list[CrosswalkRow]:
        """The rows recorded since the last call (each ``(kind, token)`` once per buffer)."""
        rows, self._rows = self._rows, []
        return rows
