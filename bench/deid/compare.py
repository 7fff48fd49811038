"""Byte-identity check of deidentify_file outputs across engine changes.

Usage:
  .venv/bin/python bench/deid/compare.py save DIR    # record outputs of the current engine
  .venv/bin/python bench/deid/compare.py check DIR   # compare the current engine with DIR

Inputs: every bundled pydicom test file (no download) plus a few synthetic variants of the
bench CT (implicit VR, big endian, odd cases), under several option sets. An input that
raises DeidError is recorded by its reason and attribute; other exceptions by their type.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import warnings
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_files
from pydicom.filewriter import dcmwrite
from pydicom.uid import ExplicitVRBigEndian, ImplicitVRLittleEndian

# DEID_ROOT: another checkout whose deid_router is compared (e.g. a copy of the old engine)
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, os.environ.get("DEID_ROOT", str(Path(__file__).resolve().parents[2])))
from deid_router.config import DeidConfig  # noqa: E402
from deid_router.deid.engine import Deidentifier  # noqa: E402
from deid_router.deid.keys import Keys  # noqa: E402
from deid_router.errors import DeidError  # noqa: E402
from bench.deid.run import make_ct  # noqa: E402  (imported after deid_router: it edits sys.path)

warnings.simplefilter("ignore")
SECRET = bytes(range(32))
OPTION_SETS: dict[str, dict[str, object]] = {
    "default": {},
    "forward": {"burned_in_annotation": "forward"},
    "retain": {"burned_in_annotation": "forward",
               "options": ("retain_uids", "retain_long_full_dates", "retain_patient_characteristics",
                           "retain_device_identity", "retain_institution_identity")},
    "clean": {"burned_in_annotation": "forward",
              "options": ("clean_descriptors", "clean_structured_content", "clean_graphics",
                          "retain_safe_private", "retain_long_modified_dates")},
}


def inputs(work: Path) -> list[Path]:
    """The bundled files plus synthetic ones, made once in ``work`` (they hold random UIDs)."""
    os.environ.setdefault("PYDICOM_NO_DOWNLOAD", "1")
    files = sorted(Path(p) for p in get_testdata_files()
                   if Path(p).is_file() and not p.endswith((".gz", ".bz2", ".zip", ".json")))
    names = ("ct512.dcm", "ct_implicit.dcm", "ct_big.dcm")
    if all((work / n).exists() for n in names):
        return files + [work / n for n in names]
    ct = work / "ct512.dcm"
    make_ct(ct)
    files.append(ct)
    ds = pydicom.dcmread(ct)
    for name, ts in (("ct_implicit.dcm", ImplicitVRLittleEndian), ("ct_big.dcm", ExplicitVRBigEndian)):
        v = pydicom.dcmread(ct)
        v.file_meta.TransferSyntaxUID = ts
        if ts == ExplicitVRBigEndian:
            v.PixelData = bytes(v.PixelData)  # written as OW, bytes as they are
        p = work / name
        if ts == ExplicitVRBigEndian:
            dcmwrite(p, v, implicit_vr=False, little_endian=False, enforce_file_format=True)
        else:
            v.save_as(p, enforce_file_format=True)
        files.append(p)
    del ds
    return files


def run_one(d: Deidentifier, path: Path) -> str:
    out = io.BytesIO()
    try:
        d.deidentify_file(path, out)
    except DeidError as exc:
        return f"DeidError {exc.args!r}"[:300]
    except Exception as exc:  # noqa: BLE001
        return f"{type(exc).__name__}"
    return hashlib.sha256(out.getvalue()).hexdigest()


def collect(work: Path) -> dict[str, str]:
    res: dict[str, str] = {}
    files = inputs(work)
    for opt_name, kw in OPTION_SETS.items():
        d = Deidentifier(DeidConfig(secret_file=work / "k", **kw), Keys(SECRET))  # type: ignore[arg-type]
        for p in files:
            res[f"{opt_name}:{p.name}"] = run_one(d, p)
            # a second run through the same instance (caches warm) must give the same bytes
            again = run_one(d, p)
            if again != res[f"{opt_name}:{p.name}"]:
                res[f"{opt_name}:{p.name}"] += " NONDETERMINISTIC"
    return res


def main() -> None:
    mode, target = sys.argv[1], Path(sys.argv[2])
    work = target / "inputs"
    work.mkdir(parents=True, exist_ok=True)
    import deid_router.deid.file_io as used

    print("engine:", used.__file__)
    res = collect(work)
    if mode == "save":
        target.mkdir(parents=True, exist_ok=True)
        (target / "hashes.json").write_text(json.dumps(res, indent=1, sort_keys=True))
        ok = sum(1 for v in res.values() if len(v) == 64)
        print(f"saved {len(res)} cases ({ok} written, {len(res) - ok} refused)")
        return
    ref = json.loads((target / "hashes.json").read_text())
    bad = [k for k in sorted(set(ref) | set(res)) if ref.get(k) != res.get(k)]
    for k in bad:
        print(f"DIFF {k}: ref={ref.get(k)} now={res.get(k)}")
    ok = sum(1 for v in res.values() if len(v) == 64)
    print(f"{len(res)} cases ({ok} written), {len(bad)} differ")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
