"""A small Part-10 header parser for the common case; pydicom's reader stays the fallback.

``read_header`` builds exactly what ``dcmread(fp, stop_before_pixels=True)`` builds (the same
RawDataElements, the same undefined-length sequences, the same encodings) for files with a
preamble and an explicit VR little endian file meta group followed by an implicit or explicit
VR little endian dataset. It walks the elements with the shared walker (``deid_router.elements``)
on one buffered read of the header, instead of pydicom's two reads per element.
Undefined-length sequences are handed to pydicom's own ``read_sequence``. Whatever it does not recognise (no preamble, command set, big endian,
deflate, private syntaxes, unknown VRs, VR switches, undefined-length non-sequence values,
truncation) makes it return None, and the caller uses ``dcmread``.
"""

from __future__ import annotations

from typing import BinaryIO

from pydicom import config
from pydicom.charset import convert_encodings, default_encoding
from pydicom.datadict import _dictionary_vr_fast
from pydicom.dataelem import DataElement, RawDataElement, convert_raw_data_element, empty_value_for_VR
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.filereader import read_sequence
from pydicom.tag import BaseTag
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pydicom.valuerep import VR
from pydicom.values import convert_string

from deid_router.elements import PIXEL_DATA_TAGS, UNDEFINED, Malformed, Window, elements, past_file_meta

_VR_NAMES = {v.value.encode("ascii"): v.value for v in VR}  # the VRs pydicom knows, by their bytes
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


def read_header(fp: BinaryIO, size: int) -> tuple[FileDataset, int] | None:
    """(dataset without pixel data, offset of the pixel element or ``size``), or None to fall back."""
    try:
        return _read(fp, size)
    except (_Fallback, Malformed):
        return None


def _read(fp: BinaryIO, size: int) -> tuple[FileDataset, int]:
    if size < 144:
        raise _Fallback
    src = Window(fp, size, grow=True)
    data, _ = src.at(0, 132)
    if data[128:132] != b"DICM":
        raise _Fallback
    preamble = data[:128]
    # ---- file meta: explicit VR little endian, group 0002
    meta: dict[BaseTag, RawDataElement | DataElement] = {}
    pos = 132
    for _start, t, vr_b, length, start, pos in elements(src, 132, size, False, True, stop=past_file_meta):
        meta_vr = _VR_NAMES.get(vr_b)
        if meta_vr is None or length == UNDEFINED:
            raise _Fallback
        value = src.value(start, length) if length else empty_value_for_VR(meta_vr, raw=True)
        tag = BaseTag(t)
        meta[tag] = RawDataElement(tag, meta_vr, length, value, start, False, True)  # type: ignore[arg-type]
    if not meta:
        raise _Fallback
    ts_elem = meta.get(BaseTag(0x00020010))
    if ts_elem is None or not isinstance(ts_elem.value, bytes):
        raise _Fallback
    ts = ts_elem.value.decode("latin_1").strip(" \0")
    implicit = _implicit_of(ts)
    if implicit is None:
        raise _Fallback
    if pos + 8 > size:
        raise _Fallback  # nothing after the meta group
    data, i = src.at(pos, 8)
    if data[i] == 0 and data[i + 1] == 0:
        raise _Fallback  # command set elements (group 0000)
    # the reader's heuristic checks the first element of the dataset against the syntax
    v0, v1 = data[i + 4], data[i + 5]
    if (not (0x40 < v0 < 0x5B and 0x40 < v1 < 0x5B)) != implicit:
        raise _Fallback
    # ---- the dataset, up to the pixel element
    elems: dict[BaseTag, RawDataElement | DataElement] = {}
    encoding: str | list[str] = default_encoding
    charset_seen = False
    end = pos
    for _start, t, vr_b, length, start, end in elements(src, pos, size, implicit, True, stop=PIXEL_DATA_TAGS.__contains__):
        vr: str | None = None
        if vr_b:
            vr = _VR_NAMES.get(vr_b)
            if vr is None:
                raise _Fallback
        tag = BaseTag(t)
        if length != UNDEFINED:
            if length:
                data = src.data  # grown from offset 0: file offsets index it
                if start + length > len(data):
                    data, _ = src.at(start, length)
                value = data[start:start + length]
            else:
                value = empty_value_for_VR(vr, raw=True)
            if t == 0x00080005:
                encoding = convert_encodings(convert_string(value or b"", True))  # type: ignore[arg-type]
                charset_seen = True
            elems[tag] = RawDataElement(tag, vr, length, value, start, implicit, True)  # type: ignore[arg-type]
            continue
        # undefined length: a sequence (as pydicom decides it), parsed by pydicom
        if vr == "UN" and config.settings.infer_sq_for_un_vr:
            vr = "SQ"
        if vr is None or vr == "UN" and config.replace_un_with_known_vr:
            try:
                vr = _dictionary_vr_fast(t)
            except KeyError:
                buf, j = src.at(start, 4)
                if buf[j:j + 4] == b"\xfe\xff\x00\xe0":
                    vr = "SQ"
        if vr != "SQ":
            raise _Fallback
        fp.seek(start)
        seq = read_sequence(fp, implicit, True, length, encoding)
        if fp.tell() != end:
            raise _Fallback  # pydicom read the sequence otherwise than the walk did
        elems[tag] = DataElement(tag, vr, seq, start, is_undefined_length=True)
    pos = end
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
