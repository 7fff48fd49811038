"""DicomDestination against a real pynetdicom SCP that fails on demand, and against dcmtk storescp."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.filereader import read_preamble
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from deid_router.forward.base import Delivery
from deid_router.forward.dicom import DicomDestination, group_by_contexts
from deid_router.jobs.outcome import OutcomeKind
from tests.integration.forward.forward_fixtures import bundled, copies, delivery_for, dicom_cfg
from tests.support.fake_pacs import FakePacs
from tests.support.peers import StoreSCP, free_port

D, W, R, P = OutcomeKind.DELIVERED, OutcomeKind.DELIVERED_WARNING, OutcomeKind.RETRY, OutcomeKind.PERMANENT
U = OutcomeKind.UNAVAILABLE


def _dest(port: int, ae_title: str = "FAKEPACS", **kw: float) -> DicomDestination:
    return DicomDestination(dicom_cfg(port, ae_title, **kw), calling_ae_title="DEID_ROUTER", idle_seconds=2.0)


def test_success_delivers_every_item_over_one_association(tmp_path: Path) -> None:
    items = copies(bundled("CT_small.dcm"), tmp_path / "in", 20)
    with FakePacs() as pacs:
        dest = _dest(pacs.port)
        try:
            outcomes = dest.send(items)
        finally:
            dest.close()
        assert {o.kind for o in outcomes.values()} == {D}
        assert set(outcomes) == {i.job_id for i in items}
        assert sorted(uid for uid, _, _ in pacs.received) == sorted(i.sop_instance_uid for i in items)
        assert pacs.associations == 1


def test_association_is_reused_across_batches_then_released_when_idle(tmp_path: Path) -> None:
    items = copies(bundled("CT_small.dcm"), tmp_path / "in", 6)
    with FakePacs() as pacs:
        dest = _dest(pacs.port)
        try:
            dest.send(items[:3])
            dest.send(items[3:])
            assert pacs.associations == 1
            time.sleep(2.5)  # idle_seconds=2: released, next batch opens a new one
            dest.send(items[:1])
            assert pacs.associations == 2
        finally:
            dest.close()


@pytest.mark.parametrize("status", [0xB000, 0xB006, 0xB007])
def test_warnings_are_delivered(tmp_path: Path, status: int) -> None:
    items = copies(bundled("CT_small.dcm"), tmp_path / "in", 2)
    with FakePacs(status=status) as pacs:
        dest = _dest(pacs.port)
        try:
            outcomes = dest.send(items)
        finally:
            dest.close()
    assert all(o.kind is W and o.status_code == status and o.delivered for o in outcomes.values())


@pytest.mark.parametrize(
    ("status", "kind"), [(0xA700, R), (0xA900, P), (0xC000, P), (0x0122, P), (0xA771, P)]
)
def test_failure_statuses(tmp_path: Path, status: int, kind: OutcomeKind) -> None:
    items = copies(bundled("CT_small.dcm"), tmp_path / "in", 3)
    with FakePacs(status=status) as pacs:
        dest = _dest(pacs.port)
        try:
            outcomes = dest.send(items)
        finally:
            dest.close()
        # A failure status ends that item only: the others are still sent.
        assert len(pacs.received) == 3
    assert all(o.kind is kind and o.status_code == status for o in outcomes.values())
    assert all(o.reason == f"status_0x{status:04X}" for o in outcomes.values())


def test_out_of_resources_then_success_on_retry(tmp_path: Path) -> None:
    items = copies(bundled("CT_small.dcm"), tmp_path / "in", 1)
    with FakePacs(status=lambda n: 0xA700 if n == 0 else 0x0000) as pacs:
        dest = _dest(pacs.port)
        try:
            first = dest.send(items)[1]
            second = dest.send(items)[1]
        finally:
            dest.close()
    assert (first.kind, second.kind) == (R, D)


def test_connection_refused_makes_the_destination_unavailable(tmp_path: Path) -> None:
    items = copies(bundled("CT_small.dcm"), tmp_path / "in", 3)
    dest = _dest(free_port())
    try:
        started = time.monotonic()
        outcomes = dest.send(items)
    finally:
        dest.close()
    assert time.monotonic() - started < 2.0
    assert all(o.kind is U and o.reason == "connection_refused" for o in outcomes.values())


@pytest.mark.parametrize(
    ("reject", "kind", "reason"),
    [
        (("permanent", 7), U, "association_rejected_permanent:called_ae_not_recognized"),
        (("permanent", 3), U, "association_rejected_permanent:calling_ae_not_recognized"),
        (("transient", 1), U, "association_rejected_transient:temporary_congestion"),
        (("transient", 2), U, "association_rejected_transient:local_limit_exceeded"),
    ],
)
def test_rejections(tmp_path: Path, reject: tuple[str, int], kind: OutcomeKind, reason: str) -> None:
    items = copies(bundled("CT_small.dcm"), tmp_path / "in", 2)
    with FakePacs(reject=reject) as pacs:
        dest = _dest(pacs.port)
        try:
            outcomes = dest.send(items)
        finally:
            dest.close()
        assert pacs.received == []
    assert all(o.kind is kind and o.reason == reason for o in outcomes.values())


def test_pacs_that_never_answers_frees_the_worker(tmp_path: Path) -> None:
    items = copies(bundled("CT_small.dcm"), tmp_path / "in", 4)
    with FakePacs(never_respond=True) as pacs:
        dest = _dest(pacs.port, dimse_timeout_seconds=2.0)
        try:
            started = time.monotonic()
            outcomes = dest.send(items)
            elapsed = time.monotonic() - started
        finally:
            dest.close()
    assert elapsed < 5.0
    assert outcomes[items[0].job_id].kind is R and outcomes[items[0].job_id].reason == "dimse_timeout"
    assert all(outcomes[i.job_id].reason == "association_lost" for i in items[1:])
    assert all(outcomes[i.job_id].kind is U for i in items[1:])  # never tried: no attempt spent


def test_sop_class_not_accepted_is_permanent(tmp_path: Path) -> None:
    items = copies(bundled("CT_small.dcm"), tmp_path / "in", 2)
    mr = "1.2.840.10008.5.1.4.1.1.4"
    with FakePacs(sop_classes=[mr]) as pacs:
        dest = _dest(pacs.port)
        try:
            outcomes = dest.send(items)
        finally:
            dest.close()
    assert all(o.kind is P and o.reason == "sop_class_not_accepted" for o in outcomes.values())


def test_mixed_batch_only_refused_class_fails(tmp_path: Path, one_file: Callable[[str], Path]) -> None:
    ct = delivery_for(one_file("CT_small.dcm"), 1)
    mr = delivery_for(one_file("MR_small.dcm"), 2)
    with FakePacs(sop_classes=[mr.sop_class_uid]) as pacs:
        dest = _dest(pacs.port)
        try:
            outcomes = dest.send([ct, mr])
        finally:
            dest.close()
    assert outcomes[1].kind is P and outcomes[1].reason == "sop_class_not_accepted"
    assert outcomes[2].kind is D


@pytest.mark.parametrize("name", ["MR_small_jpeg_ls_lossless.dcm", "MR_small_RLE.dcm", "MR_small_jp2klossless.dcm"])
def test_compressed_instance_falls_back_to_little_endian(
    tmp_path: Path, one_file: Callable[[str], Path], name: str
) -> None:
    src = one_file(name)
    item = delivery_for(src, 7)
    store = tmp_path / "pacs"
    store.mkdir()
    le = [str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian)]
    with FakePacs(accepted_transfer_syntaxes=le, store_dir=store) as pacs:
        dest = _dest(pacs.port)
        try:
            outcome = dest.send([item])[7]
        finally:
            dest.close()
        assert outcome.kind is D
        assert pacs.received[0][1] in le
    got = dcmread(store / f"{item.sop_instance_uid}.dcm")
    assert got.SOPInstanceUID == item.sop_instance_uid  # decompression must not mint a new UID
    assert not got.file_meta.TransferSyntaxUID.is_compressed
    assert np.array_equal(got.pixel_array, dcmread(src).pixel_array)


def test_own_syntax_is_used_when_accepted(tmp_path: Path, one_file: Callable[[str], Path]) -> None:
    item = delivery_for(one_file("MR_small_jpeg_ls_lossless.dcm"), 1)
    with FakePacs() as pacs:
        dest = _dest(pacs.port)
        try:
            assert dest.send([item])[1].kind is D
        finally:
            dest.close()
        assert pacs.received[0][1] == item.transfer_syntax_uid


def test_big_endian_without_accepted_syntax_is_permanent(tmp_path: Path, one_file: Callable[[str], Path]) -> None:
    item = delivery_for(one_file("MR_small_bigendian.dcm"), 1)
    le = [str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian)]
    with FakePacs(accepted_transfer_syntaxes=le) as pacs:
        dest = _dest(pacs.port)
        try:
            outcome = dest.send([item])[1]
        finally:
            dest.close()
    assert outcome.kind is P and outcome.reason.startswith("transfer_syntax_not_accepted")


def test_context_groups_respect_the_128_limit(tmp_path: Path) -> None:
    items = copies(bundled("CT_small.dcm"), tmp_path / "in", 1)
    base = items[0]
    many = [
        type(base)(job_id=i, path=base.path, sop_class_uid=f"1.2.3.{i}", sop_instance_uid=base.sop_instance_uid,
                   study_instance_uid=base.study_instance_uid, series_instance_uid=base.series_instance_uid,
                   transfer_syntax_uid="1.2.840.10008.1.2.4.50")
        for i in range(100)
    ]
    groups = group_by_contexts(many)
    assert [len(g) for g in groups] == [42, 42, 16]  # 3 contexts per SOP class


def _dataset_bytes(path: Path) -> bytes:
    """The data set part of a Part-10 file (everything after the file meta group)."""
    from pynetdicom.dsutils import split_dataset

    _, offset = split_dataset(path)
    return path.read_bytes()[offset:]


@pytest.mark.e2e
def test_dcmtk_storescp_receives_files_byte_for_byte(
    tmp_path: Path, storescp: StoreSCP, one_file: Callable[[str], Path]
) -> None:
    items = copies(bundled("CT_small.dcm"), tmp_path / "ct", 10)
    # One file per transfer syntax, each with its own SOPInstanceUID (the MR_small variants share one).
    for k, name in enumerate(["MR_small_jpeg_ls_lossless.dcm", "JPGExtended.dcm", "MR_small_implicit.dcm",
                              "MR_small_RLE.dcm"]):
        items += copies(bundled(name), tmp_path / f"f{k}", 1, first_job_id=100 + k)
    dest = _dest(storescp.port, ae_title=storescp.ae_title)
    try:
        outcomes = dest.send(items)
    finally:
        dest.close()
    assert {o.kind for o in outcomes.values()} == {D}, outcomes
    storescp.wait_for_instances(len(items), timeout=30)
    received = {}
    for f in storescp.files():
        ds = dcmread(f, stop_before_pixels=True)
        received[str(ds.SOPInstanceUID)] = f
    for item in items:
        got = received[item.sop_instance_uid]
        assert str(dcmread(got, stop_before_pixels=True).file_meta.TransferSyntaxUID) == item.transfer_syntax_uid
        assert _dataset_bytes(got) == _dataset_bytes(item.path)


def test_undecodable_compressed_instance_is_permanent(tmp_path: Path) -> None:
    from pydicom.encaps import encapsulate

    item = copies(bundled("MR_small_jpeg_ls_lossless.dcm"), tmp_path / "in", 1)[0]
    ds = dcmread(item.path)
    ds.PixelData = encapsulate([b"\xff\xd8 not a codestream \xff\xd9"])
    ds.save_as(item.path, enforce_file_format=True)
    le = [str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian)]
    with FakePacs(accepted_transfer_syntaxes=le) as pacs:
        dest = _dest(pacs.port)
        try:
            outcome = dest.send([item])[1]
        finally:
            dest.close()
        assert pacs.received == []
    assert outcome.kind is P and outcome.reason == "transfer_syntax_not_accepted:decompression_failed"


def test_logs_carry_no_uids(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    items = copies(bundled("CT_small.dcm"), tmp_path / "in", 3)
    with FakePacs(status=lambda n: 0xA700 if n == 1 else 0xB000) as pacs:
        dest = _dest(pacs.port)
        try:
            dest.send(items)
        finally:
            dest.close()
    out = capsys.readouterr()
    text = out.out + out.err
    assert "forward_batch_sent" in text and "0xA700" in text
    for item in items:
        for uid in (item.sop_instance_uid, item.study_instance_uid, item.series_instance_uid):
            assert uid not in text


def test_pacs_dropping_an_idle_association_gets_the_item_again_on_a_new_one(tmp_path: Path) -> None:
    """FailureRule.reopen_once: the PACS aborts the association we kept open between batches
    when the next C-STORE arrives; that item is resent at once on a new association."""
    items = copies(bundled("CT_small.dcm"), tmp_path / "in", 6)
    with FakePacs(abort_when_idle=0.5) as pacs:
        dest = _dest(pacs.port)  # idle_seconds=2: the association is kept across the pause
        try:
            first = dest.send(items[:3])
            time.sleep(1.0)
            second = dest.send(items[3:])
        finally:
            dest.close()
        assert pacs.aborted == 1
        assert pacs.associations == 2
        assert sorted(uid for uid, _, _ in pacs.received) == sorted(i.sop_instance_uid for i in items)
    assert {o.kind for o in first.values()} == {D}
    assert {o.kind for o in second.values()} == {D}


def test_abort_on_a_fresh_association_is_not_resent(tmp_path: Path) -> None:
    """Only an association reused after idling is reopened: an abort on a new one pauses the
    destination (no attempt spent), and the rest of the batch is not tried on it."""
    items = copies(bundled("CT_small.dcm"), tmp_path / "in", 3)
    with FakePacs(abort_at=frozenset({0})) as pacs:
        dest = _dest(pacs.port)
        try:
            outcomes = dest.send(items)
        finally:
            dest.close()
        assert pacs.associations == 1 and pacs.received == []
    assert outcomes[items[0].job_id].kind is U and outcomes[items[0].job_id].reason == "association_aborted"
    assert all(outcomes[i.job_id].kind is U and outcomes[i.job_id].reason == "association_lost" for i in items[1:])


def _many_classes(tmp_path: Path, n: int) -> list[Delivery]:
    base = copies(bundled("CT_small.dcm"), tmp_path / "in", 1)[0]
    return [
        Delivery(job_id=i + 1, path=base.path, sop_class_uid=f"1.2.3.{i}", sop_instance_uid=f"2.25.{i + 1}",
                 study_instance_uid=base.study_instance_uid, series_instance_uid=base.series_instance_uid,
                 transfer_syntax_uid=base.transfer_syntax_uid)
        for i in range(n)
    ]


def test_a_refused_connection_fails_every_group_of_the_batch_at_once(tmp_path: Path) -> None:
    """FailureRule.fails_batch: 100 SOP classes need two associations; a PACS rejecting us
    is asked once, not once per group."""
    items = _many_classes(tmp_path, 100)
    assert len(group_by_contexts(items)) == 2
    with FakePacs(reject=("transient", 1)) as pacs:
        dest = _dest(pacs.port)
        try:
            outcomes = dest.send(items)
        finally:
            dest.close()
        assert pacs.connections == 1
    assert len(outcomes) == 100
    assert {o.reason for o in outcomes.values()} == {"association_rejected_transient:temporary_congestion"}
    assert {o.kind for o in outcomes.values()} == {U}


def test_no_context_accepted_fails_only_that_group(tmp_path: Path) -> None:
    """sop_class_not_accepted at open ends its own group; the next group is still sent."""
    items = _many_classes(tmp_path, 64)  # one full group (128 contexts) the PACS does not know
    ct = copies(bundled("CT_small.dcm"), tmp_path / "ct", 1, first_job_id=100)[0]
    assert len(group_by_contexts([*items, ct])) == 2
    with FakePacs(sop_classes=[ct.sop_class_uid]) as pacs:
        dest = _dest(pacs.port)
        try:
            outcomes = dest.send([*items, ct])
        finally:
            dest.close()
        assert [uid for uid, _, _ in pacs.received] == [ct.sop_instance_uid]
    assert outcomes[ct.job_id].kind is D
    assert {outcomes[i.job_id].reason for i in items} == {"sop_class_not_accepted"}
    assert {outcomes[i.job_id].kind for i in items} == {P}
