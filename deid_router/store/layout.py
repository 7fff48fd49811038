"""Where output files go: the one place a path is built from UIDs.

Pure functions, no filesystem access. A UID becomes a path component only when it is a
syntactically valid UID (digits and dots, at most 64 characters), so a hostile value such as
``../../x`` (kept as it came under the Retain UIDs Option) can never leave the root; the
built path is checked to stay under the root all the same.
"""

from __future__ import annotations

import os
import re
import uuid
from pathlib import Path

from deid_router.errors import UnsafePathError

_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def is_uid(value: str) -> bool:
    """True when ``value`` is safe to use as a path component (a syntactically valid UID)."""
    return 0 < len(value) <= 64 and _UID_RE.match(value) is not None


def _under(root: Path, parts: list[str]) -> Path:
    path = root.joinpath(*parts)
    normal = os.path.normpath(path)
    base = os.path.normpath(root)
    if os.path.commonpath([base, normal]) != base or normal == base:
        raise UnsafePathError("path outside the output root")
    return Path(normal)


def instance_path(root: Path, study_uid: str, series_uid: str, sop_uid: str) -> Path:
    """``root/<study>/<series>/<sop>.dcm``; UnsafePathError when a UID is not a UID."""
    for name, uid in (("StudyInstanceUID", study_uid), ("SeriesInstanceUID", series_uid),
                      ("SOPInstanceUID", sop_uid)):
        if not is_uid(uid):
            raise UnsafePathError(f"{name} is not a valid UID, refused as a path component")
    return _under(root, [study_uid, series_uid, f"{sop_uid}.dcm"])


def temp_path(root: Path) -> Path:
    """A fresh hidden temporary file name directly under ``root``."""
    return _under(root, [f".{uuid.uuid4().hex}.dcm"])


def quarantine_paths(folder: Path) -> tuple[Path, Path]:
    """(copy of the input, its reason file) under the quarantine ``folder``, from a fresh id."""
    name = uuid.uuid4().hex
    return _under(folder, [f"{name}.dcm"]), _under(folder, [f"{name}.reason.txt"])
