"""De-identification speed: deid-router fast path vs dicognito vs pydicom/deid, same files, same run.

Usage: .venv/bin/python bench/deid/run.py [--reps N]
Prints a table and writes it to bench/deid/RESULTS.md. Median ms per instance, read -> de-identify -> write.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from deid_router.config import DeidConfig  # noqa: E402
from deid_router.deid.engine import Deidentifier  # noqa: E402
from deid_router.deid.keys import Keys  # noqa: E402

HERE = Path(__file__).resolve().parent
warnings.simplefilter("ignore")


def make_ct(path: Path) -> None:
    """A 512x512 16-bit CT with a realistic identified header (about 120 elements)."""
    small = pydicom.dcmread(pydicom.data.get_testdata_file("CT_small.dcm"))
    ds = Dataset()
    for elem in small:
        if not elem.tag.is_private and elem.tag != 0x7FE00010:
            ds.add(elem)
    ds.file_meta = small.file_meta
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = "MUSTERMANN^ERIKA", "MRN0048213", "19640312"
    ds.PatientSex, ds.PatientAge, ds.AccessionNumber = "F", "061Y", "A2024031200123"
    ds.InstitutionName, ds.ReferringPhysicianName = "Klinikum Nord", "DOC^HOUSE"
    ds.StationName, ds.OperatorsName, ds.StudyDescription = "CT01", "TECH^ANNA", "CT THORAX KM"
    ds.SeriesDescription, ds.ProtocolName, ds.BodyPartExamined = "Thorax 1.0 B70f", "Thorax", "CHEST"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.FrameOfReferenceUID = generate_uid()
    ds.ReferencedImageSequence = [Dataset()]
    ds.ReferencedImageSequence[0].ReferencedSOPClassUID = ds.SOPClassUID
    ds.ReferencedImageSequence[0].ReferencedSOPInstanceUID = generate_uid()
    ds.add_new(0x00090010, "LO", "GEMS_IDEN_01")
    ds.add_new(0x00091001, "LO", "CT01_OC0")
    ds.Rows = ds.Columns = 512
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 1
    ds.PixelData = np.random.default_rng(1).integers(-1000, 2000, (512, 512), dtype=np.int16).tobytes()
    ds.save_as(path, enforce_file_format=True)


def timed(fn: Callable[[], object], reps: int) -> float:
    fn()  # warm-up
    samples = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t) * 1000)
    return statistics.median(samples)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=100)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="deid-bench-"))
    ct = work / "ct512.dcm"
    make_ct(ct)
    small = Path(pydicom.data.get_testdata_file("CT_small.dcm"))
    files = {"512x512 CT (identified header)": ct, "CT_small.dcm (128x128, 256 elements, GE private)": small}
    d = Deidentifier(DeidConfig(secret_file=work / "secret.key"), Keys(os.urandom(32)))
    tools: dict[str, Callable[[Path], Callable[[], object]] | str] = {}
    tools["deid-router (deidentify_file)"] = lambda p: (lambda: d.deidentify_file(p, io.BytesIO()))
    try:
        from dicognito.anonymizer import Anonymizer

        anon = Anonymizer()

        def dicognito_run(p: Path) -> Callable[[], object]:
            def run() -> None:
                ds = pydicom.dcmread(p)
                anon.anonymize(ds)
                ds.save_as(io.BytesIO())
            return run
        tools["dicognito " + __import__("dicognito").__version__] = dicognito_run
    except Exception as exc:  # noqa: BLE001
        tools["dicognito"] = f"not installed ({type(exc).__name__})"
    try:
        from deid.config import DeidRecipe
        from deid.dicom import replace_identifiers
        from deid.version import __version__ as deid_version

        recipe = DeidRecipe()

        def deid_run(p: Path) -> Callable[[], object]:
            def run() -> None:
                out = replace_identifiers(dicom_files=[str(p)], deid=recipe, save=False)
                out[0].save_as(io.BytesIO())
            return run
        tools["pydicom/deid " + deid_version] = deid_run
    except Exception as exc:  # noqa: BLE001
        tools["pydicom/deid"] = f"not installed ({type(exc).__name__})"

    rows = []
    load = os.getloadavg()
    for tool, factory in tools.items():
        cells = []
        for label, path in files.items():
            if isinstance(factory, str):
                cells.append(factory)
                continue
            reps = args.reps if tool.startswith("deid-router") else max(5, args.reps // 10)
            try:
                cells.append(f"{timed(factory(path), reps):.2f}")
            except Exception as exc:  # noqa: BLE001
                cells.append(f"failed ({type(exc).__name__})")
        rows.append((tool, cells))
    header = "| tool | " + " | ".join(files) + " |"
    lines = [
        "# De-identification speed (ms per instance, median; read -> de-identify -> write to memory)",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores shared, Python {platform.python_version()}, "
        f"pydicom {pydicom.__version__}. deid-router reps={args.reps}, others reps={max(5, args.reps // 10)}. "
        f"Load average at the start {load[0]:.1f}, at the end {os.getloadavg()[0]:.1f} "
        "(other engineers' test runs share the machine: compare rows of one run, not runs).",
        "",
        header,
        "|" + " --- |" * (len(files) + 1),
    ]
    lines += [f"| {tool} | " + " | ".join(cells) + " |" for tool, cells in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    (HERE / "RESULTS.md").write_text(text)


if __name__ == "__main__":
    main()
