"""The element headers of encoded DICOM bytes: the one walker every reader of them uses.

pydicom's ``data_element_generator`` is the model. :func:`elements` yields, for each element of
one level of a data set, where it starts, its tag, its VR (``b""`` in implicit VR), its length,
where its value starts and where the element ends. The end of an undefined-length value (a
sequence, an undefined-length UN, encapsulated pixel data) is found by walking its items and
their elements, which checks their structure too. A stop condition, asked with each tag before
anything else of the element is read, ends the walk in front of that element (the pixel data,
the end of the file meta group).

Its readers: the listener's completeness check before it acknowledges (``scp.integrity``), the
de-identifier's header reader (``deid.reader``), the pixel copy (``deid.file_io``) and the DIMSE
command sets (``wire``). Bytes that do not fit raise :class:`Malformed` with a fixed reason,
never a value; each reader translates it at its boundary.

Elements come as plain tuples, not named tuples: the header reader walks a few hundred per
instance, and a named tuple costs about 0.2 microseconds more per element there.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Generator, Iterator
from typing import BinaryIO

UNDEFINED = 0xFFFFFFFF
# explicit VRs with a reserved field and a 32-bit length (PS3.5 7.1.2)
LONG_VRS = frozenset({b"OB", b"OW", b"OF", b"OD", b"OL", b"OV", b"UN", b"UT", b"UC", b"UR", b"SQ", b"SV", b"UV"})
ITEM = 0xFFFEE000
ITEM_END = 0xFFFEE00D
SEQUENCE_END = 0xFFFEE0DD
MAX_DEPTH = 32  # nested sequences deeper than this are hostile, not clinical
PIXEL_DATA_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})  # float, double float, pixel data
_UNDEFINED_OK = frozenset({b"SQ", b"UN", b"OB", b"OW"})  # the explicit VRs that may have an undefined length

# (start of the element, tag, VR or b"", length, start of the value, end of the element)
Element = tuple[int, int, bytes, int, int, int]

_EXPLICIT_LE, _EXPLICIT_BE = struct.Struct("<HH2sH"), struct.Struct(">HH2sH")
_IMPLICIT_LE, _IMPLICIT_BE = struct.Struct("<HHL"), struct.Struct(">HHL")
_UL_LE, _UL_BE = struct.Struct("<L"), struct.Struct(">L")


class Malformed(Exception):
    """The element structure does not fit in the bytes (a fixed reason, never a value)."""


class Window:
    """The bytes of a file, read on demand: :meth:`at` returns a buffer and the index in it of
    a file offset, with at least the bytes asked for behind it.

    ``grow``: the buffer keeps everything read from offset 0, in steps of 64 KiB (the header
    reader slices values out of it); otherwise it slides, reading 8 KiB at a time as a buffered
    file would, so that walking the fragments of a large encapsulated image reads little more
    than their headers.
    """

    __slots__ = ("fp", "size", "data", "base", "chunk", "grow")

    def __init__(self, fp: BinaryIO | None, size: int, *, grow: bool = False) -> None:
        self.fp = fp
        self.size = size
        self.data = b""
        self.base = 0
        self.chunk = 1 << 16 if grow else 1 << 13
        self.grow = grow

    @classmethod
    def of_bytes(cls, data: bytes) -> Window:
        window = cls(None, len(data), grow=True)
        window.data = data
        return window

    def at(self, pos: int, n: int) -> tuple[bytes, int]:
        i = pos - self.base
        if i >= 0 and i + n <= len(self.data):
            return self.data, i
        if pos < 0 or pos + n > self.size or self.fp is None:
            raise Malformed("truncated element header")
        if self.grow:
            self.fp.seek(len(self.data))
            self.data += self.fp.read(max(pos + n - len(self.data), self.chunk))
            if pos + n > len(self.data):
                raise Malformed("truncated element header")
            return self.data, pos
        self.fp.seek(pos)
        self.data = self.fp.read(max(n, self.chunk))
        self.base = pos
        if len(self.data) < n:
            raise Malformed("truncated element header")
        return self.data, 0

    def value(self, start: int, length: int) -> bytes:
        buf, i = self.at(start, length)
        return buf[i:i + length]


def past_file_meta(tag: int) -> bool:
    """The stop condition of a walk of the file meta: the first element outside group 0002."""
    return tag >> 16 != 0x0002


def elements(
    src: Window, pos: int, end: int, implicit: bool, little: bool = True,
    stop: Callable[[int], bool] | None = None,
) -> Iterator[Element]:
    """The elements of one level from ``pos`` to ``end``, each once its end is known; ``stop``
    (a tag) ends the walk in front of the first element it is true for."""
    return _walk(src, pos, end, implicit, little, stop, 0, False)


def _walk(src: Window, pos: int, end: int, implicit: bool, little: bool, stop: Callable[[int], bool] | None,
          depth: int, in_item: bool) -> Generator[Element, None, int]:
    """The one loop over element headers: yields each element of this level and returns where
    the walk ended (in front of the stop, after an item's delimiter when ``in_item``, or ``end``)."""
    if depth > MAX_DEPTH:
        raise Malformed("sequences nested too deep")
    explicit_h, implicit_h, ul = (_EXPLICIT_LE, _IMPLICIT_LE, _UL_LE) if little else (_EXPLICIT_BE, _IMPLICIT_BE, _UL_BE)
    while pos < end:
        buf, i = src.data, pos - src.base
        if i < 0 or i + 12 > len(buf):  # the window's own check, inlined: this runs once per element
            buf, i = src.at(pos, 8)
        if implicit:
            group, elem, length = implicit_h.unpack_from(buf, i)
            tag = group << 16 | elem
            if stop is not None and stop(tag):
                return pos
            vr, value = b"", pos + 8
        else:
            group, elem, vr, length = explicit_h.unpack_from(buf, i)
            tag = group << 16 | elem
            if stop is not None and stop(tag):
                return pos
            value = pos + 8
            if group == 0xFFFE:
                pass  # item and delimiter tags have no VR, in any syntax
            elif vr in LONG_VRS:
                if i + 12 > len(buf):
                    buf, i = src.at(pos + 8, 4)
                    i -= 8
                (length,) = ul.unpack_from(buf, i + 8)
                value = pos + 12
            elif not (65 <= vr[0] <= 90 and 65 <= vr[1] <= 90):
                raise Malformed("invalid value representation")
        if group == 0xFFFE:
            if tag == ITEM_END and in_item:
                return pos + 8
            raise Malformed("item delimiter outside an item" if tag == ITEM_END else "item tag where an element was expected")
        if length != UNDEFINED:
            after = value + length
            if after > end:
                raise Malformed("element runs past the end of the data")
        elif implicit or vr in _UNDEFINED_OK:
            # an undefined-length UN holds an implicit VR little endian sequence (PS3.5 6.2.2)
            after = _items_end(src, value, end, implicit or vr == b"UN", little, depth + 1)
        else:
            raise Malformed("undefined length on a non-sequence element")
        yield pos, tag, vr, length, value, after
        pos = after
    if in_item:
        raise Malformed("item without delimiter")
    return pos


def _items_end(src: Window, pos: int, end: int, implicit: bool, little: bool, depth: int) -> int:
    """The end of the items (or fragments) of an undefined-length value, its delimiter included."""
    item_h = _IMPLICIT_LE if little else _IMPLICIT_BE
    while True:
        buf, i = src.at(pos, 8)
        group, elem, length = item_h.unpack_from(buf, i)
        tag = group << 16 | elem
        if tag == SEQUENCE_END:
            return pos + 8
        if tag != ITEM:
            raise Malformed("malformed sequence item")
        pos += 8
        if length == UNDEFINED:  # its elements, up to its delimiter
            walk = _walk(src, pos, end, implicit, little, None, depth + 1, True)
            while True:
                try:
                    next(walk)
                except StopIteration as done:
                    pos = done.value
                    break
        else:
            pos += length
            if pos > end:
                raise Malformed("item runs past the end of the data")
