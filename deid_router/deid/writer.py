"""Part-10 header writer for the fast path: raw elements are copied, only changed ones encoded.

It produces what ``dcmwrite(fp, ds, enforce_file_format=True)`` produces for a header in
its original transfer syntax, without pydicom's per-element buffers: a raw element (one the
engine left untouched) is written as its tag, VR, length and original bytes; a converted
element goes through pydicom's ``write_data_element``; sequences are walked here.
"""

from __future__ import annotations

import struct
from typing import BinaryIO, cast

from pydicom import __version_info__
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset, validate_file_meta
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element
from pydicom.tag import BaseTag
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID

_LONG_VRS = frozenset({"OB", "OD", "OF", "OL", "OW", "OV", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"})
_T_CHARSET = BaseTag(0x00080005)
_ITEM = 0xFFFEE000
_ITEM_DELIM = 0xFFFEE00D
_SEQ_DELIM = 0xFFFEE0DD
_DEFAULT_ENCODING = "iso8859"


class _Encoder:
    """Writes datasets in one encoding into one growing buffer."""

    __slots__ = ("implicit", "little", "e", "fp")

    def __init__(self, implicit: bool, little: bool) -> None:
        self.implicit = implicit
        self.little = little
        self.e = "<" if little else ">"
        self.fp = DicomBytesIO()
        self.fp.is_little_endian = little
        self.fp.is_implicit_VR = implicit

    def header(self, tag: int, vr: str | None, length: int) -> bytes:
        e = self.e
        if self.implicit:
            return struct.pack(e + "HHL", tag >> 16, tag & 0xFFFF, length)
        assert vr is not None
        if vr in _LONG_VRS:
            return struct.pack(e + "HH2sHL", tag >> 16, tag & 0xFFFF, vr.encode("ascii"), 0, length)
        return struct.pack(e + "HH2sH", tag >> 16, tag & 0xFFFF, vr.encode("ascii"), length)

    def dataset(self, ds: Dataset, parent_encoding: object) -> None:
        store = ds._dict
        encoding = parent_encoding
        if _T_CHARSET in store:
            encoding = ds[_T_CHARSET].value or parent_encoding
        fp = self.fp
        for tag in sorted(store, key=int):
            t = int(tag)
            if not t & 0xFFFF and t >> 16 > 6:
                continue  # retired group lengths are not written (PS3.5 7.2)
            elem = store[tag]
            if type(elem) is RawDataElement:
                raw = elem.value
                vr = elem.VR
                if (
                    raw is not None
                    and not len(raw) & 1  # odd lengths (invalid) are re-encoded with padding
                    and elem.is_little_endian == self.little
                    and elem.is_implicit_VR == self.implicit
                    and (self.implicit or (vr is not None and len(vr) == 2))
                    and (elem.length != 0xFFFFFFFF or vr not in (None, "SQ"))
                ):
                    n = len(raw)
                    if not self.implicit and vr not in _LONG_VRS and n > 0xFFFF:
                        vr = "UN"
                    if elem.length == 0xFFFFFFFF:
                        fp.write(self.header(t, vr, 0xFFFFFFFF) + raw + struct.pack(self.e + "HHL", 0xFFFE, 0xE0DD, 0))
                    else:
                        fp.write(self.header(t, vr, n) + raw)
                    continue
            converted: DataElement = ds[tag] if type(elem) is RawDataElement else cast(DataElement, elem)
            if converted.VR == "SQ":
                self.sequence(converted, encoding)
            else:
                write_data_element(fp, converted, encoding)  # type: ignore[arg-type]

    def sequence(self, elem: DataElement, encoding: object) -> None:
        inner = _Encoder(self.implicit, self.little)
        for item in elem.value or ():
            body = _Encoder(self.implicit, self.little)
            body.dataset(item, encoding)
            data = body.fp.getvalue()
            if getattr(item, "is_undefined_length_sequence_item", False):
                inner.fp.write(self._tag_len(_ITEM, 0xFFFFFFFF) + data + self._tag_len(_ITEM_DELIM, 0))
            else:
                inner.fp.write(self._tag_len(_ITEM, len(data)) + data)
        data = inner.fp.getvalue()
        t = int(elem.tag)
        if elem.is_undefined_length:
            self.fp.write(self.header(t, "SQ", 0xFFFFFFFF) + data + self._tag_len(_SEQ_DELIM, 0))
        else:
            self.fp.write(self.header(t, "SQ", len(data)) + data)

    def _tag_len(self, tag: int, length: int) -> bytes:
        return struct.pack(self.e + "HHL", tag >> 16, tag & 0xFFFF, length)


def element_bytes(ds: Dataset, implicit: bool, little: bool) -> bytes:
    """``ds`` encoded as a dataset body (used to pre-encode constant elements once)."""
    enc = _Encoder(implicit, little)
    enc.dataset(ds, _DEFAULT_ENCODING)
    return enc.fp.getvalue()


def _ui_text(elem: object) -> str | None:
    """A single UID value whose element is written the same raw or converted; else None."""
    if type(elem) is RawDataElement:
        raw = elem.value
        if not isinstance(raw, bytes) or b"\\" in raw or elem.VR not in ("UI", None):
            return None
        text = raw.decode("latin_1").rstrip("\0 ")
        if raw != (text + "\0" if len(text) & 1 else text).encode("latin_1"):
            return None
        return text
    if type(elem) is DataElement and elem.VR == "UI" and isinstance(elem.value, str) and "\\" not in elem.value:
        return str(elem.value)
    return None


def _ui_element(tag: int, text: str) -> bytes:
    data = (text + "\0" if len(text) & 1 else text).encode("latin_1")
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, b"UI", len(data)) + data


_META_REQUIRED = (0x00020001, 0x00020012, 0x00020013, 0x00020010)


def _file_meta_fast(meta: FileMetaDataset, ds: Dataset) -> bytes | None:
    """``file_meta_bytes`` for the usual meta group of raw elements, without converting any."""
    store = meta._dict
    ds_store = ds._dict
    ds_class = _ui_text(ds_store.get(BaseTag(0x00080016)))
    ds_instance = _ui_text(ds_store.get(BaseTag(0x00080018)))
    meta_class = _ui_text(store.get(BaseTag(0x00020002)))
    meta_instance = _ui_text(store.get(BaseTag(0x00020003)))
    if not ds_class or not ds_instance or not meta_class or not meta_instance:
        return None
    for t in _META_REQUIRED:  # present and not empty: pydicom's validation would change nothing
        elem = store.get(BaseTag(t))
        if t in (0x00020010, 0x00020012):
            if not _ui_text(elem):
                return None
        elif type(elem) is not RawDataElement or not elem.value:
            return None
    parts: list[tuple[int, bytes]] = []
    for tag, elem in store.items():
        t = int(tag)
        if t == 0x00020000:
            continue
        if t >> 16 != 2:
            return None
        if t == 0x00020002:
            parts.append((t, _ui_element(t, ds_class)))
            continue
        if t == 0x00020003:
            parts.append((t, _ui_element(t, ds_instance)))
            continue
        if type(elem) is not RawDataElement:
            text = _ui_text(elem)
            if text is None:
                return None
            parts.append((t, _ui_element(t, text)))
            continue
        raw = elem.value
        vr = elem.VR
        if (raw is None or len(raw) & 1 or not elem.is_little_endian or elem.is_implicit_VR
                or vr is None or len(vr) != 2 or elem.length == 0xFFFFFFFF
                or (vr not in _LONG_VRS and len(raw) > 0xFFFF)):
            return None
        if vr in _LONG_VRS:
            head = struct.pack("<HH2sHL", t >> 16, t & 0xFFFF, vr.encode("ascii"), 0, len(raw))
        else:
            head = struct.pack("<HH2sH", t >> 16, t & 0xFFFF, vr.encode("ascii"), len(raw))
        parts.append((t, head + raw))
    parts.sort()
    body = b"".join(p for _, p in parts)
    return struct.pack("<HH2sHL", 0x0002, 0x0000, b"UL", 4, len(body)) + body


def file_meta_bytes(meta: FileMetaDataset, ds: Dataset) -> bytes:
    """The File Meta Information group as ``dcmwrite(..., enforce_file_format=True)`` writes it."""
    fast = _file_meta_fast(meta, ds)
    if fast is not None:
        return fast
    meta_class = meta.get("MediaStorageSOPClassUID", None)
    ds_class = ds.get("SOPClassUID", None)
    if meta_class is None or (ds_class and ds_class != meta_class):
        meta.MediaStorageSOPClassUID = ds_class
    meta_instance = meta.get("MediaStorageSOPInstanceUID", None)
    ds_instance = ds.get("SOPInstanceUID", None)
    if meta_instance is None or (ds_instance and ds_instance != meta_instance):
        meta.MediaStorageSOPInstanceUID = ds_instance
    if "FileMetaInformationVersion" not in meta or meta["FileMetaInformationVersion"].is_empty:
        meta.FileMetaInformationVersion = b"\x00\x01"
    if "ImplementationClassUID" not in meta or meta["ImplementationClassUID"].is_empty:
        meta.ImplementationClassUID = UID(PYDICOM_IMPLEMENTATION_UID)
    if "ImplementationVersionName" not in meta:
        meta.ImplementationVersionName = f"PYDICOM {'.'.join(__version_info__)}"
    validate_file_meta(meta, enforce_standard=True)
    enc = _Encoder(implicit=False, little=True)
    for tag in list(meta._dict):
        if int(tag) == 0x00020000:
            del meta._dict[tag]
    enc.dataset(meta, _DEFAULT_ENCODING)
    body = enc.fp.getvalue()
    return struct.pack("<HH2sHL", 0x0002, 0x0000, b"UL", 4, len(body)) + body


def write_header(dst: BinaryIO, ds: Dataset, implicit: bool, little: bool) -> None:
    """Preamble, file meta and the dataset (no pixel data) in one write."""
    meta = ds.file_meta
    head = file_meta_bytes(meta, ds)
    enc = _Encoder(implicit, little)
    enc.dataset(ds, _DEFAULT_ENCODING)
    dst.write(b"\0" * 128 + b"DICM" + head + enc.fp.getvalue())
