"""The DICOM listener: a pynetdicom AE answering C-ECHO and C-STORE.

The C-STORE handler never decodes more than the header, never builds a path from a value the
peer sent, and answers 0x0000 only after the raw file is fsync'd and its jobs are committed.
pynetdicom's chunked receive writes the dataset to a temporary file inside the holding area
(same filesystem), which :class:`Intake` then renames into place: memory stays flat for
multi-gigabyte instances.
"""

from __future__ import annotations

import hashlib
import os
import socket
import struct
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ImplicitVRLittleEndian
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION
from pynetdicom import _config as pnd_config
from pynetdicom import dimse_messages as pnd_dimse_messages
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from deid_router.config import ListenerConfig
from deid_router.deid.keys import Keys
from deid_router.db.repository import JobRepository, NewInstance
from deid_router.errors import QueueError, StorageError
from deid_router.faults import fault_point
from deid_router.observability.logging import get_logger
from deid_router.routing import Router, RoutingFacts
from deid_router.scp import statuses
from deid_router.scp.integrity import (
    MODALITY,
    SOP_CLASS_UID,
    SOP_INSTANCE_UID,
    Malformed,
    read_meta,
    walk_top_level,
)
from deid_router.store.holding import Holding, start_writeback

log = get_logger("scp")

# Transfer syntaxes accepted for every storage SOP class: the common ones of the issue.
TRANSFER_SYNTAXES = [
    "1.2.840.10008.1.2",  # implicit VR little endian
    "1.2.840.10008.1.2.1",  # explicit VR little endian
    "1.2.840.10008.1.2.1.99",  # deflated explicit VR little endian
    "1.2.840.10008.1.2.2",  # explicit VR big endian (retired, still sent by old modalities)
    "1.2.840.10008.1.2.4.50",  # JPEG baseline
    "1.2.840.10008.1.2.4.51",  # JPEG extended
    "1.2.840.10008.1.2.4.57",  # JPEG lossless
    "1.2.840.10008.1.2.4.70",  # JPEG lossless SV1
    "1.2.840.10008.1.2.4.80",  # JPEG-LS lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS near-lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.5",  # RLE lossless
]


def set_nodelay(event: Any) -> None:
    """pynetdicom never sets TCP_NODELAY: without it each response waits for a delayed ACK."""
    try:
        sock = event.assoc.dul.socket.socket
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (AttributeError, OSError):
        pass


class GuardedReceiveFile:
    """pynetdicom's temporary file for a chunked C-STORE receive, made to survive a full disk.

    pynetdicom writes each P-DATA fragment from its DUL reactor thread; an OSError there
    (ENOSPC) killed that thread: the association was aborted instead of answered, and the
    truncated file stayed in incoming/ until the next start. Here a failed write is recorded,
    the partial file removed at once (freeing its space), the rest of the transfer discarded,
    and the C-STORE handler answers 0xA700 so the modality keeps the instance and retries.

    It also does, while the bytes arrive, the work the acknowledgement would otherwise wait
    for: it hashes them (the duplicate/conflict check needs the digest) and starts their
    writeback to disk, so the fsync before 0x0000 has little left to do.
    """

    WRITEBACK_BYTES = 256 * 1024

    def __init__(self, **kwargs: Any) -> None:
        self.failed = False
        self._ntf: Any = None
        self._hash = hashlib.sha256()
        self._written = 0
        self._flushed_to_disk = 0
        try:
            self._ntf = tempfile.NamedTemporaryFile(**kwargs)
            self.name: str = self._ntf.name
        except OSError:
            self.failed = True
            self.name = os.path.join(tempfile.gettempdir(), f"unwritable-{uuid.uuid4().hex}.dcm")
        self.file = self  # pynetdicom calls ``.file.flush()``

    def write(self, data: bytes) -> int:
        if not self.failed:
            try:
                self._ntf.write(data)
            except OSError:
                self._fail()
            else:
                self._hash.update(data)  # releases the GIL for chunks over 2 KB
                self._written += len(data)
        return len(data)

    def flush(self) -> None:
        if not self.failed:
            try:
                self._ntf.file.flush()
                pending = self._written - self._flushed_to_disk
                if pending >= self.WRITEBACK_BYTES:
                    start_writeback(self._ntf.file.fileno(), self._flushed_to_disk, pending)
                    self._flushed_to_disk = self._written
            except OSError:
                self._fail()

    def sha256(self) -> str | None:
        """Digest of every byte written, or None if a write failed."""
        return None if self.failed else self._hash.hexdigest()

    def _fail(self) -> None:
        self.failed = True
        self.close()
        try:
            os.unlink(self.name)
        except OSError:
            pass

    def close(self) -> None:
        if self._ntf is not None:
            ntf, self._ntf = self._ntf, None
            try:
                ntf.close()  # closes the descriptor even when the final flush fails
            except OSError:
                self.failed = True


@dataclass(frozen=True)
class ReceivedFileMeta:
    """The File Meta Information pynetdicom writes at the head of each received file.

    pynetdicom builds it as a pydicom FileMetaDataset and encodes it with pydicom's writer:
    about a tenth of the listener's CPU per instance. These are the same bytes, encoded
    directly (explicit VR little endian, PS3.10 7.1).
    """

    encoded: bytes


def _meta_element(elem: int, vr: bytes, text: str) -> bytes:
    # A hostile command UID (not latin-1, or longer than a 16-bit length) must not kill the
    # DUL thread; the handler refuses such an instance anyway (UIDs over 64 bytes).
    value = str(text).encode("latin-1", "replace")[:1024]
    if len(value) % 2:
        value += b"\0" if vr == b"UI" else b" "
    if vr == b"OB":
        return struct.pack("<HH2sHL", 0x0002, elem, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, elem, vr, len(value)) + value


def create_file_meta(
    *, sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str,
    implementation_uid: str = PYNETDICOM_IMPLEMENTATION_UID,
    implementation_version: str = PYNETDICOM_IMPLEMENTATION_VERSION,
) -> ReceivedFileMeta:
    """Stands in for ``pynetdicom.dsutils.create_file_meta`` in the chunked receive path."""
    body = b"".join((
        _meta_element(0x0001, b"OB", "\0\1"),
        _meta_element(0x0002, b"UI", sop_class_uid),
        _meta_element(0x0003, b"UI", sop_instance_uid),
        _meta_element(0x0010, b"UI", transfer_syntax),
        _meta_element(0x0012, b"UI", implementation_uid),
        _meta_element(0x0013, b"SH", implementation_version),
    ))
    return ReceivedFileMeta(struct.pack("<HH2sHL", 0x0002, 0x0000, b"UL", 4, len(body)) + body)


def write_file_meta_info(fp: Any, meta: ReceivedFileMeta) -> None:
    """Stands in for ``pydicom.filewriter.write_file_meta_info`` in the chunked receive path."""
    fp.write(meta.encoded)


@dataclass(frozen=True)
class StoreRequest:
    """What the handler knows about one C-STORE, none of it a dataset value except UIDs."""

    received_path: Path
    command_sop_class_uid: str
    command_sop_instance_uid: str
    transfer_syntax: str
    calling_aet: str
    called_aet: str
    received_sha256: str | None = None  # computed while receiving; None: hash the file


def read_complete_header(path: Path) -> tuple[str, str, str]:
    """(SOP Class UID, SOP Instance UID, Modality) of a received file whose element structure
    fills the file exactly; raises :class:`Malformed` for a truncated or inconsistent file.

    pydicom alone accepts a transfer cut short (it stops at the last byte) and never looks past
    the header, so a truncated instance would be acknowledged and fail only in the worker.
    One walk of the element headers checks the structure and picks up the three values.
    """
    with open(path, "rb") as fp:
        size = os.fstat(fp.fileno()).st_size
        ts, offset = read_meta(fp, size)
        if ts == DeflatedExplicitVRLittleEndian:  # the worker inflates and reads it whole
            fp.seek(0)
            header = dcmread(fp, stop_before_pixels=True)
            facts = (str(header.SOPClassUID), str(header.SOPInstanceUID), str(header.get("Modality", "") or ""))
        else:
            top = walk_top_level(fp, offset, size, ts == ImplicitVRLittleEndian, ts != ExplicitVRBigEndian)
            if top.image_without_pixels:
                # an image whose transfer stopped at an element boundary before its pixel data
                raise Malformed("image attributes without pixel data")
            facts = (top.text(SOP_CLASS_UID), top.text(SOP_INSTANCE_UID), top.text(MODALITY))
    sop_class, sop_instance, _modality = facts
    if not (0 < len(sop_instance) <= 64 and 0 < len(sop_class) <= 64):
        raise Malformed("UID length out of range")
    return facts


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
            sop_class, sop_instance, modality = read_complete_header(req.received_path)
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
        destinations = self.router.destinations_for(
            RoutingFacts(req.calling_aet, req.called_aet, modality[:16], sop_class)
        )
        if not destinations:
            log.warning("instance_refused_no_route", modality=modality[:16], **ctx)
            return statuses.SOP_CLASS_NOT_SUPPORTED

        instance_id = self.holding.new_id()
        try:
            stored = self.holding.adopt_raw(instance_id, req.received_path, req.received_sha256)
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


class ReserveAwareAE(AE):
    """An AE that refuses new associations (A-ASSOCIATE-RJ, transient, local limit exceeded)
    while the holding disk is below its free-space reserve.

    pynetdicom rejects transiently when the active acceptors exceed ``maximum_associations``;
    reporting a limit of 0 while space is short is that same rejection, so the modality keeps
    its images and tries again later instead of filling our disk.
    """

    def __init__(self, ae_title: str, has_space: Callable[[], bool]) -> None:
        super().__init__(ae_title=ae_title)
        self._has_space = has_space

    @property
    def maximum_associations(self) -> int:
        if not self._has_space():
            log.warning("association_refused_low_disk")
            return 0
        return self._maximum_associations

    @maximum_associations.setter
    def maximum_associations(self, value: int) -> None:
        self._maximum_associations = max(1, int(value))


class ReusePortServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with SO_REUSEPORT, so several listener processes of one
    node share the port and the kernel spreads associations over them (both cores)."""

    def server_bind(self) -> None:
        sock = cast(socket.socket, self.socket)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()


class Listener:
    """Owns the pynetdicom AE and its server thread."""

    def __init__(self, config: ListenerConfig, intake: Intake, incoming_dir: Path) -> None:
        self.config = config
        self.intake = intake
        self.incoming_dir = incoming_dir
        self._server: Any = None
        self.ae = self._build_ae()

    def _build_ae(self) -> AE:
        # Global pynetdicom settings, set once: receive to disk, any storage class.
        pnd_config.STORE_RECV_CHUNKED_DATASET = True
        pnd_config.UNRESTRICTED_STORAGE_SERVICE = True
        pnd_dimse_messages.NamedTemporaryFile = GuardedReceiveFile  # type: ignore[attr-defined,assignment]
        pnd_dimse_messages.create_file_meta = create_file_meta  # type: ignore[attr-defined,assignment]
        pnd_dimse_messages.write_file_meta_info = write_file_meta_info  # type: ignore[attr-defined,assignment]
        # pynetdicom's NamedTemporaryFile lands in tempfile's directory: put it on the holding
        # filesystem so the received file can be renamed into place instead of copied.
        tempfile.tempdir = str(self.incoming_dir)
        ae = ReserveAwareAE(self.config.ae_title, self.intake.has_space)
        ae.maximum_associations = self.config.max_associations
        ae.maximum_pdu_size = self.config.max_pdu_size
        ae.network_timeout = self.config.network_timeout_seconds
        ae.dimse_timeout = self.config.dimse_timeout_seconds
        ae.acse_timeout = 30
        ae.require_called_aet = True
        ae.require_calling_aet = list(self.config.allowed_calling_aets)
        ae.add_supported_context(Verification)
        for cx in AllStoragePresentationContexts:
            if cx.abstract_syntax is not None:
                ae.add_supported_context(cx.abstract_syntax, TRANSFER_SYNTAXES)
        return ae

    def _on_store(self, event: Any) -> int:
        req = event.request
        assoc = event.assoc
        received = getattr(req, "_dataset_file", None)
        if getattr(received, "failed", False):
            log.error("instance_refused_write_failed", calling_aet=assoc.requestor.ae_title.strip())
            return statuses.OUT_OF_RESOURCES
        return self.intake.accept(
            StoreRequest(
                received_path=event.dataset_path,
                command_sop_class_uid=str(req.AffectedSOPClassUID),
                command_sop_instance_uid=str(req.AffectedSOPInstanceUID),
                transfer_syntax=str(event.context.transfer_syntax),
                calling_aet=assoc.requestor.ae_title.strip(),
                called_aet=assoc.acceptor.ae_title.strip(),
                received_sha256=received.sha256() if isinstance(received, GuardedReceiveFile) else None,
            )
        )

    def _on_transfer_cut(self, event: Any) -> None:
        """Delete the receive file of a C-STORE the peer never finished (A-ABORT, lost connection).

        pynetdicom creates that file with ``delete=False`` and forgets it when the association
        ends mid-message: each aborted transfer left up to an instance's size in incoming/
        until the next restart. A completed message is detached from ``dimse.message`` before
        its handler runs, so only an unfinished transfer is found here.
        """
        message: Any = getattr(getattr(event.assoc, "dimse", None), "message", None)
        partial = getattr(message, "_data_set_file", None)
        if message is None or partial is None:
            return
        message._data_set_file = None
        try:
            partial.close()
        except OSError:
            pass
        try:
            os.unlink(partial.name)
            log.info("instance_transfer_cut", calling_aet=event.assoc.requestor.ae_title.strip())
        except OSError:
            pass

    def _on_echo(self, event: Any) -> int:
        return statuses.SUCCESS

    def _on_rejected(self, event: Any) -> None:
        log.warning("association_rejected", calling_aet=event.assoc.requestor.ae_title.strip())

    def start(self) -> None:
        handlers: list[Any] = [
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_CONN_OPEN, set_nodelay),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_ABORTED, self._on_transfer_cut),
            (evt.EVT_CONN_CLOSE, self._on_transfer_cut),
        ]
        # Share the port only between this node's own listener processes: with one process a
        # second node started by mistake on the same port must fail to bind, not share it.
        server_class = ReusePortServer if self.config.processes != 1 else ThreadedAssociationServer
        server = self.ae.make_server((self.config.host, self.config.port), evt_handlers=handlers, server_class=server_class)
        threading.Thread(target=server.serve_forever, name="dicom-listener", daemon=True).start()
        self.ae._servers.append(server)  # so ae.shutdown() and server.shutdown() find it
        self._server = server
        log.info("listener_started", ae_title=self.config.ae_title, port=self.port)

    @property
    def port(self) -> int:
        if self._server is None:
            return self.config.port
        return int(self._server.server_address[1])

    def active_associations(self) -> int:
        """Established incoming associations: the transfers a clean stop waits for.

        A connection that never sent an A-ASSOCIATE-RQ (a TCP health check, a port probe)
        carries no transfer; pynetdicom keeps its thread until the ACSE timeout, and counting
        it made every SIGTERM wait the whole grace period.
        """
        return len([a for a in self.ae.active_associations if a.is_acceptor and a.is_established])

    def shutdown(self, grace_seconds: float = 20.0) -> None:
        """Stop accepting, let running transfers finish for a while, then abort the rest.

        An aborted transfer was never acknowledged, so the modality keeps and re-sends it.
        """
        if self._server is None:
            return
        self._server.shutdown()
        self._server = None
        deadline = time.monotonic() + grace_seconds
        while self.active_associations() and time.monotonic() < deadline:
            time.sleep(0.1)
        for assoc in list(self.ae.active_associations):
            assoc.abort()
        log.info("listener_stopped")
