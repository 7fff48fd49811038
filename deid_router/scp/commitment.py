"""Storage Commitment Push Model SCP (PS3.4 Annex J): "are my instances safe with you?"

A modality sends N-ACTION-RQ (Request Storage Commitment) naming the instances it sent. The
router answers N-ACTION-RSP at once, then looks each instance up in its queue database and
reports the result in an N-EVENT-REPORT-RQ: committed for instances it durably holds (with
``commitment = "delivered"``: only once every routed destination has them), failed with
"no such object instance" for the others. The report goes on the same association while the
modality keeps it open, otherwise on a new association to the modality's address from
``[[storage_commitment.peers]]`` (the router then takes the SCP role by role selection).

"Committed" here means what the listener's 0x0000 means: the raw instance is fsync'd and its
jobs are committed (or, with "delivered", done). Lookups are by the keyed SOP Instance UID
token the intake stores, so the database never holds the UID in clear.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from io import BytesIO

from pydicom import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import UID, ImplicitVRLittleEndian
from pynetdicom import AE, build_role
from pynetdicom.dimse_messages import N_ACTION_RSP, N_EVENT_REPORT_RQ
from pynetdicom.dimse_primitives import N_ACTION, N_EVENT_REPORT
from pynetdicom.dsutils import encode

from deid_router.db.repository import JobRepository
from deid_router.deid.keys import Keys
from deid_router.observability.logging import get_logger

log = get_logger("commitment")

STORAGE_COMMITMENT_PUSH = "1.2.840.10008.1.20.1"
STORAGE_COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"  # the well-known SOP Instance
REQUEST_STORAGE_COMMITMENT = 1  # Action Type ID
EVENT_ALL_COMMITTED = 1  # Event Type ID: storage commitment request successful
EVENT_SOME_FAILED = 2  # Event Type ID: complete, failures exist

N_ACTION_RQ = 0x0130
N_EVENT_REPORT_RSP = 0x8100
MAX_ACTION_BYTES = 4 * 1024 * 1024  # about 40,000 referenced instances; more is hostile

# N-ACTION statuses we answer with (PS3.7 C.4.3, PS3.4 J.3.2.1.1.1)
SUCCESS = 0x0000
PROCESSING_FAILURE = 0x0110
INVALID_ARGUMENT_VALUE = 0x0115
NO_SUCH_ACTION = 0x0123
# Failure Reasons of the FailedSOPSequence (PS3.4 J.3.3.1.1.1)
FAILURE_NO_SUCH_OBJECT = 0x0112
FAILURE_CLASS_INSTANCE_CONFLICT = 0x0119
FAILURE_PROCESSING = 0x0110

COMMITMENT_MODES = ("held", "delivered")


class ActionRejected(Exception):
    """An N-ACTION we answer with a failure status (no event report follows)."""

    def __init__(self, status: int, why: str) -> None:
        super().__init__(why)
        self.status = status


@dataclass(frozen=True)
class CommitmentRequest:
    transaction_uid: str
    items: tuple[tuple[str, str], ...]  # (Referenced SOP Class UID, Referenced SOP Instance UID)
    calling_aet: str


@dataclass(frozen=True)
class CommitmentResult:
    transaction_uid: str
    committed: tuple[tuple[str, str], ...]
    failed: tuple[tuple[str, str, int], ...]  # (class, instance, Failure Reason)

    @property
    def event_type(self) -> int:
        return EVENT_SOME_FAILED if self.failed else EVENT_ALL_COMMITTED

    def dataset(self) -> Dataset:
        ds = Dataset()
        ds.TransactionUID = self.transaction_uid
        if self.committed:
            ds.ReferencedSOPSequence = DicomSequence([_ref(c, i) for c, i in self.committed])
        if self.failed:
            failed = []
            for c, i, reason in self.failed:
                item = _ref(c, i)
                item.FailureReason = reason
                failed.append(item)
            ds.FailedSOPSequence = DicomSequence(failed)
        return ds


def _ref(sop_class: str, sop_instance: str) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class
    item.ReferencedSOPInstanceUID = sop_instance
    return item


def _decode(data: bytes, transfer_syntax: str) -> Dataset:
    syntax = UID(transfer_syntax)
    return read_dataset(BytesIO(data), syntax.is_implicit_VR, syntax.is_little_endian)


def _encode(ds: Dataset, transfer_syntax: str) -> bytes:
    syntax = UID(transfer_syntax)
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = syntax.is_little_endian, syntax.is_implicit_VR
    write_dataset(fp, ds)
    return fp.getvalue()


def parse_action(command_bytes: bytes, data: bytes, transfer_syntax: str, calling_aet: str) -> tuple[int, CommitmentRequest]:
    """(Message ID, request) of an N-ACTION-RQ; :class:`ActionRejected` for what we refuse."""
    command = _decode(command_bytes, ImplicitVRLittleEndian)
    message_id = int(command.get("MessageID", 0))
    if str(command.get("RequestedSOPClassUID", "")).rstrip("\0 ") != STORAGE_COMMITMENT_PUSH:
        raise ActionRejected(0x0118, "no_such_sop_class")
    if int(command.get("ActionTypeID", 0)) != REQUEST_STORAGE_COMMITMENT:
        raise ActionRejected(NO_SUCH_ACTION, "no_such_action")
    try:
        ds = _decode(data, transfer_syntax)
        transaction = str(ds.get("TransactionUID", "") or "")
        items = tuple(
            (str(item.ReferencedSOPClassUID), str(item.ReferencedSOPInstanceUID))
            for item in ds.get("ReferencedSOPSequence", [])
        )
    except Exception as exc:  # pydicom raises many things on a hostile data set
        raise ActionRejected(PROCESSING_FAILURE, f"undecodable_action_{type(exc).__name__}") from exc
    if not transaction or not items or any(not (0 < len(i) <= 64 and 0 < len(c) <= 64) for c, i in items):
        raise ActionRejected(INVALID_ARGUMENT_VALUE, "invalid_action_arguments")
    return message_id, CommitmentRequest(transaction, items, calling_aet)


def encode_action_response(message_id: int, status: int) -> bytes:
    """The N-ACTION-RSP command set (no data set follows: no Action Reply)."""
    primitive = N_ACTION()
    primitive.MessageIDBeingRespondedTo = message_id
    primitive.AffectedSOPClassUID = STORAGE_COMMITMENT_PUSH
    primitive.AffectedSOPInstanceUID = STORAGE_COMMITMENT_INSTANCE
    if status == SUCCESS:
        primitive.ActionTypeID = REQUEST_STORAGE_COMMITMENT
    primitive.Status = status
    message = N_ACTION_RSP()
    message.primitive_to_message(primitive)
    return bytes(encode(message.command_set, True, True) or b"")


def encode_event_report(message_id: int, result: CommitmentResult, transfer_syntax: str) -> tuple[bytes, bytes]:
    """(command set, data set) of the N-EVENT-REPORT-RQ carrying ``result``."""
    primitive = N_EVENT_REPORT()
    primitive.MessageID = message_id
    primitive.AffectedSOPClassUID = STORAGE_COMMITMENT_PUSH
    primitive.AffectedSOPInstanceUID = STORAGE_COMMITMENT_INSTANCE
    primitive.EventTypeID = result.event_type
    data = _encode(result.dataset(), transfer_syntax)
    primitive.EventInformation = BytesIO(data)
    message = N_EVENT_REPORT_RQ()
    message.primitive_to_message(primitive)
    return bytes(encode(message.command_set, True, True) or b""), data


@dataclass(frozen=True)
class CommitmentPeer:
    ae_title: str
    host: str
    port: int


# Sends an event report on the association the request came on; False when it is gone.
SameAssociation = Callable[[CommitmentResult], bool]


@dataclass
class Commitment:
    """Decides what is committed, and reports it."""

    repo: JobRepository
    keys: Keys
    ae_title: str
    mode: str = "held"
    peers: Sequence[CommitmentPeer] = ()
    wait_seconds: float = 600.0  # "delivered": how long to wait for the destinations
    poll_seconds: float = 1.0
    _threads: set[threading.Thread] = field(default_factory=set)

    def evaluate(self, request: CommitmentRequest, final: bool = True) -> CommitmentResult | None:
        """The result, or None while (mode "delivered", not ``final``) some are still in flight."""
        tokens = {inst: self.keys.token("sop_instance_uid", inst) for _c, inst in request.items}
        held = self.repo.commitment_state(sorted(set(tokens.values())))
        committed: list[tuple[str, str]] = []
        failed: list[tuple[str, str, int]] = []
        waiting = False
        for sop_class, inst in request.items:
            state = held.get(tokens[inst])
            if state is None:
                failed.append((sop_class, inst, FAILURE_NO_SUCH_OBJECT))
            elif state.sop_class_uid != sop_class:
                failed.append((sop_class, inst, FAILURE_CLASS_INSTANCE_CONFLICT))
            elif self.mode == "delivered" and not state.delivered:
                if state.failed or final:
                    failed.append((sop_class, inst, FAILURE_PROCESSING))
                else:
                    waiting = True
            else:
                committed.append((sop_class, inst))
        if waiting:
            return None
        return CommitmentResult(request.transaction_uid, tuple(committed), tuple(failed))

    def submit(self, request: CommitmentRequest, same_association: SameAssociation) -> None:
        """Evaluate and report in the background: the N-ACTION-RSP goes back at once."""
        t = threading.Thread(target=self._run, args=(request, same_association), name="commitment", daemon=True)
        self._threads.add(t)
        t.start()

    def _run(self, request: CommitmentRequest, same_association: SameAssociation) -> None:
        try:
            deadline = time.monotonic() + self.wait_seconds
            result = self.evaluate(request, final=False)
            while result is None:
                time.sleep(self.poll_seconds)
                result = self.evaluate(request, final=time.monotonic() >= deadline)
            ctx = {"calling_aet": request.calling_aet, "committed": len(result.committed), "failed": len(result.failed)}
            if same_association(result):
                log.info("commitment_reported", via="same_association", **ctx)
            elif self._report_on_new_association(request.calling_aet, result):
                log.info("commitment_reported", via="new_association", **ctx)
            else:
                log.warning("commitment_report_undeliverable", **ctx)
        except Exception as exc:  # a database outage: the modality asks again
            log.error("commitment_failed", calling_aet=request.calling_aet, error=type(exc).__name__)
        finally:
            self._threads.discard(threading.current_thread())

    def _report_on_new_association(self, calling_aet: str, result: CommitmentResult) -> bool:
        peer = next((p for p in self.peers if p.ae_title == calling_aet), None)
        if peer is None:
            return False
        ae = AE(ae_title=self.ae_title)
        ae.add_requested_context(STORAGE_COMMITMENT_PUSH)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        # We are the Storage Commitment SCP on an association we request: SCP role only.
        role = build_role(STORAGE_COMMITMENT_PUSH, scu_role=False, scp_role=True)
        assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title, ext_neg=[role])
        if not assoc.is_established:
            return False
        try:
            status = assoc.send_n_event_report(
                result.dataset(), result.event_type, STORAGE_COMMITMENT_PUSH, STORAGE_COMMITMENT_INSTANCE
            )[0]
            return status is not None and int(getattr(status, "Status", 0xFFFF)) == 0x0000
        finally:
            assoc.release()

    def join(self, timeout: float) -> None:
        for t in list(self._threads):
            t.join(timeout)
