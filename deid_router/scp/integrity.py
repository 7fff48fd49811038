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

_LONG_VRS = frozenset({b"OB", b"OW", b"OF", b"OD", b"OL", b"OV", b"UN", b"UT", b"UC", b"UR", b"SQ", b"SV", b"UV"})
_UNDEFINED = 0xFFFFFFFF
_ITEM = (0xFFFE, 0xE000)
_ITEM_END = (0xFFFE, 0xE00D)
_SEQ_END = (0xFFFE, 0xE0DD)
MAX_DEPTH = 32  # nested sequences deeper than this are hostile, not clinical


SOP_CLASS_UID = 0x00080016
SOP_INSTANCE_UID = 0x00080018
MODALITY = 0x00080060
ROWS = 0x00280010
PIXEL_DATA_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})  # float, double float, pixel data
_CAPTURED = frozenset({SOP_CLASS_UID, SOP_INSTANCE_UID, MODALITY})
_MAX_CAPTURED_LENGTH = 256  # a UID is at most 64 bytes; anything longer is not kept
SPECIFIC_CHARACTER_SET = 0x00080005
_MAX_ROUTED_LENGTH = 16384  # a routed attribute longer than this is not kept (matches as "")


class Malformed(Exception):
    """The data set's element structure does not fit in the bytes received (a fixed reason)."""


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


class _Walker:
    def __init__(
        self, fp: BinaryIO, size: int, implicit: bool, little: bool, capture: frozenset[int] = frozenset()
    ) -> None:
        self.fp = fp
        self.size = size
        self.implicit = implicit
        self.e = "<" if little else ">"
        self.top = TopLevel(little=little)
        self.capture = capture | {SPECIFIC_CHARACTER_SET} if capture else frozenset()

    def _read(self, pos: int, n: int) -> bytes:
        if pos + n > self.size:
            raise Malformed("truncated element header")
        self.fp.seek(pos)
        data = self.fp.read(n)
        if len(data) < n:
            raise Malformed("truncated element header")
        return data

    def elements(self, pos: int, end: int, implicit: bool, depth: int, in_item: bool) -> int:
        """Walk elements from ``pos`` until ``end`` (or an item delimiter when ``in_item``)."""
        if depth > MAX_DEPTH:
            raise Malformed("sequences nested too deep")
        while pos < end:
            hdr = self._read(pos, 8)
            group, elem = struct.unpack(self.e + "HH", hdr[:4])
            if (group, elem) == _ITEM_END:
                if not in_item:
                    raise Malformed("item delimiter outside an item")
                return pos + 8
            if group == 0xFFFE:
                raise Malformed("item tag where an element was expected")
            vr = b""
            if implicit:
                (length,) = struct.unpack(self.e + "L", hdr[4:8])
                pos += 8
            else:
                vr = hdr[4:6]
                if vr in _LONG_VRS:
                    (length,) = struct.unpack(self.e + "L", self._read(pos + 8, 4))
                    pos += 12
                else:
                    if not (65 <= vr[0] <= 90 and 65 <= vr[1] <= 90):
                        raise Malformed("invalid value representation")
                    (length,) = struct.unpack(self.e + "H", hdr[6:8])
                    pos += 8
            if depth == 0:
                tag = group << 16 | elem
                self.top.tags.add(tag)
                if tag in _CAPTURED and length <= _MAX_CAPTURED_LENGTH:
                    self.top.values[tag] = self._read(pos, length) if length else b""
                elif tag in self.capture and length <= _MAX_ROUTED_LENGTH:
                    self.top.values[tag] = self._read(pos, length) if length else b""
                    if vr:
                        self.top.vrs[tag] = vr.decode("ascii")
            if length == _UNDEFINED:
                if not implicit and vr not in (b"SQ", b"UN", b"OB", b"OW"):
                    raise Malformed("undefined length on a non-sequence element")
                # UN of undefined length holds an implicit VR little endian sequence (PS3.5 6.2.2)
                pos = self.items(pos, end, implicit or vr == b"UN", depth + 1)
            else:
                pos += length
                if pos > end:
                    raise Malformed("element runs past the end of the data")
        if in_item:
            raise Malformed("item without delimiter")
        return pos

    def items(self, pos: int, end: int, implicit: bool, depth: int) -> int:
        """Walk the items of an undefined-length sequence (or encapsulated pixel data)."""
        while True:
            hdr = self._read(pos, 8)
            group, elem, length = struct.unpack(self.e + "HHL", hdr)
            if (group, elem) == _SEQ_END:
                return pos + 8
            if (group, elem) != _ITEM:
                raise Malformed("malformed sequence item")
            pos += 8
            if length == _UNDEFINED:
                pos = self.elements(pos, end, implicit, depth + 1, in_item=True)
            else:
                pos += length
                if pos > end:
                    raise Malformed("item runs past the end of the data")


def read_meta(fp: BinaryIO, size: int) -> tuple[str, int]:
    """(Transfer Syntax UID, offset of the data set) of a Part 10 file: 128-byte preamble,
    ``DICM``, then the group 0002 elements in explicit VR little endian."""
    fp.seek(128)
    if fp.read(4) != b"DICM":
        raise Malformed("no DICM prefix")
    walker = _Walker(fp, size, implicit=False, little=True)
    pos, ts = 132, b""
    while pos + 8 <= size:
        hdr = walker._read(pos, 8)
        group, elem = struct.unpack("<HH", hdr[:4])
        if group != 0x0002:
            break
        vr = hdr[4:6]
        if vr in _LONG_VRS:
            (length,) = struct.unpack("<L", walker._read(pos + 8, 4))
            pos += 12
        else:
            (length,) = struct.unpack("<H", hdr[6:8])
            pos += 8
        if length == _UNDEFINED or pos + length > size:
            raise Malformed("file meta runs past the end of the data")
        if elem == 0x0010 and length <= _MAX_CAPTURED_LENGTH:
            ts = walker._read(pos, length)
        pos += length
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
    walker = _Walker(fp, size, implicit, little, capture)
    walker.elements(start, size, implicit, 0, in_item=False)
    return walker.top
