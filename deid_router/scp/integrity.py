"""Structural completeness of a received data set, checked before it is acknowledged.

pydicom reads a truncated file without complaint (it stops at the end of the bytes), and the
C-STORE handler reads only the header: a transfer cut short, or an element claiming more
bytes than were sent, would be answered 0x0000 and only fail later, in the worker. Walking
the element headers (tags, VRs, lengths) to the end of the file costs a few microseconds per
element and catches both, so the modality is told at once and keeps its copy.

The same walk picks up the few top-level values the listener needs to route (SOP class and
instance UIDs, modality, and exactly the attributes the configured routes name, see
``routing.Router.captured_tags``), so the acknowledgement path reads the file once and builds
no pydicom dataset. No other value is read.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import BinaryIO

from deid_router.elements import MAX_DEPTH, PIXEL_DATA_TAGS, UNDEFINED, Malformed, Window, elements, past_file_meta

__all__ = ["MAX_DEPTH", "PIXEL_DATA_TAGS", "Malformed", "TopLevel", "decode_values", "read_meta", "walk_top_level"]

TRANSFER_SYNTAX_UID = 0x00020010
SOP_CLASS_UID = 0x00080016
SOP_INSTANCE_UID = 0x00080018
MODALITY = 0x00080060
ROWS = 0x00280010
_CAPTURED = frozenset({SOP_CLASS_UID, SOP_INSTANCE_UID, MODALITY})
_MAX_CAPTURED_LENGTH = 256  # a UID is at most 64 bytes; anything longer is not kept
SPECIFIC_CHARACTER_SET = 0x00080005
_MAX_ROUTED_LENGTH = 16384  # a routed attribute longer than this is not kept (matches as "")


@dataclass
class TopLevel:
    """What the walk saw at the top level of the data set."""

    values: dict[int, bytes] = field(default_factory=dict)
    tags: set[int] = field(default_factory=set)
    vrs: dict[int, str] = field(default_factory=dict)  # explicit VRs of captured values
    little: bool = True

    def text(self, tag: int) -> str:
        """A captured value as text, without its padding ('' when absent)."""
        return self.values.get(tag, b"").decode("latin-1").rstrip("\0 ").strip()

    def attribute_values(self, tags: frozenset[int]) -> dict[int, tuple[str, ...]]:
        """The captured values of ``tags`` as text, one string per value (for routing only)."""
        out: dict[int, tuple[str, ...]] = {}
        charset = self.text(SPECIFIC_CHARACTER_SET)
        for tag in tags:
            if tag in self.values:
                vr = self.vrs.get(tag, "UN")
                vr = _dictionary_vr(tag) if vr == "UN" else vr
                out[tag] = decode_values(self.values[tag], vr, charset, self.little)
        return out

    @property
    def image_without_pixels(self) -> bool:
        return ROWS in self.tags and not (self.tags & PIXEL_DATA_TAGS)


_NUMBER_FORMATS = {"US": "H", "SS": "h", "UL": "L", "SL": "l", "FL": "f", "FD": "d", "SV": "q", "UV": "Q"}
_SINGLE_VALUED = frozenset({"LT", "ST", "UT", "UR"})


def _dictionary_vr(tag: int) -> str:
    from pydicom.datadict import dictionary_VR

    try:
        return dictionary_VR(tag).split(" or ")[0]
    except KeyError:
        return "LO"  # private or unknown: read as text


def decode_values(raw: bytes, vr: str, charset: str, little: bool = True) -> tuple[str, ...]:
    """One element's value bytes as text values: numbers formatted, text decoded in the data
    set's character set and split at backslashes (never raises: odd bytes are replaced)."""
    e = "<" if little else ">"
    if vr == "AT":
        n = len(raw) // 4
        pairs = struct.unpack(f"{e}{2 * n}H", raw[: 4 * n])
        return tuple(f"({pairs[i]:04X},{pairs[i + 1]:04X})" for i in range(0, len(pairs), 2))
    fmt = _NUMBER_FORMATS.get(vr)
    if fmt is not None:
        size = struct.calcsize(fmt)
        n = len(raw) // size
        return tuple(f"{v:g}" if isinstance(v, float) else str(v) for v in struct.unpack(f"{e}{n}{fmt}", raw[: n * size]))
    from pydicom.charset import convert_encodings, decode_bytes

    try:
        encodings = convert_encodings(charset.split("\\") if charset else ["ISO_IR 6"])
        text = decode_bytes(raw, encodings, set())
    except Exception:  # an unknown character set: route on what latin-1 shows
        text = raw.decode("latin-1", errors="replace")
    parts = [text] if vr in _SINGLE_VALUED else text.split("\\")
    return tuple(p.rstrip("\0 ").strip() for p in parts)


def read_meta(fp: BinaryIO, size: int) -> tuple[str, int]:
    """(Transfer Syntax UID, offset of the data set) of a Part 10 file: 128-byte preamble,
    ``DICM``, then the group 0002 elements in explicit VR little endian."""
    fp.seek(128)
    if fp.read(4) != b"DICM":
        raise Malformed("no DICM prefix")
    src = Window(fp, size)
    pos, ts = 132, b""
    for _start, tag, _vr, length, value, pos in elements(src, 132, size, False, True, stop=past_file_meta):
        if length == UNDEFINED:
            raise Malformed("file meta runs past the end of the data")
        if tag == TRANSFER_SYNTAX_UID and length <= _MAX_CAPTURED_LENGTH:
            ts = src.value(value, length)
    uid = ts.decode("latin-1").rstrip("\0 ").strip()
    if not uid:
        raise Malformed("no transfer syntax in the file meta")
    return uid, pos


def walk_top_level(
    fp: BinaryIO, start: int, size: int, implicit: bool, little: bool, capture: frozenset[int] = frozenset()
) -> TopLevel:
    """The top-level facts of the data set from ``start``; raises :class:`Malformed` unless its
    elements fill the data exactly to ``size``.

    Like pydicom, trust the first element over the transfer syntax for VR explicitness: some
    modalities send implicit VR under an explicit syntax, and pydicom reads them that way.
    """
    if size > start + 6:
        fp.seek(start + 4)
        vr = fp.read(2)
        looks_explicit = len(vr) == 2 and 65 <= vr[0] <= 90 and 65 <= vr[1] <= 90
        implicit = not looks_explicit
    top = TopLevel(little=little)
    capture = capture | {SPECIFIC_CHARACTER_SET} if capture else frozenset()
    src = Window(fp, size)
    for _pos, tag, vr, length, value, _end in elements(src, start, size, implicit, little):
        top.tags.add(tag)
        if tag in _CAPTURED and length <= _MAX_CAPTURED_LENGTH:
            top.values[tag] = src.value(value, length)
        elif tag in capture and length <= _MAX_ROUTED_LENGTH:
            top.values[tag] = src.value(value, length)
            if vr:
                top.vrs[tag] = vr.decode("ascii")
    return top
