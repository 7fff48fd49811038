"""Raw element values: read and write text values without pydicom's element conversion.

pydicom keeps elements as ``RawDataElement`` until they are accessed, and writes a raw
element's bytes back as they are. Converting every element costs far more than the
de-identification itself, so the engine decides by tag, reads the few values it needs
through a ``Reader`` (plain ``bytes.decode`` for single-byte/UTF-8 character sets) and
stores new values as raw elements again. Anything unusual (ambiguous or unknown VR, public
UN, ISO 2022 character sets, undecodable bytes, binary VRs) falls back to pydicom.
"""

from __future__ import annotations

from functools import lru_cache

from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag

# Character sets decoded with one Python codec (pydicom's default for none is iso8859 = latin-1).
_CODECS = {"": "latin_1", "ISO_IR 6": "latin_1", "ISO_IR 100": "latin_1", "ISO_IR 192": "utf_8"}
# VRs whose values are text; the first group uses the dataset's character set.
CHARSET_VRS = frozenset({"SH", "LO", "UC", "ST", "LT", "UT", "PN"})
ASCII_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "TM", "UI", "UR"})
STRING_VRS = CHARSET_VRS | ASCII_VRS
_SINGLE_VALUED = frozenset({"ST", "LT", "UT", "UR"})
_T_CHARSET = 0x00080005

Element = DataElement | RawDataElement


@lru_cache(maxsize=4096)
def public_vr(tag: int) -> str | None:
    """The dictionary VR of a public tag; None if unknown or ambiguous ("US or SS")."""
    try:
        vr = dictionary_VR(tag)
    except KeyError:
        return None
    return vr if len(vr) == 2 else None


def codec_of(ds: Dataset, parent: str | None) -> str | None:
    """Python codec for the text of ``ds``; None when pydicom has to decode it."""
    elem = ds._dict.get(BaseTag(_T_CHARSET))
    if elem is None:
        return parent
    value = elem.value
    if isinstance(value, (bytes, bytearray)):
        text = bytes(value).decode("latin_1").strip(" \0")
    elif value is None:
        text = ""
    else:
        text = str(value if isinstance(value, str) else "\\".join(str(v) for v in value)).strip()
    return _CODECS.get(text)


class Reader:
    """Reads element values of one dataset (and its items, same character set)."""

    __slots__ = ("codec",)

    def __init__(self, codec: str | None) -> None:
        self.codec = codec

    @classmethod
    def of(cls, ds: Dataset, parent: Reader | None = None) -> Reader:
        codec = codec_of(ds, parent.codec if parent is not None else "latin_1")
        if parent is not None and codec == parent.codec:
            return parent
        return cls(codec)

    def vr(self, ds: Dataset, tag: BaseTag, elem: Element) -> str:
        """The element's VR without converting it, when that is unambiguous."""
        if type(elem) is RawDataElement:
            vr = elem.VR
            if vr is not None and (vr != "UN" or tag & 0x10000):
                return vr
            if not tag & 0x10000:
                known = public_vr(int(tag))
                if known is not None and vr is None:
                    return known
            return str(ds[tag].VR)  # pydicom resolves private dictionaries, UN and ambiguous VRs
        return str(elem.VR)

    def value(self, ds: Dataset, tag: BaseTag, elem: Element, vr: str) -> object:
        """The value as the engine uses it: str or list of str for text VRs, pydicom's otherwise."""
        if type(elem) is RawDataElement:
            raw = elem.value
            codec = self.codec
            if codec is not None and vr in STRING_VRS and raw is not None:
                try:
                    text = raw.decode(codec if vr in CHARSET_VRS else "latin_1")
                except UnicodeDecodeError:
                    return ds[tag].value
                text = text.rstrip(" \0")
                if vr in _SINGLE_VALUED or "\\" not in text:
                    return text.lstrip(" ") if vr not in CHARSET_VRS else text
                return [v.strip(" \0") for v in text.split("\\")]
            return ds[tag].value
        return elem.value

    def text(self, elem: Element, vr: str) -> str | None:
        """The whole decoded value of a raw text element (values joined by backslash), or None."""
        if type(elem) is RawDataElement and self.codec is not None and elem.value is not None:
            try:
                return elem.value.decode(self.codec if vr in CHARSET_VRS else "latin_1")
            except UnicodeDecodeError:
                return None
        return None

    def set(self, ds: Dataset, tag: BaseTag, old: Element, vr: str, value: object) -> None:
        """Store a new value; as a raw element when it is text this reader can encode."""
        if self.codec is not None and vr in STRING_VRS and type(old) is RawDataElement:
            if value is None:
                text = ""
            elif isinstance(value, str):
                text = value
            elif isinstance(value, (list, tuple)):
                text = "\\".join(str(v) for v in value)
            else:
                text = None
            if text is not None:
                try:
                    data = text.encode(self.codec if vr in CHARSET_VRS else "ascii")
                except UnicodeEncodeError:
                    data = None
                if data is not None:
                    if len(data) & 1:
                        data += b"\0" if vr == "UI" else b" "
                    ds._dict[tag] = RawDataElement(
                        tag, old.VR if old.VR == vr else vr, len(data), data, 0,
                        old.is_implicit_VR, old.is_little_endian,
                    )
                    return
        ds[tag].value = value
