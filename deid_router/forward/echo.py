"""C-ECHO (Verification, PS3.4 A) to a destination, for an operator's "is the PACS there?".

pynetdicom's requestor is fine here: one association per click, nowhere near the send path.
The answer is a fixed phrase and the status code; nothing here carries a tag value.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from deid_router.config import DestinationConfig


@dataclass(frozen=True)
class EchoResult:
    ok: bool
    status: int | None
    detail: str  # fixed text: "echo answered", "association rejected", ...


def echo(dest: DestinationConfig, calling_ae_title: str) -> EchoResult:
    """C-ECHO a DICOM destination; for a folder, whether the folder is writable."""
    if dest.type == "folder":
        probe = dest.path
        while probe is not None and not probe.exists() and probe.parent != probe:
            probe = probe.parent  # the folder is made on first delivery: its nearest parent must be writable
        ok = probe is not None and probe.is_dir() and os.access(probe, os.W_OK | os.X_OK)
        return EchoResult(ok, None, "folder is writable" if ok else "folder is not writable")
    if dest.type != "dicom":
        return EchoResult(False, None, f"no echo for destinations of type {dest.type}")
    ae = AE(ae_title=dest.calling_ae_title or calling_ae_title)
    ae.add_requested_context(Verification)
    ae.connection_timeout = dest.connect_timeout_seconds
    ae.acse_timeout = dest.acse_timeout_seconds
    ae.dimse_timeout = dest.dimse_timeout_seconds
    ae.network_timeout = dest.network_timeout_seconds
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title)
    try:
        if assoc.is_rejected:
            return EchoResult(False, None, "association rejected")
        if not assoc.is_established:
            return EchoResult(False, None, "no association (connection refused, timed out or aborted)")
        rsp = assoc.send_c_echo()
        status = int(rsp.Status) if rsp is not None and "Status" in rsp else None
        if status is None:
            return EchoResult(False, None, "no C-ECHO response")
        return EchoResult(status == 0, status, "echo answered" if status == 0 else "echo failed")
    finally:
        if assoc.is_established:
            assoc.release()
        ae.shutdown()
