"""The router end to end with real peers: dcmtk storescu sends, dcmtk storescp and Orthanc receive.

Each test asserts what a PACS administrator would see: what arrives at the PACS (counted by
SOP Instance UID), that it is de-identified, and what ``deid-router status`` says.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pydicom
import pytest

from deid_router.deid.keys import Keys
from tests.support.corpus import make_series
from tests.support.fault_harness import held_raw_files
from tests.support.peers import StoreSCP, storescu, storescu_acknowledged
from tests.support.router import RouterProcess, dicom_destination, free_port, wait_until

pytestmark = pytest.mark.e2e


def _uid_of(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def _pixel_bytes(path: Path) -> bytes | None:
    ds = pydicom.dcmread(path)
    for kw in ("PixelData", "FloatPixelData", "DoubleFloatPixelData", "WaveformSequence"):
        if kw in ds:
            el = ds[kw]
            return el.value if isinstance(el.value, bytes) else repr(el.value).encode()
    return None


def _copy_inputs(files: dict[str, Path], dest: Path) -> dict[str, Path]:
    dest.mkdir(parents=True)
    out = {}
    for name, src in files.items():
        target = dest / f"{name}.dcm"
        shutil.copyfile(src, target)
        out[name] = target
    return out


def test_mixed_corpus_arrives_deidentified_at_storescp_and_orthanc(
    tmp_path: Path, corpus: dict[str, Path], storescp: StoreSCP, orthanc: Any
) -> None:
    inputs = _copy_inputs(corpus, tmp_path / "in")
    router = RouterProcess(
        tmp_path / "router",
        [
            dicom_destination("scp", storescp.port, storescp.ae_title),
            dicom_destination("orthanc", orthanc.dicom_port, orthanc.ae_title),
        ],
        # secondary captures carry no BurnedInAnnotation: this site vouches for them
        deid={"burned_in_annotation": "forward"},
    )
    with router:
        res = storescu("127.0.0.1", router.port, [tmp_path / "in"])
        assert storescu_acknowledged(res) == len(inputs), res.stdout + res.stderr
        status = router.wait_idle(180, expect_done=2 * len(inputs))
    assert status["jobs"]["failed"] == 0 and status["quarantined"] == 0

    keys = Keys.load_or_create(router.secret_path)
    expected = {keys.uid(_uid_of(p)) for p in inputs.values()}
    assert dict(storescp.sop_instance_uids()) == {u: 1 for u in expected}
    assert set(orthanc.sop_instance_uids()) == expected

    received = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID): f for f in storescp.files()}
    for name, src in inputs.items():
        original = pydicom.dcmread(src, stop_before_pixels=True)
        out_path = received[keys.uid(str(original.SOPInstanceUID))]
        out = pydicom.dcmread(out_path, stop_before_pixels=True)
        assert out.PatientIdentityRemoved == "YES", name
        if original.get("PatientID"):
            assert out.PatientID != original.PatientID, name
        if original.get("PatientName"):
            assert str(out.PatientName) != str(original.PatientName), name
        assert out.StudyInstanceUID == keys.uid(str(original.StudyInstanceUID)), name
        assert _pixel_bytes(out_path) == _pixel_bytes(src), f"{name}: pixel data changed"

    # RT references still resolve: dose -> plan, plan -> structure set, through the same keyed map
    def ref(name: str, seq: str) -> str:
        ds = pydicom.dcmread(inputs[name], stop_before_pixels=True)
        return str(getattr(ds, seq)[0].ReferencedSOPInstanceUID)

    for name, seq in (("rtdose", "ReferencedRTPlanSequence"), ("rtplan", "ReferencedStructureSetSequence")):
        if name not in inputs:
            continue
        out = pydicom.dcmread(received[keys.uid(_uid_of(inputs[name]))], stop_before_pixels=True)
        assert str(getattr(out, seq)[0].ReferencedSOPInstanceUID) == keys.uid(ref(name, seq))


def test_sigkill_mid_run_then_resend_delivers_every_acknowledged_instance_once(
    tmp_path: Path, storescp: StoreSCP
) -> None:
    series = make_series(tmp_path / "in", 200, rows=64, cols=64)
    router = RouterProcess(tmp_path / "router", [dicom_destination("scp", storescp.port, storescp.ae_title)])
    router.start()
    sender = subprocess.Popen(
        ["storescu", "-v", "-nh", "+sd", "+r", "-aec", "DEID_ROUTER", "-aet", "MODALITY", "127.0.0.1", str(router.port), str(tmp_path / "in")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={"TCP_NODELAY": "1", "PATH": "/usr/bin:/bin"},
    )
    var = router.workdir / "var"
    wait_until(lambda: len(held_raw_files(var)) >= 40, 60, 0.02, "40 instances held")
    router.kill()
    first_out, _ = sender.communicate(timeout=60)
    acknowledged_first = first_out.count("Received Store Response (Success)")
    assert 0 < acknowledged_first < 200

    router.start()
    res = storescu("127.0.0.1", router.port, [tmp_path / "in"])  # the modality re-sends
    assert storescu_acknowledged(res) == 200, res.stdout[-2000:]
    router.wait_idle(180, expect_done=200)
    router.stop()

    keys = Keys.load_or_create(router.secret_path)
    expected = {keys.uid(_uid_of(p)) for p in series}
    at_pacs = storescp.sop_instance_uids()
    assert set(at_pacs) == expected  # every instance, none under a second, different UID
    assert len(at_pacs) == 200


def test_pacs_down_while_instances_arrive_then_delivered_when_back(tmp_path: Path) -> None:
    pacs_port = free_port()
    series = make_series(tmp_path / "in", 50, rows=32, cols=32)
    router = RouterProcess(
        tmp_path / "router",
        [dicom_destination("pacs", pacs_port, "PACS", connect_timeout_seconds=1)],
        queue={"retry_initial_seconds": 0.5, "retry_max_seconds": 3, "max_attempts": 1000},
    )
    with router:
        res = storescu("127.0.0.1", router.port, [tmp_path / "in"])
        assert storescu_acknowledged(res) == 50
        wait_until(lambda: router.status()["jobs"]["retrying"] > 0, 30, 0.3, "jobs retrying")
        assert router.status()["jobs"]["done"] == 0
        with StoreSCP(tmp_path / "pacs", ae_title="PACS", port=pacs_port) as pacs:
            status = router.wait_idle(60, expect_done=50)
            assert status["jobs"]["done"] == 50 and status["quarantined"] == 0
            keys = Keys.load_or_create(router.secret_path)
            assert set(pacs.sop_instance_uids()) == {keys.uid(_uid_of(p)) for p in series}


def test_calling_ae_not_allowed_is_rejected_at_association(tmp_path: Path, storescp: StoreSCP) -> None:
    series = make_series(tmp_path / "in", 1, rows=16, cols=16)
    router = RouterProcess(
        tmp_path / "router",
        [dicom_destination("scp", storescp.port, storescp.ae_title)],
        listener={"allowed_calling_aets": ["CT_SCANNER"]},
    )
    with router:
        bad = storescu("127.0.0.1", router.port, series, calling_aet="INTRUDER")
        assert bad.returncode != 0
        assert "Association Rejected" in bad.stdout + bad.stderr
        wrong_called = storescu("127.0.0.1", router.port, series, calling_aet="CT_SCANNER", called_aet="NOT_ME")
        assert "Association Rejected" in wrong_called.stdout + wrong_called.stderr
        good = storescu("127.0.0.1", router.port, series, calling_aet="CT_SCANNER")
        assert storescu_acknowledged(good) == 1
        router.wait_idle(60, expect_done=1)
    assert len(storescp.sop_instance_uids()) == 1


def test_no_phi_in_logs_status_or_quarantine(tmp_path: Path, storescp: StoreSCP) -> None:
    planted = {
        "PatientName": "Sentinelname^Plantedgiven",
        "PatientID": "PLANTEDPID4711",
        "AccessionNumber": "PLANTEDACC0815",
        "InstitutionName": "Planted Memorial Hospital",
        "ReferringPhysicianName": "Plantedreferrer^Doc",
    }
    series = make_series(tmp_path / "in", 3, rows=16, cols=16)
    # one more that will be quarantined (burned-in annotation), so quarantine output is checked too
    for i, p in enumerate(series):
        ds = pydicom.dcmread(p)
        for kw, val in planted.items():
            setattr(ds, kw, val)
        if i == 0:
            ds.BurnedInAnnotation = "YES"
        if i == 2:  # an invalid UID makes pydicom warn, quoting it: that must not reach the log
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.PLANTEDUIDVALUE"
        ds.save_as(p)
    router = RouterProcess(tmp_path / "router", [dicom_destination("scp", storescp.port, storescp.ae_title)])
    with router:
        res = storescu("127.0.0.1", router.port, [tmp_path / "in"])
        assert storescu_acknowledged(res) == 3
        status = router.wait_idle(60)
        assert status["quarantined"] == 1 and status["jobs"]["done"] == 2
        outputs = [router.cli("status").stdout, router.cli("quarantine", "list").stdout]
        qid = outputs[1].split()[0].split("=")[1]
        outputs.append(router.cli("quarantine", "show", qid).stdout)
    texts = [router.log_text(), *outputs]
    uids = [_uid_of(p) for p in series]
    for text in texts:
        for value in [*planted.values(), *uids, "Sentinelname", "Plantedgiven", "PLANTEDUIDVALUE"]:
            assert value not in text
    for f in storescp.files():
        raw = f.read_bytes()
        for value in planted.values():
            assert value.encode() not in raw


def test_status_json_shape(tmp_path: Path) -> None:
    router = RouterProcess(tmp_path / "router", [{"name": "outbox", "type": "folder", "path": "var/outbox"}])
    with router:  # the database exists once the node has started: status never creates one (issue 13)
        status = router.status()
    assert set(status) >= {"jobs", "destinations", "quarantined"}  # v2 may add keys, never remove one
    assert status["paused"] == []
    for state in ("queued", "running", "retrying", "done", "failed"):
        assert status["jobs"][state] == 0
    assert status["quarantined"] == 0


def test_folder_destination_layout_and_sigterm_exit(tmp_path: Path) -> None:
    series = make_series(tmp_path / "in", 5, rows=16, cols=16)
    router = RouterProcess(tmp_path / "router", [{"name": "outbox", "type": "folder", "path": "var/outbox"}])
    router.start()
    res = storescu("127.0.0.1", router.port, [tmp_path / "in"])
    assert storescu_acknowledged(res) == 5
    router.wait_idle(60, expect_done=5)
    start = time.monotonic()
    assert router.terminate() == 0
    assert time.monotonic() - start < 30
    keys = Keys.load_or_create(router.secret_path)
    files = sorted((router.workdir / "var" / "outbox").rglob("*.dcm"))
    assert len(files) == 5
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        assert f.relative_to(router.workdir / "var" / "outbox").parts == (
            ds.StudyInstanceUID, ds.SeriesInstanceUID, f"{ds.SOPInstanceUID}.dcm"
        )
        assert ds.PatientIdentityRemoved == "YES"
        assert f.read_bytes()[:128] == b"\x00" * 128
    assert {keys.uid(_uid_of(p)) for p in series} == {f.stem for f in files}


def test_parallel_associations_to_one_destination(tmp_path: Path) -> None:
    """destination max_associations = 2: two associations at once, each instance sent once."""
    from tests.support.fake_pacs import FakePacs

    series = make_series(tmp_path / "in", 40, rows=16, cols=16)
    with FakePacs(delay=0.05) as pacs:
        router = RouterProcess(
            tmp_path / "router",
            [dicom_destination("pacs", pacs.port, pacs.ae_title, max_associations=2)],
            queue={"batch_size": 4},
        )
        with router:
            assert storescu_acknowledged(storescu("127.0.0.1", router.port, [tmp_path / "in"])) == 40
            router.wait_idle(60, expect_done=40)
        keys = Keys.load_or_create(router.secret_path)
        received = [uid for uid, _ts, _t in pacs.received]
        assert sorted(received) == sorted(keys.uid(_uid_of(p)) for p in series)  # each exactly once
        assert pacs.associations >= 2
