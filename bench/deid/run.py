"""De-identification speed: deid-router vs dcmanon (Rust), dcm-anonymizer, dicognito and
pydicom/deid, same files, same run (peers: ``pip install .[bench]``).

Usage: .venv/bin/python bench/deid/run.py [--reps N] [--batch-files N] [--batch-rounds N]
Prints two tables and writes them to bench/deid/RESULTS.md:
- in-process: median ms per instance, read -> de-identify -> write (to memory where the API allows);
- offline batch: wall time of one whole command over N CT files (512x512x16), start-up
  included, divided by N: ``deid-router deidentify`` and, for each peer, its batch API or a
  loop over the files in one Python process (each peer's own documented fastest API).
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from deid_router.config import DeidConfig  # noqa: E402
from deid_router.deid.engine import Deidentifier  # noqa: E402
from deid_router.deid.keys import Keys  # noqa: E402
from deid_router.elements import Window, elements  # noqa: E402
from deid_router.scp.integrity import read_meta  # noqa: E402

HERE = Path(__file__).resolve().parent
NOTES = "## Notes (by hand"  # RESULTS.md from this heading on is kept when the tables are rewritten
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


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


BATCH_SCRIPTS = {
    # each peer's batch API, or a loop over the files in one process: argv = IN OUT
    "dcmanon": """
import sys, pathlib
from dcmanon import Anonymizer
a = Anonymizer()
out = pathlib.Path(sys.argv[2])
for p in sorted(pathlib.Path(sys.argv[1]).glob("*.dcm")):
    (out / p.name).write_bytes(a.anonymize(str(p)))
""",
    "dcm-anonymizer": """
import sys, pathlib
from dcm_anon import anonymize_path
anonymize_path(pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), salt="bench")
""",
    "dicognito": """
import sys, pathlib, warnings
warnings.simplefilter("ignore")
import pydicom
from dicognito.anonymizer import Anonymizer
a = Anonymizer()
out = pathlib.Path(sys.argv[2])
for p in sorted(pathlib.Path(sys.argv[1]).glob("*.dcm")):
    ds = pydicom.dcmread(p)
    a.anonymize(ds)
    ds.save_as(out / p.name)
""",
    "pydicom/deid": """
import sys, pathlib, warnings
warnings.simplefilter("ignore")
from deid.config import DeidRecipe
from deid.dicom import replace_identifiers
files = [str(p) for p in sorted(pathlib.Path(sys.argv[1]).glob("*.dcm"))]
replace_identifiers(dicom_files=files, deid=DeidRecipe(), save=True, output_folder=sys.argv[2], overwrite=True)
""",
}


SYNC_TAIL = """
import os, time
t = time.perf_counter()
os.sync()
print(f"sync_seconds {time.perf_counter() - t:.6f}")
"""


def batch_rows(work: Path, n: int, rounds: int) -> list[tuple[str, str, str]]:
    """ms per file of one whole command over ``n`` CT files, start-up included: as the tool
    leaves its outputs, and durable (deid-router syncs per chunk; peers get sync(2) at the end)."""
    src = work / "batch-in"
    src.mkdir()
    for i in range(n):
        make_ct(src / f"{i:05d}.dcm")
    config = work / "router.toml"
    config.write_text(
        f'[storage]\nroot = "{work / "var"}"\n[deid]\nsecret_file = "{work / "var" / "secret.key"}"\n'
        f'[[destinations]]\nname = "outbox"\ntype = "folder"\npath = "{work / "var" / "outbox"}"\n'
        '[[routes]]\nname = "all"\ndestinations = ["outbox"]\n'
    )
    exe = Path(sys.executable).with_name("deid-router")
    commands = {"deid-router (deidentify command)": [str(exe), "deidentify", str(src), "--out", "{out}",
                                                     "--config", str(config)]}
    for peer, script in BATCH_SCRIPTS.items():
        commands[peer] = [sys.executable, "-c", script + SYNC_TAIL, str(src), "{out}"]
    # Rounds alternate the tools, so that a burst of load from elsewhere hits them alike; each
    # row is the median of its rounds.
    runs: dict[str, list[tuple[float, float]]] = {tool: [] for tool in commands}
    failures: dict[str, str] = {}
    for _ in range(rounds):
        for tool, argv in commands.items():
            if tool in failures:
                continue
            out = work / "batch-out"
            out.mkdir()
            t = time.perf_counter()
            res = subprocess.run([a.replace("{out}", str(out)) for a in argv], capture_output=True, text=True)
            wall = time.perf_counter() - t
            written = sum(1 for _ in out.rglob("*.dcm"))
            shutil.rmtree(out)
            if res.returncode != 0 or written != n:
                last = (res.stderr.strip().splitlines() or ["?"])[-1][:80]
                failures[tool] = f"failed (exit {res.returncode}, {written}/{n} written: {last})"
                continue
            synced = [float(line.split()[1]) for line in res.stdout.splitlines() if line.startswith("sync_seconds ")]
            runs[tool].append((wall - (synced[0] if synced else 0.0), wall))
    shutil.rmtree(src)
    rows = []
    for tool, timings in runs.items():
        if tool in failures:
            rows.append((tool, failures[tool], failures[tool]))
        else:
            unsynced, durable = (statistics.median(t[i] for t in timings) for i in (0, 1))
            rows.append((tool, f"{unsynced * 1000 / n:.2f}", f"{durable * 1000 / n:.2f}"))
    return rows


def compile_bytecode() -> None:
    """Compile deid-router's modules as ``pip install`` does for the peers' wheels, so that the
    start-up counted is an installed tool's, not a source tree's under PYTHONDONTWRITEBYTECODE
    (which this machine sets: compiling the modules at every start costs about 0.15 s)."""
    import compileall

    compileall.compile_dir(str(Path(__file__).resolve().parents[2] / "deid_router"), quiet=1)


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
    ap.add_argument("--batch-files", type=int, default=1000, help="CT files for the offline batch row (0: skip)")
    ap.add_argument("--batch-rounds", type=int, default=3, help="runs of each batch command (the median is shown)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="deid-bench-"))
    ct = work / "ct512.dcm"
    make_ct(ct)
    small = Path(pydicom.data.get_testdata_file("CT_small.dcm"))
    files = {"512x512 CT (identified header)": ct, "CT_small.dcm (128x128, 256 elements, GE private)": small}
    d = Deidentifier(DeidConfig(secret_file=work / "secret.key"), Keys(os.urandom(32)))
    tools: dict[str, Callable[[Path], Callable[[], object]] | str] = {}
    tools["deid-router (deidentify_file)"] = lambda p: (lambda: d.deidentify_file(p, io.BytesIO()))

    def pydicom_round_trip(p: Path) -> Callable[[], object]:
        return lambda: pydicom.dcmread(p).save_as(io.BytesIO())
    # not a de-identifier: what reading and writing the file with pydicom alone costs (the floor
    # of any engine that works on pydicom datasets, as dicognito and pydicom/deid do)
    tools[f"reference: pydicom {pydicom.__version__} dcmread + save_as only"] = pydicom_round_trip

    def header_walk(p: Path) -> Callable[[], object]:
        def run() -> None:
            with open(p, "rb") as fp:
                size = os.fstat(fp.fileno()).st_size
                ts, start = read_meta(fp, size)
                for _ in elements(Window(fp, size, grow=True), start, size, ts == ImplicitVRLittleEndian):
                    pass
        return run
    # not a de-identifier either: reading the file and walking its element headers, nothing else
    # (what any engine in Python pays before it decides anything)
    tools["reference: read + walk the element headers only (deid_router.elements)"] = header_walk
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
        from dcmanon import Anonymizer as RustAnonymizer  # the API returns the output bytes

        rust = RustAnonymizer()
        tools["dcmanon " + _version("dcmanon")] = lambda p: (lambda: rust.anonymize(str(p)))
    except Exception as exc:  # noqa: BLE001
        tools["dcmanon"] = f"not installed ({type(exc).__name__})"
    try:
        from dcm_anon import anonymize_file
        from dcm_anon.uid_mapper import UIDMapper

        mapper = UIDMapper(salt="bench")
        shm = Path(tempfile.mkdtemp(prefix="deid-bench-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None))

        def dcm_anon_run(p: Path) -> Callable[[], object]:  # writes to a path only (tmpfs here)
            return lambda: anonymize_file(p, shm / "out.dcm", mapper)
        tools["dcm-anonymizer " + _version("dcm-anonymizer") + " (to tmpfs)"] = dcm_anon_run
    except Exception as exc:  # noqa: BLE001
        tools["dcm-anonymizer"] = f"not installed ({type(exc).__name__})"
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
    if args.batch_files:
        compile_bytecode()
        batch = batch_rows(work, args.batch_files, args.batch_rounds)
        lines += [
            "",
            f"## Offline batch (ms per file: wall time of one whole command over {args.batch_files} CT files "
            "512x512x16, start-up included, divided by the files; read -> de-identify -> write to disk; "
            f"median of {args.batch_rounds} rounds, the tools taking turns)",
            "",
            "deid-router: `deid-router deidentify IN --out OUT --config C` (default workers: the cores). "
            "Peers: dcmanon `Anonymizer().anonymize(path)` in a loop, dcm-anonymizer `anonymize_path(IN, OUT)`, "
            "dicognito `Anonymizer().anonymize(ds)` in a loop, pydicom/deid `replace_identifiers(files, save=True)`; "
            "each in one Python process. Durable: deid-router makes every chunk durable before it counts it "
            "(syncfs before and after the renames); the peers do not sync, so they get one sync(2) at the end.",
            "",
            "| tool | ms per file, as the tool leaves its outputs | ms per file, outputs durable |",
            "| --- | --- | --- |",
        ]
        lines += [f"| {tool} | {unsynced} | {durable} |" for tool, unsynced, durable in batch]
        lines.append(f"\nLoad average at the end of the batch rows {os.getloadavg()[0]:.1f}.")
    text = "\n".join(lines) + "\n"
    print(text)
    results = HERE / "RESULTS.md"
    old = results.read_text() if results.exists() else ""
    notes = old[old.index(NOTES):] if NOTES in old else ""  # what was written by hand stays
    results.write_text(text + ("\n" + notes if notes else ""))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
