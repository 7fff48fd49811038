"""DICOM audit messages (PS3.15 A.5, the RFC 3881 schema) sent to a syslog collector (RFC 5424).

The site's audit repository learns what the node did: instances transferred to a destination,
associations refused (Security Alert), crosswalk look-ups (Query) and console logins (User
Authentication). Every message is built from output values only: de-identified UIDs,
destination names, AE titles, user names; never a value from an identified instance.

Transport: ``audit.syslog_url`` ``udp://host:port`` (one datagram a message, RFC 5426),
``tcp://host:port`` or ``tls://host:port`` (octet-counted frames, RFC 6587 / RFC 5425; TLS
verified against ``audit.ca_file``). Sending never blocks the node: messages wait in a bounded
queue for a background thread, and what does not fit, or cannot be sent, is counted and dropped
(``audit_message_dropped``), since the DICOM traffic must not wait for an audit repository.
"""

from __future__ import annotations

import os
import queue
import socket
import ssl
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum
from urllib.parse import urlsplit
from xml.etree import ElementTree as ET

from deid_router.observability.logging import get_logger

log = get_logger("audit")

SYSLOG_FACILITY = 10  # security/authorization messages (PS3.15 A.5: authpriv)
SYSLOG_SEVERITY = {0: 5, 4: 4, 8: 3, 12: 2}  # outcome -> notice, warning, error, critical
MSGID = "DICOM+RFC3881"  # PS3.15 A.5 / RFC 5425 message id for DICOM audit messages
APP_NAME = "deid-router"
QUEUE_SIZE = 1000


class Outcome(int, Enum):
    """EventOutcomeIndicator (RFC 3881)."""

    SUCCESS = 0
    MINOR_FAILURE = 4
    SERIOUS_FAILURE = 8
    MAJOR_FAILURE = 12


@dataclass(frozen=True)
class Code:
    value: str
    meaning: str
    scheme: str = "DCM"

    def element(self, tag: str) -> ET.Element:
        return ET.Element(tag, {"csd-code": self.value, "codeSystemName": self.scheme, "originalText": self.meaning})


# PS3.16 CID 400-404 codes used here, named once.
INSTANCES_TRANSFERRED = Code("110104", "DICOM Instances Transferred")
SECURITY_ALERT = Code("110113", "Security Alert")
QUERY = Code("110112", "Query")
USER_AUTHENTICATION = Code("110114", "User Authentication")
NODE_AUTHENTICATION = Code("110126", "Node Authentication")
LOGIN = Code("110122", "Login")
LOGOUT = Code("110123", "Logout")
SOURCE_ROLE = Code("110153", "Source Role ID")
DESTINATION_ROLE = Code("110152", "Destination Role ID")
APPLICATION = Code("110150", "Application")
STUDY_INSTANCE_UID = Code("110180", "Study Instance UID")
URI = Code("12", "URI", "RFC-3881")  # ParticipantObjectIDTypeCode of a non-DICOM object


@dataclass(frozen=True)
class Participant:
    user_id: str
    requestor: bool
    role: Code | None = None
    alternative_id: str = ""  # "AETITLES=..." for DICOM nodes
    network_access_point: str = ""  # host name or address


@dataclass(frozen=True)
class ParticipantObject:
    """ParticipantObjectIdentification: what the event was about (RFC 3881 type 2: system object)."""

    object_id: str
    id_type: Code
    role: int  # ParticipantObjectTypeCodeRole: 3 report, 13 security resource, 24 query
    type_code: int = 2

    def element(self) -> ET.Element:
        el = ET.Element("ParticipantObjectIdentification", {
            "ParticipantObjectID": self.object_id, "ParticipantObjectTypeCode": str(self.type_code),
            "ParticipantObjectTypeCodeRole": str(self.role),
        })
        el.append(self.id_type.element("ParticipantObjectIDTypeCode"))
        return el


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def audit_message(
    event: Code,
    action: str,
    outcome: Outcome,
    participants: list[Participant],
    source_id: str,
    event_type: Code | None = None,
    objects: tuple[ParticipantObject, ...] = (),
) -> bytes:
    """One AuditMessage XML document (UTF-8)."""
    root = ET.Element("AuditMessage")
    ident = ET.SubElement(
        root, "EventIdentification",
        {"EventActionCode": action, "EventDateTime": _now(), "EventOutcomeIndicator": str(int(outcome))},
    )
    ident.append(event.element("EventID"))
    if event_type is not None:
        ident.append(event_type.element("EventTypeCode"))
    for p in participants:
        attrs = {"UserID": p.user_id, "UserIsRequestor": "true" if p.requestor else "false"}
        if p.alternative_id:
            attrs["AlternativeUserID"] = p.alternative_id
        if p.network_access_point:
            attrs["NetworkAccessPointID"] = p.network_access_point
            attrs["NetworkAccessPointTypeCode"] = "2" if _is_address(p.network_access_point) else "1"
        el = ET.SubElement(root, "ActiveParticipant", attrs)
        if p.role is not None:
            el.append(p.role.element("RoleIDCode"))
    source = ET.SubElement(root, "AuditSourceIdentification", {"AuditSourceID": source_id})
    ET.SubElement(source, "AuditSourceTypeCode", {"csd-code": "4", "codeSystemName": "DCM", "originalText": "Application Server Process"})
    for obj in objects:
        root.append(obj.element())
    xml: bytes = ET.tostring(root, encoding="utf-8", xml_declaration=True)
    return xml


def _is_address(host: str) -> bool:
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
        return True
    except OSError:
        return False


def syslog_frame(xml: bytes, outcome: Outcome, hostname: str | None = None) -> bytes:
    """An RFC 5424 message: header, no structured data, BOM and the XML as MSG."""
    pri = SYSLOG_FACILITY * 8 + SYSLOG_SEVERITY[int(outcome)]
    host = (hostname or socket.gethostname() or "-")[:255]
    header = f"<{pri}>1 {_now()} {host} {APP_NAME} {os.getpid()} {MSGID} -"
    return header.encode("ascii", "replace") + b" \xef\xbb\xbf" + xml


class AuditSink:
    """Sends syslog frames from a background thread; never blocks its callers."""

    def __init__(self, url: str, source_id: str, ca_file: str | None = None) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("udp", "tcp", "tls") or not parts.hostname or not parts.port:
            raise ValueError("audit.syslog_url must be udp://host:port, tcp://host:port or tls://host:port")
        self.scheme, self.host, self.port = parts.scheme, parts.hostname, parts.port
        self.source_id = source_id
        self.ca_file = ca_file
        self.dropped = 0
        self._queue: queue.Queue[bytes | None] = queue.Queue(QUEUE_SIZE)
        self._sock: socket.socket | None = None
        self._thread = threading.Thread(target=self._run, name="audit-syslog", daemon=True)
        self._thread.start()

    def emit(self, xml: bytes, outcome: Outcome) -> None:
        try:
            self._queue.put_nowait(syslog_frame(xml, outcome))
        except queue.Full:
            self._drop("queue_full")

    def _drop(self, why: str) -> None:
        self.dropped += 1
        log.warning("audit_message_dropped", reason=why, dropped=self.dropped)

    def _connect(self) -> socket.socket:
        if self.scheme == "udp":
            return socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET, socket.SOCK_DGRAM)
        sock = socket.create_connection((self.host, self.port), timeout=5)
        if self.scheme == "tls":
            ctx = ssl.create_default_context(cafile=self.ca_file)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            sock = ctx.wrap_socket(sock, server_hostname=self.host)
        return sock

    def _send(self, frame: bytes) -> None:
        if self._sock is None:
            self._sock = self._connect()
        if self.scheme == "udp":
            self._sock.sendto(frame, (self.host, self.port))
        else:
            self._sock.sendall(str(len(frame)).encode("ascii") + b" " + frame)  # octet counting

    def _run(self) -> None:
        while True:
            frame = self._queue.get()
            if frame is None:
                return
            try:
                self._send(frame)
            except (OSError, ssl.SSLError) as exc:
                if self._sock is not None:
                    self._sock.close()
                    self._sock = None
                self._drop(type(exc).__name__)

    def close(self, timeout: float = 2.0) -> None:
        """Send what is queued (for up to ``timeout``), then stop."""
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            pass
        self._thread.join(timeout)
        if self._sock is not None:
            self._sock.close()


class Auditor:
    """The node's audit events; does nothing when no collector is configured."""

    def __init__(self, sink: AuditSink | None, node_ae: str) -> None:
        self.sink = sink
        self.node_ae = node_ae

    @property
    def source_id(self) -> str:
        return self.sink.source_id if self.sink is not None else ""

    def _emit(self, xml: bytes, outcome: Outcome) -> None:
        if self.sink is not None:
            self.sink.emit(xml, outcome)

    def instances_transferred(self, destination: str, called_aet: str, studies: list[str], failed: bool) -> None:
        """De-identified instances of ``studies`` (output UIDs) went to ``destination``."""
        if self.sink is None:
            return
        outcome = Outcome.MINOR_FAILURE if failed else Outcome.SUCCESS
        self._emit(audit_message(
            INSTANCES_TRANSFERRED, "R", outcome,
            [
                Participant(self.node_ae, True, SOURCE_ROLE, f"AETITLES={self.node_ae}", socket.gethostname()),
                Participant(destination, False, DESTINATION_ROLE, f"AETITLES={called_aet}" if called_aet else ""),
            ],
            self.source_id, objects=tuple(ParticipantObject(s, STUDY_INSTANCE_UID, 3) for s in sorted(set(studies))),
        ), outcome)

    def association_refused(self, reason: str, calling_aet: str, peer_host: str) -> None:
        """Security Alert, Node Authentication failed: a peer was refused (``reason`` is a fixed code)."""
        if self.sink is None:
            return
        self._emit(audit_message(
            SECURITY_ALERT, "E", Outcome.MINOR_FAILURE,
            [
                Participant(calling_aet or peer_host or "unknown", True, None,
                            f"AETITLES={calling_aet}" if calling_aet else "", peer_host),
                Participant(self.node_ae, False, APPLICATION, f"AETITLES={self.node_ae}", socket.gethostname()),
            ],
            self.source_id, event_type=NODE_AUTHENTICATION, objects=(ParticipantObject(reason, URI, 13),),
        ), Outcome.MINOR_FAILURE)

    def crosswalk_lookup(self, user: str, found: bool) -> None:
        """Query: a data custodian looked a pseudonym up (never the pseudonym or the original)."""
        if self.sink is None:
            return
        outcome = Outcome.SUCCESS if found else Outcome.MINOR_FAILURE
        self._emit(audit_message(
            QUERY, "E", outcome,
            [Participant(user, True, SOURCE_ROLE), Participant(self.node_ae, False, DESTINATION_ROLE, network_access_point=socket.gethostname())],
            self.source_id, objects=(ParticipantObject("crosswalk", URI, 24),),
        ), outcome)

    def user_authentication(self, user: str, success: bool, logout: bool = False, peer_host: str = "") -> None:
        if self.sink is None:
            return
        outcome = Outcome.SUCCESS if success else Outcome.MINOR_FAILURE
        self._emit(audit_message(
            USER_AUTHENTICATION, "E", outcome,
            [Participant(user, True, None, network_access_point=peer_host),
             Participant(self.node_ae, False, APPLICATION, network_access_point=socket.gethostname())],
            self.source_id, event_type=LOGOUT if logout else LOGIN,
        ), outcome)

    def close(self) -> None:
        if self.sink is not None:
            self.sink.close()


def auditor_from(url: str, source_id: str, node_ae: str, ca_file: str | None = None) -> Auditor:
    """An Auditor for ``audit.syslog_url`` (empty: off)."""
    return Auditor(AuditSink(url, source_id, ca_file) if url else None, node_ae)
