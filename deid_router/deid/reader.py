"""A small Part-10 header parser for the common case; pydicom's reader stays the fallback.

``read_header`` builds exactly what ``dcmread(fp, stop_before_pixels=True)`` builds (the same
RawDataElements, the same undefined-length sequences, the same encodings) for files with a
preamble and an explicit VR little endian file meta group followed by an implicit or explicit
VR little endian dataset. It works on one buffered read of the header instead of pydicom's
two reads per element. Undefined-length sequences are handed to pydicom's own
``read_sequence``. Whatever it does not recognise (no preamble, command set, big endian,
deflate, private syntaxes, unknown VRs, VR switches, undefined-length non-sequence values,
truncation) makes it return None, and the caller uses ``dcmread``.
"""

from __future__ import annotations

import struct
from typing import BinaryIO

from pydicom import config
from pydicom.charset import convert_encodings, default_encoding
from pydicom.datadict import _dictionary_vr_fast
from pydicom.dataelem import DataElement, RawDataElement, convert_raw_data_element, empty_value_for_VR
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.filereader import read_sequence
from pydicom.tag import BaseTag
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32, VR
from pydicom.values import convert_string

_VRS = frozenset(v.value.encode("ascii") for v in VR)
_LONG = frozenset(v.encode("ascii") for v in EXPLICIT_VR_LENGTH_32)
_PIXEL = frozenset({0x7FE00010, 0x7FE00009, 0x7FE00008})
_CHUNK = 1 << 16
_unpack_expl = struct.Struct("<HH2sH").unpack_from
_unpack_impl = struct.Struct("<HHL").unpack_from
_unpack_ul = struct.Struct("<L").unpack_from
_ts_cache: dict[str, bool | None] = {}


class _Fallback(Exception):
    """The header is not the common case: pydicom reads it."""


def _implicit_of(ts: str) -> bool | None:
    """True/False: implicit/explicit VR little endian header; None: not handled here."""
    found = _ts_cache.get(ts, False)
    if found is not False:
        return found
    result: bool | None
    if ts == ImplicitVRLittleEndian:
        result = True
    elif ts == ExplicitVRLittleEndian:
        result = False
    else:
        uid = UID(ts)
        # pydicom reads any other standard, non-deflated syntax as explicit VR little endian
        result = False if uid.is_transfer_syntax and not uid.is_private and not uid.is_deflated \
            and uid.is_little_endian and not uid.is_implicit_VR else None
    if len(_ts_cache) < 256:
        _ts_cache[ts] = result
    return result


class _Buffer:
    """The file's first bytes, grown on demand; offsets are file offsets."""

    __slots__ = ("fp", "data", "size")

    def __init__(self, fp: BinaryIO, size: int) -> None:
        self.fp = fp
        self.size = size
        fp.seek(0)
        self.data = fp.read(min(size, _CHUNK))

    def need(self, end: int) -> bytes:
        """The buffer, holding at least the bytes before ``end`` (which is within the file)."""
        if end > len(self.data):
            if end > self.size:
                raise _Fallback
            self.fp.seek(len(self.data))
            self.data += self.fp.read(max(end - len(self.data), _CHUNK))
            if end > len(self.data):
                raise _Fallback
        return self.data


def read_header(fp: BinaryIO, size: int) -> tuple[FileDataset, int] | None:
    """(dataset without pixel data, offset of the pixel element or ``size``), or None to fall back."""
    try:
        return _read(fp, size)
    except _Fallback:
        return None


def _read(fp: BinaryIO, size: int) -> tuple[FileDataset, int]:
    if size < 144:
        raise _Fallback
    buf = _Buffer(fp, size)
    data = buf.data
    if data[128:132] != b"DICM":
        raise _Fallback
    preamble = data[:128]
    # ---- file meta: explicit VR little endian, group 0002
    pos = 132
    meta: dict[BaseTag, RawDataElement | DataElement] = {}
    while True:
        data = buf.need(pos + 8)
        group, elem, vr_b, length = _unpack_expl(data, pos)
        if group != 2:
            break
        if vr_b not in _VRS:
            raise _Fallback
        meta_vr = vr_b.decode("ascii")
        start = pos + 8
        if vr_b in _LONG:
            data = buf.need(pos + 12)
            (length,) = _unpack_ul(data, pos + 8)
            start = pos + 12
        if length == 0xFFFFFFFF:
            raise _Fallback
        end = start + length
        data = buf.need(end)
        value = data[start:end] if length else empty_value_for_VR(meta_vr, raw=True)
        tag = BaseTag(group << 16 | elem)
        meta[tag] = RawDataElement(tag, meta_vr, length, value, start, False, True)  # type: ignore[arg-type]
        pos = end
    if not meta:
        raise _Fallback
    ts_elem = meta.get(BaseTag(0x00020010))
    if ts_elem is None or not isinstance(ts_elem.value, bytes):
        raise _Fallback
    ts = ts_elem.value.decode("latin_1").strip(" \0")
    implicit = _implicit_of(ts)
    if implicit is None:
        raise _Fallback
    if group == 0 or pos + 8 > size:
        raise _Fallback  # command set elements, or nothing after the meta group
    # the reader's heuristic checks the first element of the dataset against the syntax
    if pos + 6 <= size:
        v0, v1 = data[pos + 4], data[pos + 5]
        if (not (0x40 < v0 < 0x5B and 0x40 < v1 < 0x5B)) != implicit:
            raise _Fallback
    # ---- the dataset, up to the pixel element
    elems: dict[BaseTag, RawDataElement | DataElement] = {}
    encoding: str | list[str] = default_encoding
    charset_seen = False
    while True:
        if pos + 8 > size:
            if pos < size:
                raise _Fallback  # trailing bytes shorter than an element header
            break
        data = buf.need(pos + 8)
        if implicit:
            group, elem, length = _unpack_impl(data, pos)
            vr: str | None = None
            start = pos + 8
        else:
            group, elem, vr_b, length = _unpack_expl(data, pos)
            if vr_b not in _VRS:
                raise _Fallback
            vr = vr_b.decode("ascii")
            start = pos + 8
            if vr_b in _LONG:
                data = buf.need(pos + 12)
                (length,) = _unpack_ul(data, pos + 8)
                start = pos + 12
        t = group << 16 | elem
        if t in _PIXEL:
            break
        if group == 0xFFFE:
            raise _Fallback
        tag = BaseTag(t)
        if length != 0xFFFFFFFF:
            end = start + length
            data = buf.need(end)
            value = data[start:end] if length else empty_value_for_VR(vr, raw=True)
            if t == 0x00080005:
                encoding = convert_encodings(convert_string(value or b"", True))  # type: ignore[arg-type]
                charset_seen = True
            elems[tag] = RawDataElement(tag, vr, length, value, start, implicit, True)  # type: ignore[arg-type]
            pos = end
            continue
        # undefined length: a sequence (as pydicom decides it), parsed by pydicom
        if vr == "UN" and config.settings.infer_sq_for_un_vr:
            vr = "SQ"
        if vr is None or vr == "UN" and config.replace_un_with_known_vr:
            try:
                vr = _dictionary_vr_fast(t)
            except KeyError:
                data = buf.need(start + 4)
                if _unpack_impl(data + b"\0\0\0\0", start)[:2] == (0xFFFE, 0xE000):
                    vr = "SQ"
        if vr != "SQ":
            raise _Fallback
        fp.seek(start)
        seq = read_sequence(fp, implicit, True, length, encoding)
        elems[tag] = DataElement(tag, vr, seq, start, is_undefined_length=True)
        pos = fp.tell()
    if pos > size:
        raise _Fallback
    # ---- the same objects dcmread builds
    meta_ds = Dataset(meta)
    meta_ds.set_original_encoding(False, True, default_encoding)
    file_meta = FileMetaDataset(meta_ds)
    file_meta.set_original_encoding(False, True, default_encoding)
    file_meta[next(iter(meta))]  # dcmread converts the first meta element (its VR check)
    file_meta.get("TransferSyntaxUID")  # and the transfer syntax
    dataset = Dataset(elems, parent_encoding=default_encoding)
    if charset_seen:
        charset = convert_raw_data_element(elems[BaseTag(0x00080005)]).value  # type: ignore[arg-type]
        dataset.set_original_encoding(implicit, True, convert_encodings(charset))
    else:
        dataset.set_original_encoding(implicit, True, default_encoding)
    fp.seek(pos)
    ds = FileDataset(fp, dataset, preamble, file_meta, implicit, True)
    ds.set_original_encoding(implicit, True, dataset._character_set)
    return ds, pos
