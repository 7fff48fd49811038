"""The DICOM listener: answers C-ECHO and C-STORE, acknowledging only what is durably held.

The intake never decodes more than the header, never builds a path from a value the peer
sent, and answers 0x0000 only after the raw file is fsync'd and its jobs are committed.
The acceptor (:mod:`deid_router.scp.acceptor`) streams each data set straight into its raw
file in the holding area, which :class:`Intake` checks, commits and enqueues: memory stays
flat for multi-gigabyte instances.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ImplicitVRLittleEndian

from deid_router.config import ListenerConfig
from deid_router.deid.keys import Keys
from deid_router.db.repository import JobRepository, NewInstance
from deid_router.errors import ListenerError, QueueError, StorageError, TlsError
from deid_router.faults import fault_point
from deid_router.observability.logging import get_logger
from deid_router.routing import Router, RoutingFacts
from deid_router.scp import statuses
from deid_router.scp.acceptor import Acceptor, AcceptorSettings
from deid_router.scp.commitment import Commitment
from deid_router.scp.integrity import (
    MODALITY,
    SOP_CLASS_UID,
    SOP_INSTANCE_UID,
    Malformed,
    read_meta,
    walk_top_level,
)
from deid_router.scp.receive import StoreRequest
from deid_router.store.holding import Holding
from deid_router.tls import server_context_for

__all__ = ["Header", "Intake", "Listener", "StoreRequest", "read_complete_header", "read_header"]

log = get_logger("scp")

@dataclass(frozen=True)
class Header:
    """What the acknowledgement path reads of a received file (the routed attributes may be
    PHI: they are matched, never logged or stored)."""

    sop_class_uid: str
    sop_instance_uid: str
    modality: str
    attributes: dict[int, tuple[str, ...]] = field(default_factory=dict)


def read_complete_header(path: Path) -> tuple[str, str, str]:
    """(SOP Class UID, SOP Instance UID, Modality) of a received file whose element structure
    fills the file exactly; raises :class:`Malformed` for a truncated or inconsistent file."""
    h = read_header(path)
    return h.sop_class_uid, h.sop_instance_uid, h.modality


def read_header(path: Path, capture: frozenset[int] = frozenset()) -> Header:
    """The routing header of a received file whose element structure fills the file exactly;
    raises :class:`Malformed` for a truncated or inconsistent file.

    pydicom alone accepts a transfer cut short (it stops at the last byte) and never looks past
    the header, so a truncated instance would be acknowledged and fail only in the worker.
    One walk of the element headers checks the structure and picks up the UIDs, the modality
    and the top-level attributes in ``capture`` (those the routes name).
    """
    with open(path, "rb") as fp:
        size = os.fstat(fp.fileno()).st_size
        ts, offset = read_meta(fp, size)
        if ts == DeflatedExplicitVRLittleEndian:  # the worker inflates and reads it whole
            fp.seek(0)
            header = dcmread(fp, stop_before_pixels=True)
            attributes: dict[int, tuple[str, ...]] = {}
            for tag in capture:
                elem = header.get(tag)
                if elem is not None and elem.value is not None and elem.VR != "SQ":
                    values = elem.value if elem.VM > 1 else [elem.value]
                    attributes[tag] = tuple(str(v).strip() for v in values)
            h = Header(str(header.SOPClassUID), str(header.SOPInstanceUID),
                       str(header.get("Modality", "") or ""), attributes)
        else:
            top = walk_top_level(fp, offset, size, ts == ImplicitVRLittleEndian, ts != ExplicitVRBigEndian, capture)
            if top.image_without_pixels:
                # an image whose transfer stopped at an element boundary before its pixel data
                raise Malformed("image attributes without pixel data")
            h = Header(top.text(SOP_CLASS_UID), top.text(SOP_INSTANCE_UID), top.text(MODALITY),
                       top.attribute_values(capture))
    if not (0 < len(h.sop_instance_uid) <= 64 and 0 < len(h.sop_class_uid) <= 64):
        raise Malformed("UID length out of range")
    return h


class Intake:
    """Hold then enqueue one received instance; returns the DIMSE status to answer."""

    def __init__(
        self, holding: Holding, repo: JobRepository, router: Router, keys: Keys, min_free_bytes: int
    ) -> None:
        self.holding = holding
        self.repo = repo
        self.router = router
        self.keys = keys
        self.min_free_bytes = min_free_bytes
        self.capture = router.captured_tags()  # the attributes routes match on: read by the walk
        # Raw files whose enqueue failed with the commit outcome unknown (database unreachable
        # even for the check): kept until the database can say whether their row exists.
        self._unsure: set[str] = set()
        self._unsure_lock = threading.Lock()

    def has_space(self) -> bool:
        """True while the holding disk has more free space than the configured reserve."""
        try:
            return self.holding.free_bytes() >= self.min_free_bytes
        except OSError:
            return False

    def accept(self, req: StoreRequest) -> int:
        sop_hash = self.keys.token("log", req.command_sop_instance_uid)[:16]
        ctx = {"calling_aet": req.calling_aet, "uid_hash": sop_hash}
        if not self.has_space():
            log.warning("instance_refused_low_disk", **ctx)
            return statuses.OUT_OF_RESOURCES
        try:
            header = read_header(req.raw.path, self.capture)
            sop_class, sop_instance, modality = header.sop_class_uid, header.sop_instance_uid, header.modality
        except Malformed as exc:
            log.warning("instance_refused_malformed", reason=str(exc), **ctx)
            return statuses.CANNOT_UNDERSTAND
        except (InvalidDicomError, AttributeError, ValueError, KeyError, EOFError, OSError, TypeError) as exc:
            log.warning("instance_refused_unreadable", error=type(exc).__name__, **ctx)
            return statuses.CANNOT_UNDERSTAND
        except Exception as exc:  # pydicom raises many things on hostile input
            log.warning("instance_refused_unreadable", error=type(exc).__name__, **ctx)
            return statuses.CANNOT_UNDERSTAND
        if sop_class != req.command_sop_class_uid:
            log.warning("instance_refused_sop_class_mismatch", **ctx)
            return statuses.DATASET_DOES_NOT_MATCH_SOP_CLASS
        if sop_instance != req.command_sop_instance_uid:
            log.warning("instance_refused_sop_instance_mismatch", **ctx)
            return statuses.CANNOT_UNDERSTAND
        destinations = self.router.targets_for(
            RoutingFacts(req.calling_aet, req.called_aet, modality[:16], sop_class, header.attributes)
        )
        if not destinations:
            log.warning("instance_refused_no_route", modality=modality[:16], **ctx)
            return statuses.SOP_CLASS_NOT_SUPPORTED

        instance_id = req.raw.instance_id
        try:
            stored = req.raw.commit()
        except StorageError as exc:
            log.error("instance_store_failed", reason=str(exc), **ctx)
            return statuses.OUT_OF_RESOURCES
        fault_point("after_fsync_before_commit")
        try:
            result = self.repo.enqueue(
                NewInstance(
                    instance_id=instance_id,
                    sop_key=self.keys.token("sop_instance_uid", sop_instance),
                    content_sha256=stored.sha256,
                    raw_path=stored.relative_path,
                    size=stored.size,
                    sop_class_uid=sop_class[:64],
                    transfer_syntax=req.transfer_syntax[:64],
                    calling_aet=req.calling_aet[:16],
                    called_aet=req.called_aet[:16],
                    modality=modality[:16],
                ),
                destinations,
            )
        except QueueError as exc:
            reason = type(exc.__cause__ or exc).__name__
            # The error may have come after the COMMIT reached the database (its reply was
            # lost): then the jobs exist and need this raw file. Deleting it on every queue
            # error lost such instances (quarantined as missing raw, re-send taken as duplicate).
            committed = self._committed(stored.relative_path)
            if committed:
                log.warning("instance_enqueue_commit_confirmed", instance_id=instance_id, reason=reason, **ctx)
                return statuses.SUCCESS  # durable and committed: exactly what 0x0000 promises
            if committed is None:
                with self._unsure_lock:
                    self._unsure.add(stored.relative_path)
            else:
                self._discard(stored.relative_path)
            log.error("instance_enqueue_failed", reason=reason, **ctx)
            return statuses.OUT_OF_RESOURCES
        except Exception as exc:
            self._discard(stored.relative_path)
            log.error("instance_enqueue_failed", reason=type(exc).__name__, **ctx)
            return statuses.OUT_OF_RESOURCES
        fault_point("after_commit_before_response")
        self._resolve_unsure()
        if result.duplicate:
            self._discard(stored.relative_path)
            log.info("instance_duplicate", instance_id=result.instance_id, **ctx)
        else:
            log.info(
                "instance_received",
                instance_id=instance_id,
                jobs=len(result.job_ids),
                size=stored.size,
                conflict=result.conflict,
                **ctx,
            )
        return statuses.SUCCESS

    def _committed(self, relative_path: str) -> bool | None:
        """Does a committed row own this raw file? None when the database cannot tell."""
        try:
            return relative_path in self.repo.known_raw_paths([relative_path])
        except QueueError:
            return None

    def _resolve_unsure(self) -> None:
        """The database answers again: delete kept raw files that no committed row owns."""
        with self._unsure_lock:
            if not self._unsure:
                return
            pending = sorted(self._unsure)
        try:
            known = self.repo.known_raw_paths(pending)
        except QueueError:
            return
        for rel in pending:
            if rel not in known:
                self._discard(rel)
        with self._unsure_lock:
            self._unsure.difference_update(pending)
        log.info("unsure_raw_files_resolved", kept=len(known), deleted=len(pending) - len(known))

    def _discard(self, relative_path: str) -> None:
        try:
            self.holding.delete(relative_path)
        except StorageError:
            log.error("raw_discard_failed")


class Listener:
    """Owns the acceptor and its server thread."""

    def __init__(
        self, config: ListenerConfig, intake: Intake, commitment: Commitment | None = None,
        on_refused: Callable[[str, str, str], None] | None = None,
    ) -> None:
        self.config = config
        self.intake = intake
        self._port: int | None = None
        self._tls_port: int | None = None
        self.acceptor = Acceptor(
            AcceptorSettings(
                ae_title=config.ae_title,
                allowed_calling_aets=tuple(config.allowed_calling_aets),
                max_associations=config.max_associations,
                max_pdu_size=config.max_pdu_size,
                network_timeout_seconds=config.network_timeout_seconds,
                dimse_timeout_seconds=config.dimse_timeout_seconds,
                artim_timeout_seconds=config.artim_timeout_seconds,
                allowed_hosts=config.allowed_hosts,
                max_pending_connections=config.max_pending_connections,
                max_pending_per_host=config.max_pending_per_host,
            ),
            intake.holding.new_raw_file,
            store=intake.accept,
            has_space=intake.has_space,
            commitment=commitment,
            on_refused=on_refused,
        )

    def start(self) -> None:
        # Share the port only between this node's own listener processes: with one process a
        # second node started by mistake on the same port must fail to bind, not share it.
        cfg, reuse = self.config, self.config.processes != 1
        if cfg.tls is not None:
            try:
                context = server_context_for(cfg.tls)
            except TlsError as exc:
                raise ListenerError(f"listener.tls.{exc.key}: {exc.reason}") from exc
            self._tls_port = self.acceptor.start_tls(cfg.host, cfg.tls.port, reuse, context)
        if cfg.plain:
            self._port = self.acceptor.start(cfg.host, cfg.port, reuse_port=reuse)
        else:
            self._port = self._tls_port
        self.intake.holding.start_reserve()
        log.info("listener_started", ae_title=cfg.ae_title, port=self.port if cfg.plain else None, tls_port=self._tls_port)

    @property
    def port(self) -> int:
        """The plain DICOM port (the TLS port when ``listener.plain = false``)."""
        return self.config.port if self._port is None else self._port

    @property
    def listening(self) -> bool:
        """True between ``start`` and ``shutdown`` (what ``/readyz`` reports)."""
        return self._port is not None

    @property
    def tls_port(self) -> int | None:
        return self._tls_port

    def reload_tls(self) -> bool:
        """Read the certificate, key and CA files again (SIGHUP): new connections use them,
        established associations keep theirs. A bad file keeps the old context."""
        if self.config.tls is None or self._tls_port is None:
            return False
        try:
            self.acceptor.set_tls_context(server_context_for(self.config.tls))
        except TlsError as exc:
            log.error("tls_reload_failed", key=f"listener.tls.{exc.key}", reason=exc.reason)
            return False
        log.info("tls_reloaded", tls_port=self._tls_port)
        return True

    def refusals(self) -> dict[str, int]:
        """Connections and associations refused since start, by reason (for metrics)."""
        return self.acceptor.refusals.snapshot()

    def pending_connections(self) -> int:
        """Connections still in the front door (no complete A-ASSOCIATE-RQ yet)."""
        return self.acceptor.pending()

    def active_associations(self) -> int:
        """Established incoming associations: the transfers a clean stop waits for.

        A connection that never sent an A-ASSOCIATE-RQ (a TCP health check, a port probe)
        carries no transfer and is not counted: counting it made every SIGTERM wait the
        whole grace period.
        """
        return self.acceptor.established()

    def shutdown(self, grace_seconds: float = 20.0) -> None:
        """Stop accepting, let running transfers finish for a while, then abort the rest.

        An aborted transfer was never acknowledged, so the modality keeps and re-sends it.
        """
        if self._port is None:
            return
        self.acceptor.stop_accepting()
        self._port = self._tls_port = None
        deadline = time.monotonic() + grace_seconds
        while self.active_associations() and time.monotonic() < deadline:
            time.sleep(0.1)
        self.acceptor.abort_all()
        self.intake.holding.stop_reserve()
        log.info("listener_stopped")
