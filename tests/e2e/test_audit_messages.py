"""DICOM audit messages (PS3.15 A.5) reach a syslog collector as RFC 5424 frames.

A small collector in the test receives them over TCP (and UDP); each must parse as RFC 5424
(facility authpriv, MSGID DICOM+RFC3881, a BOM then the XML) and carry the elements the A.5
schema requires: EventIdentification with EventID, EventActionCode, EventDateTime and
EventOutcomeIndicator; at least one ActiveParticipant with UserID and UserIsRequestor; and
AuditSourceIdentification with AuditSourceID. None may carry a value of an identified instance.
"""

from __future__ import annotations

from pathlib import Path
from xml.etree import ElementTree as ET

import pydicom
import pytest

from deid_router.observability.audit_messages import Auditor, AuditSink
from tests.conftest import require_tool
from tests.support.corpus import make_series
from tests.support.peers import storescu, storescu_acknowledged
from tests.support.router import RouterProcess
from tests.support.syslog_collector import SyslogCollector, SyslogMessage

pytestmark = pytest.mark.e2e


def _event(m: SyslogMessage) -> str:
    ev = m.xml().find("EventIdentification/EventID")
    assert ev is not None
    return str(ev.get("originalText"))


def assert_a5_message(m: SyslogMessage) -> ET.Element:
    assert m.facility == 10 and m.msgid == "DICOM+RFC3881" and m.app_name == "deid-router", m
    assert m.msg.startswith(b"\xef\xbb\xbf")  # RFC 5424: a UTF-8 MSG starts with a BOM
    root = m.xml()
    assert root.tag == "AuditMessage"
    ident = root.find("EventIdentification")
    assert ident is not None
    for attr in ("EventActionCode", "EventDateTime", "EventOutcomeIndicator"):
        assert ident.get(attr), attr
    assert ident.get("EventActionCode") in ("C", "R", "U", "D", "E")
    assert ident.get("EventOutcomeIndicator") in ("0", "4", "8", "12")
    event_id = ident.find("EventID")
    assert event_id is not None and all(event_id.get(a) for a in ("csd-code", "codeSystemName", "originalText"))
    participants = root.findall("ActiveParticipant")
    assert participants
    for p in participants:
        assert p.get("UserID") and p.get("UserIsRequestor") in ("true", "false")
    source = root.find("AuditSourceIdentification")
    assert source is not None and source.get("AuditSourceID")
    for obj in root.findall("ParticipantObjectIdentification"):
        assert obj.get("ParticipantObjectID") and obj.find("ParticipantObjectIDTypeCode") is not None
    return root


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_sink_frames_parse_as_rfc5424_with_the_a5_elements(transport: str) -> None:
    collector = SyslogCollector(transport)
    try:
        auditor = Auditor(AuditSink(collector.url, "test-node"), "DEID_ROUTER")
        auditor.user_authentication("alice", success=False, peer_host="127.0.0.1")
        auditor.crosswalk_lookup("custodian", found=True)
        msgs = collector.wait_for(lambda ms: len(ms) >= 2, 10)
        auditor.close()
    finally:
        collector.stop()
    assert [_event(m) for m in msgs] == ["User Authentication", "Query"]
    for m in msgs:
        assert_a5_message(m)
    assert msgs[0].priority == 10 * 8 + 4  # a failed login is a warning
    assert msgs[0].xml().find("EventIdentification").get("EventOutcomeIndicator") == "4"  # type: ignore[union-attr]


def test_node_sends_instances_transferred_security_alert_and_query(tmp_path: Path) -> None:
    require_tool("storescu")
    collector = SyslogCollector("tcp")
    router = RouterProcess(tmp_path / "router", [{"name": "out", "type": "folder", "path": "out"}])
    router.extra = {"audit": {"syslog_url": collector.url, "source_id": "deid-test"}}
    router.write_config()
    try:
        files = make_series(tmp_path / "in", 3, rows=16, cols=16)
        originals = pydicom.dcmread(files[0], stop_before_pixels=True)
        with router:
            assert storescu_acknowledged(storescu("127.0.0.1", router.port, [tmp_path / "in"])) == 3
            router.wait_idle(60, expect_done=3)
            # a modality calling the wrong AE title is refused: a Security Alert
            refused = storescu("127.0.0.1", router.port, [files[0]], called_aet="NOT_US")
            assert storescu_acknowledged(refused) == 0
            pseudonym = pydicom.dcmread(next((router.workdir / "out").rglob("*.dcm"))).PatientID
            res = router.cli("crosswalk", "lookup", str(pseudonym), "--actor", "custodian", check=False)
            assert res.returncode == 0, res.stderr
            msgs = collector.wait_for(
                lambda ms: {"DICOM Instances Transferred", "Security Alert", "Query"} <= {_event(m) for m in ms}, 30
            )
    finally:
        collector.stop()
    by_event = {_event(m): m for m in msgs}
    for m in msgs:
        root = assert_a5_message(m)
        assert root.find("AuditSourceIdentification").get("AuditSourceID") == "deid-test"  # type: ignore[union-attr]
        text = m.msg.decode("utf-8")
        for value in (str(originals.PatientID), str(originals.PatientName), str(originals.StudyInstanceUID)):
            assert value not in text  # only output values: never the identified instance's
    transferred = by_event["DICOM Instances Transferred"].xml()
    studies = [o.get("ParticipantObjectID") for o in transferred.findall("ParticipantObjectIdentification")]
    delivered = pydicom.dcmread(next((router.workdir / "out").rglob("*.dcm")), stop_before_pixels=True)
    assert studies == [str(delivered.StudyInstanceUID)]
    alert = by_event["Security Alert"].xml()
    assert [o.get("ParticipantObjectID") for o in alert.findall("ParticipantObjectIdentification")] == ["called_aet_not_recognized"]
