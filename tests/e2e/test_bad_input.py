"""Hostile and broken input at the listener, as a PACS administrator would notice it.

Sent with a low-level pynetdicom SCU (tests/support/raw_scu.py) where storescu cannot: a
transfer aborted half way, a truncated data set, hostile lengths, a command that disagrees
with its data set, UIDs with path characters. For each: the modality gets a failure status
(never 0x0000 for something unreadable), no job is created, nothing is left on disk, and the
node keeps serving (echo answered, a following good instance delivered).
"""

from __future__ import annotations

import struct
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from deid_router.deid.keys import Keys
from tests.support.corpus import make_ct, make_series
from tests.support.fake_pacs import FakePacs
from tests.support.fault_harness import assert_no_stray_files, files_under, held_raw_files, uids_at
from tests.support.peers import storescu, storescu_acknowledged
from tests.support.raw_scu import RawSCU, dataset_bytes
from tests.support.router import RouterProcess, dicom_destination, wait_until

pytestmark = pytest.mark.e2e

CT = [(str(CTImageStorage), [str(ExplicitVRLittleEndian)])]
CT_CLASS, EVRLE = str(CTImageStorage), str(ExplicitVRLittleEndian)


def _ct(path: Path, uid: str, rows: int = 64) -> Path:
    return make_ct(path, "PIDBAD1", "HOSTILE^INPUT", "1.2.826.0.1.3680043.2.1", "1.2.826.0.1.3680043.2.2", uid, rows=rows, cols=rows)


def _router(tmp_path: Path, pacs: FakePacs, **kw: object) -> RouterProcess:
    return RouterProcess(
        tmp_path / "router", [dicom_destination("pacs", pacs.port, pacs.ae_title)],
        listener={"network_timeout_seconds": 5}, **kw,  # type: ignore[arg-type]
    )


def _no_jobs(router: RouterProcess) -> None:
    status = router.status()
    assert sum(status["jobs"].values()) == 0 and status["quarantined"] == 0, status


def _good_instance_still_delivered(router: RouterProcess, pacs: FakePacs, tmp_path: Path) -> None:
    good = make_series(tmp_path / "good", 1, rows=16, cols=16)
    with RawSCU(router.port, CT) as scu:
        assert scu.echo() == 0x0000
        assert scu.store_file(good[0]) == 0x0000
    router.wait_idle(30, expect_done=1)
    keys = Keys.load_or_create(router.secret_path)
    uid = str(pydicom.dcmread(good[0], stop_before_pixels=True).SOPInstanceUID)
    assert keys.uid(uid) in uids_at(pacs)


def test_abort_mid_transfer_and_truncated_data_set_leave_no_job_and_no_file(tmp_path: Path) -> None:
    big = _ct(tmp_path / "big.dcm", "1.2.826.0.1.3680043.2.3", rows=512)  # 512 KB of pixels
    data, sop_class, sop_uid, ts = dataset_bytes(big)
    with FakePacs(ae_title="PACS") as pacs, _router(tmp_path, pacs) as router:
        var = router.workdir / "var"
        with RawSCU(router.port, CT, max_pdu=16382) as scu:
            sent = scu.send_part_then_abort(data, sop_class, sop_uid, ts, fragments=8)
        assert sent == 8
        # the aborted transfer's partial raw file must not linger
        wait_until(lambda: held_raw_files(var) == [], 10, 0.2, "the aborted transfer's raw file to be removed")
        _no_jobs(router)

        with RawSCU(router.port, CT) as scu:
            for cut in (len(data) // 2, 300, len(data) - 3):  # in pixel data, in the header, last bytes
                status = scu.store(data[:cut], sop_class, sop_uid, ts)
                assert status is not None and status != 0x0000 and (status & 0xF000) in (0xA000, 0xC000), hex(status or 0)
        _no_jobs(router)
        assert held_raw_files(var) == []
        _good_instance_still_delivered(router, pacs, tmp_path)
        assert_no_stray_files(router)


def test_malformed_elements_and_hostile_lengths_get_a_failure_status(tmp_path: Path) -> None:
    src = _ct(tmp_path / "ct.dcm", "1.2.826.0.1.3680043.2.4", rows=16)
    data, sop_class, sop_uid, ts = dataset_bytes(src)
    huge = struct.pack("<HH2sHL", 0x0008, 0x0001, b"OB", 0, 0xFFFFFFF0) + b"\x01" * 32
    bad_vr = struct.pack("<HH2sH", 0x0008, 0x0002, b"\x00\x01", 4) + b"abcd"
    undefined_text = struct.pack("<HH2sHL", 0x0008, 0x0003, b"UT", 0, 0xFFFFFFFF) + b"x" * 16
    cases = {
        "4 GB length": huge + data,
        "invalid VR": bad_vr + data,
        "undefined length on text": undefined_text + data,
        "garbage after the data set": data + b"\xde\xad\xbe\xef" * 100,
        "garbage only": b"\x01\x02garbage" * 50,
    }
    with FakePacs(ae_title="PACS") as pacs, _router(tmp_path, pacs) as router:
        with RawSCU(router.port, CT) as scu:
            for name, payload in cases.items():
                started = time.monotonic()
                status = scu.store(payload, sop_class, sop_uid, ts)
                assert status is not None and status != 0x0000, name
                assert (status & 0xF000) in (0xA000, 0xC000), (name, hex(status))
                assert time.monotonic() - started < 5, f"{name}: took too long"
            assert scu.echo() == 0x0000
        _no_jobs(router)
        assert router.proc is not None and router.proc.poll() is None
        _good_instance_still_delivered(router, pacs, tmp_path)
        assert_no_stray_files(router)


def test_command_and_data_set_disagree_on_uids(tmp_path: Path) -> None:
    src = _ct(tmp_path / "ct.dcm", "1.2.826.0.1.3680043.2.5", rows=16)
    data, sop_class, sop_uid, ts = dataset_bytes(src)
    with FakePacs(ae_title="PACS") as pacs, _router(tmp_path, pacs) as router:
        with RawSCU(router.port, [*CT, ("1.2.840.10008.5.1.4.1.1.4", [EVRLE])]) as scu:
            other_instance = scu.store(data, sop_class, "1.2.826.0.1.3680043.2.999", ts)
            other_class = scu.store(data, "1.2.840.10008.5.1.4.1.1.4", sop_uid, ts)  # MR command, CT data
        assert other_instance is not None and other_instance & 0xF000 in (0xA000, 0xC000), other_instance
        assert other_class is not None and other_class & 0xF000 in (0xA000, 0xC000), other_class
        _no_jobs(router)
        assert_no_stray_files(router)
        assert pacs.received == []


@pytest.mark.parametrize(
    "uid",
    ["../../etc/passwd", "1.2.3/../../../x", "1.2.3\x00.4", "1." + "2" * 70],
    ids=["dotdot", "slashes", "nul", "over64"],
)
def test_hostile_uids_never_escape_var_nor_crash(tmp_path: Path, uid: str) -> None:
    src = _ct(tmp_path / "ct.dcm", "1.2.826.0.1.3680043.2.6", rows=16)
    ds = pydicom.dcmread(src)
    ds.SOPInstanceUID = uid
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.2.6"
    ds.save_as(src, enforce_file_format=True)
    data, sop_class, _uid, ts = dataset_bytes(src)
    before = set(files_under(tmp_path))
    with FakePacs(ae_title="PACS") as pacs, _router(tmp_path, pacs, storage={"root": "var"}) as router:
        outside_before = {p for p in files_under(tmp_path) if router.workdir not in p.parents}
        with RawSCU(router.port, CT) as scu:
            # pynetdicom refuses to put an over-long or NUL UID in a command: the command then
            # carries a valid UID and the data set the hostile one (a mismatch, also refused)
            command_uid = uid if len(uid) <= 64 and "\x00" not in uid else "1.2.826.0.1.3680043.2.6"
            status = scu.store(data, sop_class, command_uid, ts)
        assert status is not None
        if status == 0x0000:  # acknowledged: then it must be delivered under a keyed UID or quarantined
            router.wait_idle(30)
            keys = Keys.load_or_create(router.secret_path)
            assert set(uids_at(pacs)) <= {keys.uid(uid)}
        else:
            assert status & 0xF000 in (0xA000, 0xC000)
            _no_jobs(router)
        outside_after = {p for p in files_under(tmp_path) if router.workdir not in p.parents}
        assert outside_after == outside_before, outside_after - outside_before
        assert not Path("/etc/passwd.dcm").exists()
        assert router.proc is not None and router.proc.poll() is None
        _good_instance_still_delivered(router, pacs, tmp_path)
    assert before <= set(files_under(tmp_path))


def test_executable_preamble_never_reaches_an_output(tmp_path: Path) -> None:
    src = _ct(tmp_path / "in" / "poly.dcm", "1.2.826.0.1.3680043.2.7", rows=16)
    raw = bytearray(src.read_bytes())
    raw[:128] = (b"MZ\x90\x00" + b"\xcc" * 124)
    src.write_bytes(bytes(raw))
    store_dir = tmp_path / "pacs"
    store_dir.mkdir()
    with FakePacs(ae_title="PACS", store_dir=store_dir) as pacs:
        router = RouterProcess(
            tmp_path / "router",
            [dicom_destination("pacs", pacs.port, "PACS"), {"name": "outbox", "type": "folder", "path": "var/outbox"}],
        )
        with router:
            assert storescu_acknowledged(storescu("127.0.0.1", router.port, [src])) == 1
            router.wait_idle(30, expect_done=2)
        out_dir = tmp_path / "offline"
        res = subprocess.run(
            [sys.executable, "-m", "deid_router", "deidentify", str(src), "--out", str(out_dir), "--config", str(router.config_path)],
            capture_output=True, text=True, timeout=120,
        )
        assert res.returncode == 0, res.stdout + res.stderr
    outputs = files_under(store_dir) + files_under(router.workdir / "var" / "outbox") + files_under(out_dir)
    outputs = [p for p in outputs if p.suffix == ".dcm"]
    assert len(outputs) == 3, outputs
    for p in outputs:
        assert p.read_bytes()[:132] == b"\0" * 128 + b"DICM", p


def test_same_instance_twice_and_conflicting_content(tmp_path: Path) -> None:
    first = _ct(tmp_path / "a" / "one.dcm", "1.2.826.0.1.3680043.2.8", rows=16)
    changed = tmp_path / "b" / "one.dcm"
    changed.parent.mkdir()
    ds = pydicom.dcmread(first)
    ds.SeriesDescription = "DIFFERENT CONTENT"
    ds.save_as(changed, enforce_file_format=True)
    with FakePacs(ae_title="PACS") as pacs, _router(tmp_path, pacs) as router:
        assert storescu_acknowledged(storescu("127.0.0.1", router.port, [first])) == 1
        router.wait_idle(30, expect_done=1)
        assert storescu_acknowledged(storescu("127.0.0.1", router.port, [first])) == 1  # identical re-send
        assert storescu_acknowledged(storescu("127.0.0.1", router.port, [changed])) == 1  # same UID, new content
        status = router.wait_idle(30)
        keys = Keys.load_or_create(router.secret_path)
        assert uids_at(pacs) == {keys.uid("1.2.826.0.1.3680043.2.8"): 1}  # once, the first version
        assert status["quarantined"] == 1 and status["jobs"]["done"] == 1, status
        assert "conflict_same_sop_instance_uid" in router.cli("quarantine", "list").stdout


def test_sop_class_the_pacs_does_not_support_is_quarantined_others_flow(tmp_path: Path) -> None:
    series = make_series(tmp_path / "in", 3, rows=16, cols=16)
    mr = tmp_path / "in" / "mr.dcm"
    ds = pydicom.dcmread(series[0])
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.2.9"
    ds.Modality = "MR"
    ds.save_as(mr, enforce_file_format=True)
    with FakePacs(ae_title="PACS", sop_classes=[CT_CLASS]) as pacs, _router(tmp_path, pacs) as router:
        assert storescu_acknowledged(storescu("127.0.0.1", router.port, [tmp_path / "in"])) == 4
        status = router.wait_idle(30)
        assert status["jobs"]["done"] == 3 and status["jobs"]["failed"] == 1 and status["quarantined"] == 1, status
        keys = Keys.load_or_create(router.secret_path)
        expected = {keys.uid(str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)) for p in series}
        assert set(uids_at(pacs)) == expected
        assert "sop_class_not_accepted" in router.cli("quarantine", "list").stdout
