"""DICOM destination: a pynetdicom C-STORE SCU that reuses one association per batch.

Why it looks like this:

* Speed: one association per batch (kept open a few idle seconds across batches),
  TCP_NODELAY on the socket (pynetdicom never sets it; without it every C-STORE waits for
  a delayed ACK), and, when the PACS accepts the file's own transfer syntax, the file is
  streamed from disk without decoding (``STORE_SEND_CHUNKED_DATASET``).
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
import socket
import threading
import time
from collections.abc import Sequence
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, _config, evt
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext, build_context

from deid_router.config import DestinationConfig
from deid_router.forward.base import Delivery
from deid_router.forward.status import classify_association_failure, classify_status, reject_reason
from deid_router.jobs.outcome import Outcome, OutcomeKind
from deid_router.observability.logging import get_logger

_log = get_logger("forward")

MAX_CONTEXTS = 128  # PS3.8: presentation context ids are odd numbers 1..255
_LITTLE_ENDIAN = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
DEFAULT_IDLE_SECONDS = 5.0
# pynetdicom's DUL thread polls its socket and queues every ``_run_loop_delay`` seconds when
# nothing happens (1 ms by default). While a batch is sent each C-STORE response waits for that
# poll, so keep it short; while the association idles between batches (kept open for up to
# idle_seconds), its 1,000 wake-ups a second were 14 % of a worker's Python time under load
# here (py-spy --gil), 8 % with this: poll slowly. The first PDU of the next batch waits at
# most this long.
DUL_POLL_ACTIVE_SECONDS = 0.001
DUL_POLL_IDLE_SECONDS = 0.02


def configure_pynetdicom() -> None:
    """Set the pynetdicom globals this module relies on (idempotent).

    Chunked sending is what lets a file go out without being decoded; identifier logging
    would print dataset values.
    """
    _config.STORE_SEND_CHUNKED_DATASET = True
    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False


def _set_nodelay(event: evt.Event) -> None:
    """EVT_CONN_OPEN handler: disable Nagle, or each C-STORE waits ~40 ms for a delayed ACK."""
    sock = event.assoc.dul.socket
    raw = getattr(sock, "socket", None) if sock is not None else None
    if raw is not None:
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass


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


class _HeldCheckpoint(threading.Event):
    """A reactor checkpoint that ``send_c_store`` cannot re-open while a batch runs.

    pynetdicom 3.0 pauses the association reactor around each ``send_c_store`` by clearing
    ``_reactor_checkpoint`` and polling ``_is_paused``; that flag can be stale right after
    the previous call re-set the checkpoint, so the reactor may take the next C-STORE-RSP off
    the queue and the SCU waits for the DIMSE timeout (measured: about 1 in 500-2000 sends
    on loopback). Holding the reactor paused for the whole batch closes that window.
    """

    def __init__(self) -> None:
        super().__init__()
        self.held = False
        super().set()

    def set(self) -> None:
        if not self.held:
            super().set()


MAX_QUEUED_PDUS = 16  # P-DATA PDUs waiting in pynetdicom's send queue (16 x max PDU of the peer)


def bound_send_queue(assoc: Association, limit: int = MAX_QUEUED_PDUS) -> None:
    """Make ``assoc`` wait while ``limit`` PDUs are already queued for its socket.

    pynetdicom's ``DIMSEServiceProvider.send_msg`` reads a file sent with
    ``STORE_SEND_CHUNKED_DATASET`` one PDU at a time, but puts every PDU into the DUL's
    unbounded ``to_provider_queue`` without waiting for the socket: when the disk is faster
    than the peer, the whole instance ends up in memory (a 300 MB instance raised a worker's
    RSS by 130 MB). Waiting here keeps memory at ``limit`` PDUs whatever the instance size.
    """
    dul = assoc.dul
    put = dul.send_pdu

    def send_pdu(primitive: Any) -> None:
        q = dul.to_provider_queue
        while q.qsize() >= limit and dul.is_alive() and not assoc.is_aborted and not dul._kill_thread:
            time.sleep(0.0005)
        put(primitive)

    dul.send_pdu = send_pdu  # type: ignore[method-assign]


class _Link:
    """One open association plus what we know about it."""

    def __init__(self, assoc: Association, pairs: frozenset[tuple[str, str]]) -> None:
        self.assoc = assoc
        self.checkpoint = _HeldCheckpoint()
        assoc._reactor_checkpoint = self.checkpoint  # private pynetdicom 3.0 attribute, see above
        self.pairs = pairs
        self.next_msg_id = 1
        self.sent = 0
        self.accepted: dict[str, set[str]] = {}
        for cx in assoc.accepted_contexts:
            if cx.as_scu is False:
                continue
            self.accepted.setdefault(str(cx.abstract_syntax), set()).add(str(cx.transfer_syntax[0]))

    def msg_id(self) -> int:
        value = self.next_msg_id
        self.next_msg_id = value % 65535 + 1
        return value

    @property
    def alive(self) -> bool:
        return bool(self.assoc.is_established)

    def hold(self) -> None:
        """Pause the association reactor until :meth:`unhold` (no-op if already held)."""
        if self.checkpoint.held:
            return
        self.assoc.dul._run_loop_delay = DUL_POLL_ACTIVE_SECONDS
        self.checkpoint.held = True
        self.checkpoint.clear()
        # The reactor loop sleeps 1 ms then waits on the checkpoint: after a few ms a True
        # ``_is_paused`` can only mean it is blocked on the cleared checkpoint.
        time.sleep(0.005)
        deadline = time.monotonic() + 1.0
        while not self.assoc._is_paused and self.assoc.is_established and time.monotonic() < deadline:
            time.sleep(0.0005)

    def unhold(self) -> None:
        """Let the reactor run between batches (it notices peer releases and aborts)."""
        self.assoc.dul._run_loop_delay = DUL_POLL_IDLE_SECONDS
        self.checkpoint.held = False
        self.checkpoint.set()


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
        configure_pynetdicom()
        self.name = cfg.name
        self._cfg = cfg
        self._idle_seconds = idle_seconds
        self._ae = AE(ae_title=cfg.calling_ae_title or calling_ae_title)
        self._ae.connection_timeout = cfg.connect_timeout_seconds
        self._ae.acse_timeout = cfg.acse_timeout_seconds
        self._ae.dimse_timeout = cfg.dimse_timeout_seconds
        self._ae.network_timeout = cfg.network_timeout_seconds
        self._ae.maximum_pdu_size = cfg.max_pdu_size
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
                outcomes.setdefault(item.job_id, classify_association_failure("internal_error"))
            if self._link is not None:
                self._link.unhold()
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
                # Connection-level failures will hit every later group too: fail them all now
                # rather than waiting for the connect timeout once per group.
                targets = pending if failed.outcome.kind is OutcomeKind.RETRY else group
                for item in targets:
                    outcomes[item.job_id] = failed.outcome
                if failed.outcome.kind is OutcomeKind.RETRY:
                    return
                pending = [i for i in pending if i.job_id not in outcomes]
                continue
            lost = self._send_group(link, group, outcomes, reused)
            pending = [i for i in pending if i.job_id not in outcomes]
            if lost:
                for item in pending:
                    outcomes[item.job_id] = classify_association_failure("association_lost")
                return

    def _send_group(
        self, link: _Link, group: list[Delivery], outcomes: dict[int, Outcome], reused: bool
    ) -> bool:
        """Send one group; return True when the association was lost (the rest is not sent)."""
        for item in group:
            outcome = self._store_one(link, item)
            if (
                reused
                and link.sent == 0
                and outcome.kind is OutcomeKind.RETRY
                and outcome.reason == "association_aborted"
            ):
                # The PACS closed the idle association under us: reopen once and resend.
                self._drop_link(abort=True)
                try:
                    link, reused = self._link_for(group)
                except _OpenFailed as failed:
                    outcomes[item.job_id] = failed.outcome
                    return True
                outcome = self._store_one(link, item)
            link.sent += 1
            outcomes[item.job_id] = outcome
            if not link.alive:
                self._drop_link(abort=True)
                return True
        return False

    # -- one C-STORE --------------------------------------------------------------------

    def _store_one(self, link: _Link, item: Delivery) -> Outcome:
        accepted = link.accepted.get(str(item.sop_class_uid))
        if not accepted:
            return classify_association_failure("sop_class_not_accepted")
        payload: Any
        if str(item.transfer_syntax_uid) in accepted:
            payload = item.path  # streamed from the file, never decoded
        else:
            prepared = self._fallback_dataset(item)
            if isinstance(prepared, Outcome):
                return prepared
            payload = prepared
        started = time.monotonic()
        try:
            rsp = link.assoc.send_c_store(payload, msg_id=link.msg_id())
        except OSError as exc:
            return classify_association_failure("file_read_failed", errno.errorcode.get(exc.errno or 0, "unknown"))
        except (AttributeError, InvalidDicomError):
            return classify_association_failure("invalid_file")
        except ValueError:
            # No matching accepted context (should not happen: checked above) or encoding failed.
            return classify_association_failure("transfer_syntax_not_accepted")
        except RuntimeError:
            return classify_association_failure("association_lost")
        status = rsp.get("Status") if isinstance(rsp, Dataset) else None
        if isinstance(status, int):
            return classify_status(status)
        elapsed = time.monotonic() - started
        if elapsed >= self._cfg.dimse_timeout_seconds * 0.95:
            kind = "dimse_timeout"
        elif elapsed >= self._cfg.network_timeout_seconds * 0.95:
            kind = "network_timeout"
        elif link.alive:
            kind = "invalid_response"
        else:
            kind = "association_aborted"
        _log.warning("forward_no_response", destination=self.name, job_id=item.job_id, reason=kind)
        return classify_association_failure(kind)

    def _fallback_dataset(self, item: Delivery) -> Dataset | Outcome:
        """Read and (if needed) decompress an instance whose own syntax the PACS refused.

        The SOP Instance UID is kept (``generate_instance_uid=False``): the output UID must
        stay stable so that a re-send is idempotent at the PACS.
        """
        try:
            ds = dcmread(item.path)
        except OSError as exc:
            return classify_association_failure("file_read_failed", errno.errorcode.get(exc.errno or 0, "unknown"))
        except (InvalidDicomError, ValueError, AttributeError):
            return classify_association_failure("invalid_file")
        ts = UID(str(ds.file_meta.get("TransferSyntaxUID", item.transfer_syntax_uid)))
        if ts.is_compressed:
            try:
                ds.decompress(generate_instance_uid=False)
            except Exception:  # any codec failure: no little endian copy can be made
                return classify_association_failure("transfer_syntax_not_accepted", "decompression_failed")
        elif not ts.is_little_endian:
            # Big endian to little endian would need per-element byte swapping of OW data.
            return classify_association_failure("transfer_syntax_not_accepted", "big_endian")
        return ds

    # -- associations -------------------------------------------------------------------

    def _link_for(self, group: Sequence[Delivery]) -> tuple[_Link, bool]:
        """Reuse the open association when it covers the group's contexts, else open one."""
        needed = _pairs_for(group)
        link = self._link
        if link is not None and link.alive and set(needed) <= link.pairs:
            link.hold()
            return link, True
        wanted = list(needed)
        if link is not None and link.alive:
            # Keep the old contexts too when they fit, so alternating batches do not churn.
            merged = list(dict.fromkeys(list(link.pairs) + needed))
            if len(merged) <= MAX_CONTEXTS:
                wanted = merged
        self._drop_link(abort=False)
        self._link = self._open(wanted)
        self._link.hold()
        return self._link, False

    def _open(self, pairs: list[tuple[str, str]]) -> _Link:
        contexts: list[PresentationContext] = [build_context(sop, ts) for sop, ts in pairs]
        seen = {"conn_open": False, "accepted": False}

        def on_open(event: evt.Event) -> None:
            seen["conn_open"] = True
            _set_nodelay(event)

        def on_accepted(_: evt.Event) -> None:
            seen["accepted"] = True

        started = time.monotonic()
        cfg = self._cfg
        try:
            assoc = self._ae.associate(
                cfg.host,
                cfg.port,
                contexts=contexts,
                ae_title=cfg.ae_title,
                max_pdu=cfg.max_pdu_size,
                evt_handlers=[(evt.EVT_CONN_OPEN, on_open), (evt.EVT_ACCEPTED, on_accepted)],
            )
        except (OSError, ValueError, RuntimeError) as exc:
            _log.warning("forward_association_failed", destination=self.name, reason="connect_failed",
                         error_type=type(exc).__name__)
            raise _OpenFailed(classify_association_failure("connect_failed")) from exc
        if assoc.is_established:
            bound_send_queue(assoc)
            self.associations_opened += 1
            return _Link(assoc, frozenset(pairs))
        outcome = self._failure_outcome(assoc, seen, time.monotonic() - started)
        _log.warning("forward_association_failed", destination=self.name, reason=outcome.reason)
        raise _OpenFailed(outcome)

    def _failure_outcome(self, assoc: Association, seen: dict[str, bool], elapsed: float) -> Outcome:
        """Name why an association was not established (fixed codes only)."""
        if assoc.is_rejected:
            rsp = assoc.acceptor.primitive
            result = int(getattr(rsp, "result", 1) or 1)
            source = int(getattr(rsp, "result_source", 0) or 0)
            diagnostic = int(getattr(rsp, "diagnostic", 0) or 0)
            kind, detail = reject_reason(result, source, diagnostic)
            return classify_association_failure(kind, detail)
        if not seen["conn_open"]:
            # pynetdicom swallows the OSError; a failure that took the whole connect timeout
            # is a timeout, anything faster was refused (or unreachable).
            if elapsed >= self._cfg.connect_timeout_seconds * 0.95:
                return classify_association_failure("connect_timeout")
            return classify_association_failure("connection_refused")
        if seen["accepted"]:
            # Accepted but every presentation context was refused: pynetdicom aborts.
            return classify_association_failure("sop_class_not_accepted")
        if assoc.is_aborted:
            return classify_association_failure("association_aborted")
        return classify_association_failure("acse_timeout")

    def _drop_link(self, abort: bool) -> None:
        link, self._link = self._link, None
        if link is None:
            return
        link.unhold()
        try:
            if link.alive and not abort:
                link.assoc.release()
            elif link.alive:
                link.assoc.abort()
        except Exception:  # the association is gone either way
            pass

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
