"""Structural completeness of a received data set, checked before it is acknowledged.

pydicom reads a truncated file without complaint (it stops at the end of the bytes), and the
C-STORE handler reads only the header: a transfer cut short, or an element claiming more
bytes than were sent, would be answered 0x0000 and only fail later, in the worker. Walking
the element headers (tags, VRs, lengths; never values) to the end of the file costs a few
microseconds per element and catches both, so the modality is told at once and keeps its
copy.
"""

from __future__ import annotations

import struct
from typing import BinaryIO

_LONG_VRS = frozenset({b"OB", b"OW", b"OF", b"OD", b"OL", b"OV", b"UN", b"UT", b"UC", b"UR", b"SQ", b"SV", b"UV"})
_UNDEFINED = 0xFFFFFFFF
_ITEM = (0xFFFE, 0xE000)
_ITEM_END = (0xFFFE, 0xE00D)
_SEQ_END = (0xFFFE, 0xE0DD)
MAX_DEPTH = 32  # nested sequences deeper than this are hostile, not clinical


class Malformed(Exception):
    """The data set's element structure does not fit in the bytes received (a fixed reason)."""


class _Walker:
    def __init__(self, fp: BinaryIO, size: int, implicit: bool, little: bool) -> None:
        self.fp = fp
        self.size = size
        self.implicit = implicit
        self.e = "<" if little else ">"

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


def check_complete(fp: BinaryIO, start: int, size: int, implicit: bool, little: bool) -> None:
    """Raise :class:`Malformed` unless the elements from ``start`` fill the data exactly to ``size``.

    Like pydicom, trust the first element over the transfer syntax for VR explicitness: some
    modalities send implicit VR under an explicit syntax, and pydicom reads them that way.
    """
    if size > start + 6:
        fp.seek(start + 4)
        vr = fp.read(2)
        looks_explicit = len(vr) == 2 and 65 <= vr[0] <= 90 and 65 <= vr[1] <= 90
        implicit = not looks_explicit
    _Walker(fp, size, implicit, little).elements(start, size, implicit, 0, in_item=False)
