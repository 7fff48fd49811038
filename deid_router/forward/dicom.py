"""DICOM destination: a C-STORE SCU that reuses one association per batch.

Why it looks like this:

* Speed: one association per batch (kept open a few idle seconds across batches), sent by
  the worker's own thread over a blocking socket (:mod:`deid_router.forward.association`),
  and, when the PACS accepts the file's own transfer syntax, the data set is streamed from
  disk with ``sendfile`` without decoding.
* Compatibility: for every SOP class we propose the file's own syntax plus Explicit and
  Implicit VR Little Endian as separate presentation contexts, so a PACS without codecs
  can still receive a decompressed copy.
* Liveness: every wait has a finite timeout from the configuration, so a PACS that accepts
  and then never answers frees the worker; the items not yet sent are reported
  ``association_lost`` and retried.
* Safety: nothing here logs or raises a tag value; statuses are classified only in
  :mod:`deid_router.forward.status`.
"""

from __future__ import annotations

import errno
import threading
import time
from collections.abc import Sequence

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from deid_router.config import DestinationConfig
from deid_router.forward.association import AssociationFailure, RequestedAssociation, Timeouts, tls_for
from deid_router.forward.base import Delivery
from deid_router.forward.status import FailureKind, classify_failure, classify_status, failure_rule
from deid_router.jobs.outcome import Outcome
from deid_router.observability.logging import get_logger

_log = get_logger("forward")

MAX_CONTEXTS = 128  # PS3.8: presentation context ids are odd numbers 1..255
_LITTLE_ENDIAN = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
DEFAULT_IDLE_SECONDS = 5.0


def _needed_syntaxes(transfer_syntax_uid: str) -> tuple[str, ...]:
    """The transfer syntaxes proposed for an instance: its own first, then the LE fallbacks."""
    own = str(transfer_syntax_uid)
    return (own,) + tuple(str(t) for t in _LITTLE_ENDIAN if str(t) != own)


def group_by_contexts(items: Sequence[Delivery], limit: int = MAX_CONTEXTS) -> list[list[Delivery]]:
    """Split a batch so that each group needs at most ``limit`` presentation contexts."""
    groups: list[list[Delivery]] = []
    current: list[Delivery] = []
    pairs: set[tuple[str, str]] = set()
    for item in items:
        new = {(item.sop_class_uid, ts) for ts in _needed_syntaxes(item.transfer_syntax_uid)} - pairs
        if current and len(pairs) + len(new) > limit:
            groups.append(current)
            current, pairs = [], set()
            new = {(item.sop_class_uid, ts) for ts in _needed_syntaxes(item.transfer_syntax_uid)}
        current.append(item)
        pairs |= new
    if current:
        groups.append(current)
    return groups


def _pairs_for(items: Sequence[Delivery]) -> list[tuple[str, str]]:
    seen: dict[tuple[str, str], None] = {}
    for item in items:
        for ts in _needed_syntaxes(item.transfer_syntax_uid):
            seen[(item.sop_class_uid, ts)] = None
    return list(seen)


class _Link:
    """One open association plus what we know about it."""

    def __init__(self, assoc: RequestedAssociation, pairs: frozenset[tuple[str, str]]) -> None:
        self.assoc = assoc
        self.pairs = pairs
        self.next_msg_id = 1
        self.sent = 0

    def msg_id(self) -> int:
        value = self.next_msg_id
        self.next_msg_id = value % 65535 + 1
        return value

    @property
    def alive(self) -> bool:
        return self.assoc.alive


class _OpenFailed(Exception):
    """Internal: the association could not be established; carries the outcome for the group."""

    def __init__(self, outcome: Outcome) -> None:
        super().__init__(outcome.reason)
        self.outcome = outcome


class DicomDestination:
    """C-STORE SCU for one configured destination; ``send`` is serialised by a lock."""

    def __init__(
        self, cfg: DestinationConfig, calling_ae_title: str, idle_seconds: float = DEFAULT_IDLE_SECONDS
    ) -> None:
        self.name = cfg.name
        self._cfg = cfg
        self._calling_ae_title = cfg.calling_ae_title or calling_ae_title
        self._timeouts = Timeouts(
            connect=cfg.connect_timeout_seconds,
            acse=cfg.acse_timeout_seconds,
            dimse=cfg.dimse_timeout_seconds,
            network=cfg.network_timeout_seconds,
        )
        self._idle_seconds = idle_seconds
        self._lock = threading.Lock()
        self._link: _Link | None = None
        self._timer: threading.Timer | None = None
        self._generation = 0
        self.associations_opened = 0  # for tests and metrics

    # -- public API ---------------------------------------------------------------------

    def send(self, items: Sequence[Delivery]) -> dict[int, Outcome]:
        """Send ``items`` over one association (per group of <= 128 contexts); never raises."""
        started = time.monotonic()
        outcomes: dict[int, Outcome] = {}
        with self._lock:
            self._cancel_timer()
            opened_before = self.associations_opened
            try:
                self._send_groups(items, outcomes)
            except Exception as exc:  # a bug must not crash the worker or lose the outcome
                _log.error("forward_unexpected_error", destination=self.name, error_type=type(exc).__name__)
                self._drop_link(abort=True)
            for item in items:
                outcomes.setdefault(item.job_id, classify_failure(FailureKind.INTERNAL_ERROR))
            self._arm_timer()
            opened = self.associations_opened - opened_before
        self._log_batch(outcomes, opened, time.monotonic() - started)
        return outcomes

    def close(self) -> None:
        """Release the association (if any); safe to call more than once."""
        with self._lock:
            self._cancel_timer()
            self._drop_link(abort=False)

    # -- batch --------------------------------------------------------------------------

    def _send_groups(self, items: Sequence[Delivery], outcomes: dict[int, Outcome]) -> None:
        pending = list(items)
        for group in group_by_contexts(items):
            try:
                link, reused = self._link_for(group)
            except _OpenFailed as failed:
                # Connection-level failures (FailureRule.fails_batch) would hit every later
                # group too: fail them all now rather than waiting for the connect timeout once
                # per group. Others (no context accepted) end this group only.
                rule = failure_rule(failed.outcome.failure)
                every = rule is not None and rule.fails_batch
                for item in pending if every else group:
                    outcomes[item.job_id] = failed.outcome
                if every:
                    return
                pending = [i for i in pending if i.job_id not in outcomes]
                continue
            lost = self._send_group(link, group, outcomes, reused)
            pending = [i for i in pending if i.job_id not in outcomes]
            if lost:
                for item in pending:
                    outcomes[item.job_id] = classify_failure(FailureKind.ASSOCIATION_LOST)
                return

    def _send_group(
        self, link: _Link, group: list[Delivery], outcomes: dict[int, Outcome], reused: bool
    ) -> bool:
        """Send one group; return True when the association was lost (the rest is not sent)."""
        proven = not reused  # a fresh association, or one that carried an item of this group
        for item in group:
            outcome = self._store_one(link, item)
            rule = failure_rule(outcome.failure)
            if not proven and rule is not None and rule.reopen_once:
                # The PACS dropped the association while it idled between batches (it closes
                # idle associations only when the next request arrives, or just as we sent):
                # nothing of this item was stored. Reopen once and resend it.
                _log.info("forward_association_reopened", destination=self.name, reason=outcome.reason)
                self._drop_link(abort=True)
                try:
                    link, _ = self._link_for(group)
                except _OpenFailed as failed:
                    outcomes[item.job_id] = failed.outcome
                    return True
                outcome = self._store_one(link, item)
                rule = failure_rule(outcome.failure)
            proven = True
            link.sent += 1
            outcomes[item.job_id] = outcome
            if not link.alive or (rule is not None and rule.ends_association):
                self._drop_link(abort=True)
                return True
        return False

    # -- one C-STORE --------------------------------------------------------------------

    def _store_one(self, link: _Link, item: Delivery) -> Outcome:
        accepted = link.assoc.accepted.get(str(item.sop_class_uid))
        if not accepted:
            return classify_failure(FailureKind.SOP_CLASS_NOT_ACCEPTED)
        try:
            context_id = accepted.get(str(item.transfer_syntax_uid))
            if context_id is not None:  # streamed from the file, never decoded
                status = link.assoc.store_file(
                    context_id, link.msg_id(), item.sop_class_uid, item.sop_instance_uid, item.path
                )
            else:
                prepared = self._fallback_dataset(item, accepted)
                if isinstance(prepared, Outcome):
                    return prepared
                context_id, data = prepared
                status = link.assoc.store_bytes(
                    context_id, link.msg_id(), item.sop_class_uid, item.sop_instance_uid, data
                )
        except AssociationFailure as failure:
            outcome = classify_failure(failure.kind, failure.detail)
            rule = failure_rule(outcome.failure)
            if rule is not None and rule.ends_association:  # the PACS did not answer this C-STORE
                _log.warning("forward_no_response", destination=self.name, job_id=item.job_id, reason=failure.kind)
            return outcome
        return classify_status(status)

    def _fallback_dataset(self, item: Delivery, accepted: dict[str, int]) -> tuple[int, bytes] | Outcome:
        """Encode, in a little endian syntax the PACS accepted, an instance whose own syntax
        it refused (decompressing it when needed); (context ID, data set bytes).

        The SOP Instance UID is kept (``generate_instance_uid=False``): the output UID must
        stay stable so that a re-send is idempotent at the PACS.
        """
        try:
            ds = dcmread(item.path)
        except OSError as exc:
            return classify_failure(FailureKind.FILE_READ_FAILED, errno.errorcode.get(exc.errno or 0, "unknown"))
        except (InvalidDicomError, ValueError, AttributeError):
            return classify_failure(FailureKind.INVALID_FILE)
        ts = UID(str(ds.file_meta.get("TransferSyntaxUID", item.transfer_syntax_uid)))
        if ts.is_compressed:
            try:
                ds.decompress(generate_instance_uid=False)
            except Exception:  # any codec failure: no little endian copy can be made
                return classify_failure(FailureKind.TRANSFER_SYNTAX_NOT_ACCEPTED, "decompression_failed")
        elif not ts.is_little_endian:
            # Big endian to little endian would need per-element byte swapping of OW data.
            return classify_failure(FailureKind.TRANSFER_SYNTAX_NOT_ACCEPTED, "big_endian")
        for syntax in _LITTLE_ENDIAN:
            context_id = accepted.get(str(syntax))
            if context_id is not None:
                fp = DicomBytesIO()
                fp.is_little_endian = True
                fp.is_implicit_VR = syntax == ImplicitVRLittleEndian
                try:
                    write_dataset(fp, ds)
                except Exception:  # an element pydicom cannot encode in this syntax
                    return classify_failure(FailureKind.INVALID_FILE)
                return context_id, fp.getvalue()
        return classify_failure(FailureKind.TRANSFER_SYNTAX_NOT_ACCEPTED)

    # -- associations -------------------------------------------------------------------

    def _link_for(self, group: Sequence[Delivery]) -> tuple[_Link, bool]:
        """Reuse the open association when it covers the group's contexts, else open one."""
        needed = _pairs_for(group)
        link = self._link
        if link is not None and not link.assoc.peer_closed() and set(needed) <= link.pairs:
            return link, True
        wanted = list(needed)
        if link is not None and link.alive:
            # Keep the old contexts too when they fit, so alternating batches do not churn.
            merged = list(dict.fromkeys(list(link.pairs) + needed))
            if len(merged) <= MAX_CONTEXTS:
                wanted = merged
        self._drop_link(abort=False)
        self._link = self._open(wanted)
        return self._link, False

    def _open(self, pairs: list[tuple[str, str]]) -> _Link:
        cfg = self._cfg
        try:
            assoc = RequestedAssociation.open(
                cfg.host, cfg.port, self._calling_ae_title, cfg.ae_title, pairs, cfg.max_pdu_size, self._timeouts,
                tls=tls_for(cfg),
            )
        except AssociationFailure as failure:
            _log.warning("forward_association_failed", destination=self.name, reason=failure.kind)
            raise _OpenFailed(classify_failure(failure.kind, failure.detail)) from failure
        self.associations_opened += 1
        return _Link(assoc, frozenset(pairs))

    def _drop_link(self, abort: bool) -> None:
        link, self._link = self._link, None
        if link is None:
            return
        if abort:
            link.assoc.abort()
        else:
            link.assoc.release()

    # -- idle release -------------------------------------------------------------------

    def _arm_timer(self) -> None:
        if self._link is None:
            return
        self._generation += 1
        generation = self._generation
        timer = threading.Timer(self._idle_seconds, self._release_if_idle, args=(generation,))
        timer.daemon = True
        self._timer = timer
        timer.start()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._generation += 1

    def _release_if_idle(self, generation: int) -> None:
        with self._lock:
            if generation != self._generation:
                return
            self._timer = None
            self._drop_link(abort=False)

    # -- logging ------------------------------------------------------------------------

    def _log_batch(self, outcomes: dict[int, Outcome], opened: int, seconds: float) -> None:
        kinds: dict[str, int] = {}
        statuses: dict[str, int] = {}
        reasons: dict[str, int] = {}
        for o in outcomes.values():
            kinds[o.kind.value] = kinds.get(o.kind.value, 0) + 1
            if o.status_code is not None:
                code = f"0x{o.status_code:04X}"
                statuses[code] = statuses.get(code, 0) + 1
            elif o.reason:
                reasons[o.reason] = reasons.get(o.reason, 0) + 1
        _log.info(
            "forward_batch_sent",
            destination=self.name,
            called_aet=self._cfg.ae_title,
            items=len(outcomes),
            outcomes=kinds,
            status_codes=statuses,
            failure_reasons=reasons,
            associations_opened=opened,
            seconds=round(seconds, 3),
        )
