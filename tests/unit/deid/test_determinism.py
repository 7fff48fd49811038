"""Same input + same secret in two processes -> byte-identical output; another secret shares nothing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pydicom

FILES = Path(os.path.dirname(pydicom.data.__file__)) / "test_files"
REPO = Path(__file__).resolve().parents[3]
SCRIPT = """
import sys
from pathlib import Path
from deid_router.config import DeidConfig
from deid_router.deid.engine import Deidentifier
from deid_router.deid.keys import Keys
secret, src, dst = sys.argv[1], sys.argv[2], sys.argv[3]
keys = Keys.load_or_create(Path(secret))
d = Deidentifier(DeidConfig(secret_file=Path(secret), options=("retain_long_modified_dates",)), keys)
with open(dst, "wb") as fh:
    d.deidentify_file(Path(src), fh)
"""


def _run(secret: Path, src: Path, dst: Path) -> bytes:
    subprocess.run([sys.executable, "-c", SCRIPT, str(secret), str(src), str(dst)], check=True, cwd=REPO,
                   env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    return dst.read_bytes()


def test_two_processes_same_secret_identical_other_secret_disjoint(tmp_path: Path) -> None:
    src = FILES / "CT_small.dcm"
    a = _run(tmp_path / "s1.key", src, tmp_path / "a.dcm")
    b = _run(tmp_path / "s1.key", src, tmp_path / "b.dcm")
    c = _run(tmp_path / "s2.key", src, tmp_path / "c.dcm")
    assert a == b
    da, dc = pydicom.dcmread(tmp_path / "a.dcm"), pydicom.dcmread(tmp_path / "c.dcm")

    def produced(ds: pydicom.Dataset) -> set[str]:
        out = set()
        for e in ds.iterall():
            if e.VR == "UI" and str(e.value).startswith("2.25."):
                out.add(str(e.value))
        out |= {str(ds.PatientID), str(ds.PatientName), str(ds.get("AccessionNumber", "")), str(ds.StudyDate)}
        return out - {""}

    assert not produced(da) & produced(dc)
    assert da.PatientID != dc.PatientID and da.StudyDate != dc.StudyDate
