"""The reference point: a minimal pynetdicom Storage SCP.

Writes preamble + file meta + ``event.encoded_dataset()`` to a file (the dataset is never
decoded), advertises maximum PDU size 0 (unlimited), sets TCP_NODELAY on every accepted
socket in an EVT_CONN_OPEN handler. No fsync, no database: the fastest a pynetdicom receiver
can acknowledge. Usage: python min_scp.py OUT_DIR PORT
"""

from __future__ import annotations

import os
import socket
import sys
import uuid

from pydicom.filewriter import write_file_meta_info
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

TS = ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"]


def main() -> None:
    out, port = sys.argv[1], int(sys.argv[2])
    os.makedirs(out, exist_ok=True)

    def on_open(event):  # type: ignore[no-untyped-def]
        event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def on_store(event):  # type: ignore[no-untyped-def]
        with open(os.path.join(out, uuid.uuid4().hex + ".dcm"), "wb") as f:
            f.write(b"\0" * 128 + b"DICM")
            write_file_meta_info(f, event.file_meta)
            f.write(event.encoded_dataset(include_meta=False))
        return 0x0000

    ae = AE(ae_title="MINSCP")
    ae.maximum_pdu_size = 0
    ae.maximum_associations = 16
    ae.add_supported_context(Verification)
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, TS)
    print("ready", flush=True)
    ae.start_server(("127.0.0.1", port), evt_handlers=[(evt.EVT_C_STORE, on_store), (evt.EVT_CONN_OPEN, on_open)])


if __name__ == "__main__":
    main()
