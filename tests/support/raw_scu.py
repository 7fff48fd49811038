"""A low-level pynetdicom Storage SCU for hostile-input tests.

dcmtk's storescu only sends well-formed files whose command matches the data set. A hostile
or broken modality does not: this SCU sends arbitrary data-set bytes under a command whose
SOP Class / Instance UIDs are chosen separately, and can stop in the middle of a transfer
and abort the association.
"""

from __future__ import annotations

import socket
import time
from io import BytesIO
from pathlib import Path
from types import TracebackType
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import UID
from pynetdicom import AE, evt
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import split_dataset
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]


def dataset_bytes(path: Path) -> tuple[bytes, str, str, str]:
    """(data set bytes without file meta, SOP Class UID, SOP Instance UID, transfer syntax) of a Part-10 file."""
    meta, offset = split_dataset(path)
    data = path.read_bytes()[offset:]
    return data, str(meta.MediaStorageSOPClassUID), str(meta.MediaStorageSOPInstanceUID), str(meta.TransferSyntaxUID)


def encode(ds: Dataset, implicit: bool = False, little: bool = True) -> bytes:
    """Encode a data set body (no preamble, no file meta) the way it travels in P-DATA."""
    fp = DicomBytesIO()
    fp.is_implicit_VR = implicit
    fp.is_little_endian = little
    write_dataset(fp, ds)
    return fp.getvalue()


def _nodelay(event: Any) -> None:
    sock = event.assoc.dul.socket
    if sock is not None and sock.socket is not None:
        sock.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class RawSCU:
    """One association to ``127.0.0.1:port`` proposing ``contexts`` [(sop_class, [syntaxes])] and Verification."""

    def __init__(
        self,
        port: int,
        contexts: list[tuple[str, list[str]]],
        called_aet: str = "DEID_ROUTER",
        calling_aet: str = "MODALITY",
        max_pdu: int = 16382,
        dimse_timeout: float = 30.0,
    ) -> None:
        self.port = port
        self.called_aet = called_aet
        self.max_pdu = max_pdu
        self.ae = AE(ae_title=calling_aet)
        self.ae.dimse_timeout = dimse_timeout
        self.ae.acse_timeout = 10
        self.ae.network_timeout = 30
        self.ae.maximum_pdu_size = max_pdu
        self.ae.add_requested_context(Verification)
        for sop_class, syntaxes in contexts:
            self.ae.add_requested_context(sop_class, syntaxes)
        self.assoc: Any = None

    def __enter__(self) -> RawSCU:
        self.assoc = self.ae.associate(
            "127.0.0.1", self.port, ae_title=self.called_aet, evt_handlers=[(evt.EVT_CONN_OPEN, _nodelay)]
        )
        if not self.assoc.is_established:
            raise AssertionError("association to the router was not established")
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.assoc is not None and self.assoc.is_established:
            self.assoc.release()

    def _context_id(self, sop_class: str, syntax: str) -> int:
        for cx in self.assoc.accepted_contexts:
            if cx.abstract_syntax == sop_class and cx.transfer_syntax[0] == syntax:
                return int(cx.context_id)
        raise AssertionError(f"no accepted context for {sop_class} / {syntax}")

    def _request(self, sop_class: str, sop_instance: str, data: bytes) -> C_STORE:
        req = C_STORE()
        req.MessageID = 1
        req.Priority = 2
        # The setters validate UIDs only loosely (they log); hostile UIDs go out as given.
        req.AffectedSOPClassUID = UID(sop_class)
        req.AffectedSOPInstanceUID = UID(sop_instance)
        req.DataSet = BytesIO(data)
        return req

    def store(self, data: bytes, sop_class: str, sop_instance: str, syntax: str) -> int | None:
        """Send one C-STORE with the given data-set bytes; the response status, or None (no answer)."""
        assoc = self.assoc
        cid = self._context_id(sop_class, syntax)
        req = self._request(sop_class, sop_instance, data)
        assoc._reactor_checkpoint.clear()
        while not assoc._is_paused:
            time.sleep(0.0001)
        try:
            assoc.dimse.send_msg(req, cid)
            _cx, rsp = assoc.dimse.get_msg(block=True)
        finally:
            assoc._reactor_checkpoint.set()
        if rsp is None:
            return None
        return int(rsp.Status)

    def store_file(self, path: Path) -> int | None:
        data, sop_class, sop_instance, syntax = dataset_bytes(path)
        return self.store(data, sop_class, sop_instance, syntax)

    def send_part_then_abort(
        self, data: bytes, sop_class: str, sop_instance: str, syntax: str, fragments: int, pause: float = 0.5
    ) -> int:
        """Send the command and the first ``fragments`` P-DATA PDUs of the data set, then A-ABORT.

        Returns how many P-DATA PDUs went out (command included).
        """
        assoc = self.assoc
        cid = self._context_id(sop_class, syntax)
        msg = C_STORE_RQ()
        msg.primitive_to_message(self._request(sop_class, sop_instance, data))
        sent = 0
        for pdata in msg.encode_msg(cid, self.max_pdu):
            assoc.dul.send_pdu(pdata)
            sent += 1
            if sent >= fragments:
                break
        time.sleep(pause)  # let the router receive (and write) what was sent
        assoc.abort()
        return sent

    def echo(self) -> int:
        return int(self.assoc.send_c_echo().Status)


def read_header(path: Path) -> Dataset:
    return dcmread(path, stop_before_pixels=True)
