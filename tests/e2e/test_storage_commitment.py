"""Storage Commitment Push Model (PS3.4 J): a modality asks whether its instances are safe.

A pynetdicom SCU plays the modality (dcmtk has no storage commitment SCU): it sends
instances with storescu, then an N-ACTION naming them and one UID the router never saw.
The router must answer N-EVENT-REPORT "committed" for what it durably holds and "no such
object instance" for the other, on the same association while it stays open, else on a new
association to the modality's configured address.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import StorageCommitmentPushModel  # type: ignore[attr-defined]

from deid_router.scp.commitment import STORAGE_COMMITMENT_INSTANCE
from tests.conftest import require_tool
from tests.support.corpus import make_series
from tests.support.peers import StoreSCP, storescu, storescu_acknowledged
from tests.support.router import RouterProcess, dicom_destination, free_port, wait_until

pytestmark = pytest.mark.e2e

CT = "1.2.840.10008.5.1.4.1.1.2"
NO_SUCH_OBJECT_INSTANCE = 0x0112
PROCESSING_FAILURE = 0x0110


def _action(refs: list[tuple[str, str]]) -> tuple[str, Dataset]:
    ds = Dataset()
    ds.TransactionUID = generate_uid()
    items = []
    for cls, inst in refs:
        item = Dataset()
        item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = cls, inst
        items.append(item)
    ds.ReferencedSOPSequence = DicomSequence(items)
    return str(ds.TransactionUID), ds


class _Reports:
    """Collects N-EVENT-REPORTs (event type and information) as the modality receives them."""

    def __init__(self) -> None:
        self.got: list[tuple[int, Dataset]] = []
        self.arrived = threading.Event()

    def handler(self, event: Any) -> tuple[int, None]:
        self.got.append((int(event.event_type), event.event_information))
        self.arrived.set()
        return 0x0000, None  # status, no event reply


def _sent(tmp_path: Path, router: RouterProcess, n: int = 3) -> list[tuple[str, str]]:
    files = make_series(tmp_path / "in", n, rows=16, cols=16)
    assert storescu_acknowledged(storescu("127.0.0.1", router.port, [tmp_path / "in"])) == n
    return [(CT, str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)) for f in files]


def _ask(router: RouterProcess, refs: list[tuple[str, str]], reports: _Reports, keep_open: float) -> int:
    """Send the N-ACTION; keep the association open ``keep_open`` seconds for the report."""
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(StorageCommitmentPushModel)
    assoc = ae.associate("127.0.0.1", router.port, ae_title="DEID_ROUTER",
                         evt_handlers=[(evt.EVT_N_EVENT_REPORT, reports.handler)])
    assert assoc.is_established
    try:
        _tx, ds = _action(refs)
        status, _reply = assoc.send_n_action(ds, 1, StorageCommitmentPushModel, STORAGE_COMMITMENT_INSTANCE)
        assert status is not None
        if keep_open:
            reports.arrived.wait(keep_open)
        return int(status.Status)
    finally:
        assoc.release()


def _committed(report: Dataset) -> set[str]:
    return {str(i.ReferencedSOPInstanceUID) for i in report.get("ReferencedSOPSequence", [])}


def _failed(report: Dataset) -> dict[str, int]:
    return {str(i.ReferencedSOPInstanceUID): int(i.FailureReason) for i in report.get("FailedSOPSequence", [])}


def test_commitment_reported_on_the_same_association(tmp_path: Path) -> None:
    require_tool("storescu")
    router = RouterProcess(tmp_path / "router", [{"name": "out", "type": "folder", "path": "out"}])
    with router:
        refs = _sent(tmp_path, router)
        unknown = (CT, generate_uid())
        reports = _Reports()
        assert _ask(router, refs + [unknown], reports, keep_open=20) == 0x0000
        assert reports.arrived.is_set(), router.log_text()[-2000:]
        event_type, info = reports.got[0]
        assert event_type == 2  # complete, failures exist
        assert _committed(info) == {inst for _c, inst in refs}
        assert _failed(info) == {unknown[1]: NO_SUCH_OBJECT_INSTANCE}
        # only the one the router holds, all committed: event type 1
        again = _Reports()
        assert _ask(router, refs, again, keep_open=20) == 0x0000
        assert again.got and again.got[0][0] == 1 and "FailedSOPSequence" not in again.got[0][1]
    log = router.log_text()
    assert "commitment_reported" in log
    for _c, inst in refs + [unknown]:
        assert inst not in log  # never a UID in the log


def test_commitment_reported_on_a_new_association_when_the_modality_left(tmp_path: Path) -> None:
    require_tool("storescu")
    reports = _Reports()
    modality = AE(ae_title="MODALITY")
    # the modality accepts the router in the SCP role of Storage Commitment (role selection)
    modality.add_supported_context(StorageCommitmentPushModel, scu_role=False, scp_role=True)
    port = free_port()
    server = modality.start_server(("127.0.0.1", port), block=False,
                                   evt_handlers=[(evt.EVT_N_EVENT_REPORT, reports.handler)])
    require_tool("storescp")
    pacs_port = free_port()
    try:
        # "delivered" with the PACS down: the result cannot be known while the modality is still
        # there (a report on the same association would race its release), only once it left
        router = RouterProcess(
            tmp_path / "router", [dicom_destination("pacs", pacs_port, "PACS", connect_timeout_seconds=1)],
        )
        router.extra = {"storage_commitment": {
            "commitment": "delivered", "wait_seconds": 120,
            "peers": [{"ae_title": "MODALITY", "host": "127.0.0.1", "port": port}],
        }}
        router.write_config()
        with router:
            refs = _sent(tmp_path, router)
            same = _Reports()
            assert _ask(router, refs, same, keep_open=0) == 0x0000  # releases at once
            assert not same.got
            with StoreSCP(tmp_path / "pacs", ae_title="PACS", port=pacs_port):
                assert reports.arrived.wait(90), router.log_text()[-2000:]
                event_type, info = reports.got[0]
                assert event_type == 1
                assert _committed(info) == {inst for _c, inst in refs}
                wait_until(lambda: '"via": "new_association"' in router.log_text(), 10, 0.1, "the report to be logged")
    finally:
        server.shutdown()


def test_delivered_mode_commits_only_what_every_destination_has(tmp_path: Path) -> None:
    require_tool("storescp")
    pacs_port = free_port()
    router = RouterProcess(
        tmp_path / "router", [dicom_destination("pacs", pacs_port, "PACS", connect_timeout_seconds=1)],
    )
    router.extra = {"storage_commitment": {"commitment": "delivered", "wait_seconds": 3}}
    router.write_config()
    with router:
        refs = _sent(tmp_path, router, n=2)
        # the PACS is down: held, not delivered; after wait_seconds the router says so
        down = _Reports()
        assert _ask(router, refs, down, keep_open=30) == 0x0000
        assert down.got and down.got[0][0] == 2
        assert set(_failed(down.got[0][1]).values()) == {PROCESSING_FAILURE}
        with StoreSCP(tmp_path / "pacs", ae_title="PACS", port=pacs_port):
            router.wait_idle(60, expect_done=2)
            up = _Reports()
            assert _ask(router, refs, up, keep_open=30) == 0x0000
            assert up.got and up.got[0][0] == 1
            assert _committed(up.got[0][1]) == {inst for _c, inst in refs}


def test_n_action_without_a_transaction_uid_is_refused(tmp_path: Path) -> None:
    router = RouterProcess(tmp_path / "router", [{"name": "out", "type": "folder", "path": "out"}])
    with router:
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(StorageCommitmentPushModel)
        assoc = ae.associate("127.0.0.1", router.port, ae_title="DEID_ROUTER")
        assert assoc.is_established
        try:
            ds = Dataset()
            ds.ReferencedSOPSequence = DicomSequence([])
            status, _ = assoc.send_n_action(ds, 1, StorageCommitmentPushModel, STORAGE_COMMITMENT_INSTANCE)
            assert status is not None and int(status.Status) == 0x0115  # invalid argument value
        finally:
            assoc.release()
