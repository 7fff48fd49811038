"""What the intake is told about one received C-STORE, and the head of its raw file."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from deid_router.store.holding import RawFile
from deid_router.wire import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME


@dataclass(frozen=True)
class StoreRequest:
    """What the intake knows about one C-STORE, none of it a dataset value except UIDs."""

    raw: RawFile  # written completely, not yet committed
    command_sop_class_uid: str
    command_sop_instance_uid: str
    transfer_syntax: str
    calling_aet: str
    called_aet: str


def _meta_element(elem: int, vr: bytes, text: str) -> bytes:
    # A hostile command UID (not latin-1, or longer than a 16-bit length) must not break the
    # receive; the intake refuses such an instance anyway (UIDs over 64 bytes).
    value = str(text).encode("latin-1", "replace")[:1024]
    if len(value) % 2:
        value += b"\0" if vr == b"UI" else b" "
    if vr == b"OB":
        return struct.pack("<HH2sHL", 0x0002, elem, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, elem, vr, len(value)) + value


def create_file_meta(*, sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str) -> bytes:
    """Preamble, prefix and File Meta Information of a received instance (PS3.10 7.1).

    The same bytes pydicom's writer produces for pynetdicom's file meta, encoded directly.
    """
    body = b"".join((
        _meta_element(0x0001, b"OB", "\0\1"),
        _meta_element(0x0002, b"UI", sop_class_uid),
        _meta_element(0x0003, b"UI", sop_instance_uid),
        _meta_element(0x0010, b"UI", transfer_syntax),
        _meta_element(0x0012, b"UI", IMPLEMENTATION_CLASS_UID),
        _meta_element(0x0013, b"SH", IMPLEMENTATION_VERSION_NAME),
    ))
    group_length = struct.pack("<HH2sHL", 0x0002, 0x0000, b"UL", 4, len(body))
    return b"\0" * 128 + b"DICM" + group_length + body
