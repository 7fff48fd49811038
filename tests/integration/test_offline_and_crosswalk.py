"""Offline `deidentify` and the crosswalk commands, as a data custodian would use them."""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
from pathlib import Path

import pydicom

from deid_router.db.engine import make_engine
from deid_router.db.repository import JobRepository
from deid_router.deid.keys import Keys
from tests.support.corpus import make_series
from tests.support.router import render_toml

REPO = Path(__file__).resolve().parents[2]


def _config(tmp_path: Path, **deid: object) -> Path:
    doc = {
        "storage": {"root": "var"},
        "deid": {"secret_file": "var/secret.key", **deid},
        "destinations": [{"name": "outbox", "type": "folder", "path": "var/outbox"}],
        "routes": [{"name": "all", "destinations": ["outbox"]}],
    }
    path = tmp_path / "router.toml"
    path.write_text(render_toml(doc), encoding="utf-8")
    return path


def _cli(*args: str, config: Path, user: str = "custodian") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "deid_router", args[0], "--config", str(config), *args[1:]],
        capture_output=True, text=True, cwd=REPO, timeout=300, env={**os.environ, "USER": user},
    )


def test_offline_deidentify_folder_with_quarantine_and_progress(tmp_path: Path) -> None:
    config = _config(tmp_path)
    inputs = make_series(tmp_path / "in", 6, patients=2, rows=16, cols=16)
    burned = pydicom.dcmread(inputs[0])
    burned.BurnedInAnnotation = "YES"
    burned.save_as(inputs[0])
    (tmp_path / "in" / "README.txt").write_text("not dicom")
    out = tmp_path / "export" / "out"

    res = _cli("deidentify", str(tmp_path / "in"), "--out", str(out), "--workers", "2", config=config)
    assert res.returncode == 1, res.stderr  # one input was quarantined
    assert "6/7" in res.stderr or "7/7" in res.stderr  # progress shown
    outputs = sorted(out.rglob("*.dcm"))
    assert len(outputs) == 5
    keys = Keys.load_or_create(tmp_path / "var" / "secret.key")
    expected = {keys.uid(str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)) for p in inputs[1:]}
    assert {p.stem for p in outputs} == expected
    for p in outputs:
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        assert ds.PatientIdentityRemoved == "YES"
        assert p.read_bytes()[:128] == b"\0" * 128
    reasons = list((tmp_path / "export" / "quarantine").glob("*.reason.txt"))
    assert len(reasons) == 1 and "burned_in_annotation" in reasons[0].read_text()
    # the same inputs again: identical outputs (same keys), nothing new
    again = _cli("deidentify", str(tmp_path / "in"), "--out", str(out), config=config)
    assert again.returncode == 1
    assert sorted(out.rglob("*.dcm")) == outputs


def test_dry_run_shows_the_plan_without_writing(tmp_path: Path) -> None:
    config = _config(tmp_path)
    (src,) = make_series(tmp_path / "in", 1, rows=16, cols=16)
    res = _cli("deidentify", str(src), "--out", str(tmp_path / "out"), "--dry-run", config=config)
    assert res.returncode == 0, res.stderr
    assert "PatientName" in res.stdout and "SOPInstanceUID" in res.stdout
    assert not (tmp_path / "out").exists()


def test_missing_input_is_a_clear_error(tmp_path: Path) -> None:
    res = _cli("deidentify", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), config=_config(tmp_path))
    assert res.returncode == 2 and "input not found" in res.stderr and "Traceback" not in res.stderr


def test_crosswalk_lookup_and_export_are_audited(tmp_path: Path) -> None:
    config = _config(tmp_path)
    inputs = make_series(tmp_path / "in", 4, patients=2, rows=16, cols=16)
    assert _cli("deidentify", str(tmp_path / "in"), "--out", str(tmp_path / "out"), config=config).returncode == 0
    originals = {str(pydicom.dcmread(p, stop_before_pixels=True).PatientID) for p in inputs}
    pseudonyms = {str(pydicom.dcmread(p, stop_before_pixels=True).PatientID) for p in (tmp_path / "out").rglob("*.dcm")}
    assert len(originals) == len(pseudonyms) == 2

    pseudonym = sorted(pseudonyms)[0]
    found = _cli("crosswalk", "lookup", pseudonym, config=config, user="dr_custodian")
    assert found.returncode == 0, found.stderr
    assert any(line.split("\t")[1].split(" (issuer")[0] in originals for line in found.stdout.splitlines())
    assert _cli("crosswalk", "lookup", "NO-SUCH", config=config).returncode == 1

    export = _cli("crosswalk", "export", config=config)
    assert export.returncode == 0, export.stderr
    rows = list(csv.DictReader(io.StringIO(export.stdout)))
    assert {r["original"] for r in rows if r["kind"] == "patient_id"} == originals

    repo = JobRepository(make_engine(f"sqlite:///{tmp_path / 'var' / 'queue.sqlite3'}"))
    actions = [(a[1], a[2]) for a in repo.audit_events()]
    assert ("crosswalk_lookup", "dr_custodian") in actions
    assert any(a == "crosswalk_export" for a, _ in actions)
    # originals are encrypted at rest: no original PatientID appears in the database file
    raw = (tmp_path / "var" / "queue.sqlite3").read_bytes()
    wal = tmp_path / "var" / "queue.sqlite3-wal"
    raw += wal.read_bytes() if wal.exists() else b""
    for original in originals:
        assert original.encode() not in raw


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.dcm"))}


def test_worker_chunks_and_in_process_write_the_same_files_and_the_whole_crosswalk(tmp_path: Path) -> None:
    """40 inputs (more than one worker's share: chunks spread over two processes) against the
    same inputs de-identified in this process: byte-identical outputs, identical quarantine and
    exit code, and every pseudonym the engine produced is in each run's crosswalk."""
    from deid_router.config import load_config
    from deid_router.db.crosswalk import export_crosswalk
    from deid_router.deid.engine import Deidentifier

    inputs = make_series(tmp_path / "in", 40, patients=5, rows=16, cols=16)
    burned = pydicom.dcmread(inputs[7])
    burned.BurnedInAnnotation = "YES"
    burned.save_as(inputs[7])
    runs = {}
    for name, workers in (("in_process", "1"), ("pool", "2")):
        home = tmp_path / name
        home.mkdir()
        config = _config(home)
        if name == "pool":  # the same secret: outputs must not depend on how the batch ran
            (home / "var").mkdir()
            (home / "var" / "secret.key").write_bytes((tmp_path / "in_process" / "var" / "secret.key").read_bytes())
        res = _cli("deidentify", str(tmp_path / "in"), "--out", str(home / "out"), "--workers", workers,
                   config=config)
        assert res.returncode == 1, res.stderr  # one quarantined
        assert "40/40" in res.stderr and "39 de-identified" in res.stdout and "1 quarantined" in res.stdout
        repo = JobRepository(make_engine(f"sqlite:///{home / 'var' / 'queue.sqlite3'}"))
        keys = Keys.load_or_create(home / "var" / "secret.key")
        export = io.StringIO()
        export_crosswalk(repo, keys, export, actor="test")
        rows = {(r["kind"], r["pseudonym"], r["original"], r["issuer"]) for r in csv.DictReader(io.StringIO(export.getvalue()))}
        reasons = [p.read_text().split("\n")[1] for p in (tmp_path / name / "quarantine").glob("*.reason.txt")]
        runs[name] = (_tree(home / "out"), rows, reasons, load_config(config), keys)

    (files_a, rows_a, reasons_a, config, keys), (files_b, rows_b, reasons_b, _, _) = runs["in_process"], runs["pool"]
    assert len(files_a) == 39 and files_a == files_b
    assert reasons_a == reasons_b == ["reason: burned_in_annotation"]

    # what the engine itself writes and records, file by file, without the batch machinery
    recorded: list[tuple[str, str, str]] = []

    class Recording:
        def record(self, kind: str, original: str, pseudonym: str) -> None:
            recorded.append((kind, original, pseudonym))

    deid = Deidentifier(config.deid, keys, Recording())
    direct = {}
    for src in inputs[:7] + inputs[8:]:
        buf = io.BytesIO()
        r = deid.deidentify_file(src, buf)
        direct[f"{r.study_instance_uid}/{r.series_instance_uid}/{r.sop_instance_uid}.dcm"] = buf.getvalue()
    assert direct == files_a
    expected = {(k, p) for k, _, p in recorded}
    assert {(k, p) for k, p, _, _ in rows_a} == {(k, p) for k, p, _, _ in rows_b} == expected
    assert {o for k, _, o, _ in rows_b if k == "patient_id"} == {
        str(pydicom.dcmread(p, stop_before_pixels=True).PatientID) for p in inputs[:7] + inputs[8:]
    }
    assert len(rows_b) == len(expected)  # each pseudonym once, however many chunks saw it


def test_hostile_uid_with_retain_uids_writes_nothing_outside_out(tmp_path: Path) -> None:
    config = _config(tmp_path, options=["retain_uids"])
    good, bad = make_series(tmp_path / "in", 2, rows=16, cols=16)
    hostile = pydicom.dcmread(bad)
    hostile.StudyInstanceUID = "../../x"  # kept as it came under the Retain UIDs Option
    hostile.save_as(bad)
    out = tmp_path / "export" / "out"
    res = _cli("deidentify", str(tmp_path / "in"), "--out", str(out), config=config)
    assert res.returncode == 1, res.stderr  # the hostile input is quarantined, the other delivered
    assert [p.name for p in out.rglob("*.dcm")] == [f"{pydicom.dcmread(good).SOPInstanceUID}.dcm"]
    assert not (tmp_path / "x").exists() and not (tmp_path / "export" / "x").exists()
    written = {p.relative_to(tmp_path).parts[:2] for p in tmp_path.rglob("*") if p.is_file() and tmp_path / "in" not in p.parents}
    assert written <= {("router.toml",), ("var", "secret.key"),
                       ("var", "queue.sqlite3"), ("var", "queue.sqlite3-wal"), ("var", "queue.sqlite3-shm"),
                       ("export", "out"), ("export", "quarantine")}, written
    (reason,) = (tmp_path / "export" / "quarantine").glob("*.reason.txt")
    text = reason.read_text()
    assert "invalid_uid_for_path" in text and "../../x" not in text


def test_a_different_secret_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    config = _config(tmp_path)
    make_series(tmp_path / "in", 2, rows=16, cols=16)
    assert _cli("deidentify", str(tmp_path / "in"), "--out", str(tmp_path / "first"), config=config).returncode == 0
    (tmp_path / "var" / "secret.key").write_text(os.urandom(32).hex() + "\n")  # a mistyped/restored-wrong secret
    res = _cli("deidentify", str(tmp_path / "in"), "--out", str(tmp_path / "second"), config=config)
    assert res.returncode == 2 and "fingerprint" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "second").exists()


def test_offline_start_up_loads_neither_the_server_nor_the_orm(tmp_path: Path) -> None:
    """What makes one file take well under a second: the command imports the engine, the
    configuration and SQLAlchemy Core for the crosswalk and the secret check, nothing else."""
    config = _config(tmp_path)
    make_series(tmp_path / "in", 1, rows=16, cols=16)
    probe = (
        "import sys\n"
        "from deid_router.cli import main\n"
        f"rc = main(['deidentify', {str(tmp_path / 'in')!r}, '--out', {str(tmp_path / 'out')!r},"
        f" '--config', {str(config)!r}])\n"
        "heavy = ('sqlalchemy.orm', 'deid_router.db.models', 'deid_router.db.repository', 'pynetdicom',"
        " 'apscheduler', 'alembic', 'deid_router.app', 'deid_router.http')\n"
        "print(rc, sorted(m for m in sys.modules if m.startswith(heavy)))\n"
    )
    # the first run creates the queue database (Alembic and the models are the migrations' own)
    first = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert first.stdout.strip().splitlines()[-1].startswith("0 "), first.stdout + first.stderr
    # every later run finds it current and the fingerprint recorded: nothing of the server or the ORM
    again = subprocess.run([sys.executable, "-c", probe.replace("'out'", "'out2'")], capture_output=True,
                           text=True, cwd=tmp_path, timeout=120)
    assert again.stdout.strip().splitlines()[-1] == "0 []", again.stdout + again.stderr
    assert len(list((tmp_path / "out").rglob("*.dcm"))) == 1


def test_offline_patient_mapping_gives_subject_ids_and_quarantines_the_unmapped(tmp_path: Path) -> None:
    """A clinical trial's PatientID -> SubjectID mapping, read once by the engine of each
    worker: mapped patients get their subject id (also in the crosswalk), others are refused."""
    inputs = make_series(tmp_path / "in", 6, patients=3, rows=16, cols=16)
    pids = sorted({str(pydicom.dcmread(p, stop_before_pixels=True).PatientID) for p in inputs})
    assert len(pids) == 3
    mapping = tmp_path / "subjects.csv"
    mapping.write_text(f"PatientID,SubjectID\n{pids[0]},TRIAL-001\n{pids[1]},TRIAL-002\n", encoding="utf-8")
    config = _config(tmp_path, patient_mapping_csv=str(mapping))
    out = tmp_path / "export" / "out"
    res = _cli("deidentify", str(tmp_path / "in"), "--out", str(out), "--workers", "2", config=config)
    assert res.returncode == 1, res.stderr  # the unmapped patient's instances are quarantined
    written = [pydicom.dcmread(p, stop_before_pixels=True) for p in out.rglob("*.dcm")]
    by_subject: dict[str, int] = {}
    for ds in written:
        by_subject[str(ds.PatientID)] = by_subject.get(str(ds.PatientID), 0) + 1
        assert str(ds.PatientName) == f"ANON^{ds.PatientID}"
    unmapped = sum(1 for p in inputs if str(pydicom.dcmread(p, stop_before_pixels=True).PatientID) == pids[2])
    assert set(by_subject) == {"TRIAL-001", "TRIAL-002"} and sum(by_subject.values()) == len(inputs) - unmapped
    reasons = [p.read_text() for p in (tmp_path / "export" / "quarantine").glob("*.reason.txt")]
    assert len(reasons) == unmapped and all("unmapped_patient" in r and pids[2] not in r for r in reasons)
    engine = make_engine(f"sqlite:///{tmp_path / 'var' / 'queue.sqlite3'}")
    try:
        assert {p for _, p, _ in JobRepository(engine).crosswalk_all()} >= {"TRIAL-001", "TRIAL-002"}
    finally:
        engine.dispose()
