"""Identifiers of one instance, cleaning of free text, and the residual-PHI scan of the output.

Two classes of identifiers are collected from the ORIGINAL dataset:

* strong: the patient's name parts, patient IDs, accession number, birth date -- unless the
  profile keeps that attribute. Any occurrence in the output is residual PHI.
* context: institution, physician and operator names, from the top level and from inside
  sequences (``clean.collect_context``). Cleaning removes them (like the strong ones) from
  free text; in the output they count as weak identifiers.
* weak: every other value (>= 4 characters, not a generic token) of a text attribute that
  the profile removes or replaces, and every removed or shifted date. They are only flagged
  when the profile did not choose to keep the same text elsewhere (so "CT HEAD" removed in
  one place and kept in another is not a false positive). Cleaning removes the weak person
  names, dates and ID-like values.

Every identifier is matched in all its written forms (``deid/identifiers.py``: dates in any
order and spelling, IDs with separators, names in each character-set representation), in
decoded text and, for non-ASCII identifiers, in the raw bytes of each character set.

Original UIDs that were remapped must not appear in any UI value of the output.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterable

from pydicom.datadict import keyword_for_tag
from pydicom.dataelem import RawDataElement, convert_raw_data_element
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from deid_router.deid.identifiers import (
    GENERIC, Forms, date_spellings, forms, id_like, name_parts, parse_date, words,
)
from deid_router.deid.raw import STRING_VRS, Element, Reader
from deid_router.errors import DeidError

PATIENT_KEYWORDS = frozenset({
    "PatientName", "OtherPatientNames", "PatientBirthName", "PatientMotherBirthName", "PatientID",
    "OtherPatientIDs", "AccessionNumber", "MedicalRecordLocator", "PatientAddress", "PatientTelephoneNumbers",
})
NAME_KEYWORDS = (
    "PatientName", "OtherPatientNames", "PatientBirthName", "PatientMotherBirthName",
    "ReferringPhysicianName", "PerformingPhysicianName", "NameOfPhysiciansReadingStudy",
    "OperatorsName", "PhysiciansOfRecord", "RequestingPhysician", "ConsultingPhysicianName",
    "ScheduledPerformingPhysicianName", "ResponsiblePerson", "PersonName",
)
VALUE_KEYWORDS = (
    "PatientID", "OtherPatientIDs", "AccessionNumber", "MedicalRecordLocator", "PatientAddress",
    "PatientTelephoneNumbers", "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName",
    "RequestedProcedureID", "AdmissionID", "FillerOrderNumberImagingServiceRequest",
    "PlacerOrderNumberImagingServiceRequest", "PatientInsurancePlanCodeSequence",
)
TEXT_VRS = frozenset({"AE", "LO", "SH", "PN", "ST", "LT", "UT", "UC", "DA", "DT"})
_BYTES_VRS = frozenset({"OB", "OW", "OD", "OF", "OL", "OV", "UN"})
SCAN_VRS = frozenset({"AE", "AS", "CS", "DA", "DT", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UR", "UT"})
_COLLAPSE = re.compile(r"[ \t]{2,}")
_DATE_VRS = frozenset({"DA", "DT"})
_META_TEXT_VRS = frozenset({"SH", "LO", "AE", "CS"})


def _could_be_number(value: str) -> bool:
    """Whether ``value`` could occur in the text of a number or a tag (it needs a digit or is -inf)."""
    return any(c.isdigit() for c in value) or value.strip().upper() == "-INF"


_NOT_DIGITS = re.compile(r"[^0-9]+")


def _is_identifying(value: str) -> bool:
    v = value.strip()
    if len(v) < 3:
        return False
    upper = v.upper()
    if upper in GENERIC:
        return False
    if v.isascii():
        # ASCII letters are exactly the characters whose case changes
        if upper != v.lower():
            return True
        return len(_NOT_DIGITS.sub("", v)) >= 4
    if any(c.isalpha() for c in v):
        return True
    return sum(c.isdigit() for c in v) >= 4


def values_of(value: object) -> list[str]:
    """String values of an element value (multi-valued, PN, bytes of private elements)."""
    if value is None:
        return []
    if isinstance(value, (str, int, float)):
        return [str(value)] if value != "" else []
    if isinstance(value, (list, MultiValue, tuple)):
        return [str(v) for v in value if v is not None and str(v) != ""]
    if isinstance(value, (bytes, bytearray)):
        return [bytes(value).decode("latin-1")]
    return [str(value)]


# struct formats of the numeric VRs pydicom decodes with plain ``convert_numbers``
_NUMBER_FORMATS = {"US": "H", "SS": "h", "UL": "L", "SL": "l", "FL": "f", "FD": "d", "SV": "q", "UV": "Q"}
_LUT_DESCRIPTORS = frozenset({0x00283002, 0x00281101, 0x00281102, 0x00281103, 0x00282002})


def _number_texts(elem: RawDataElement) -> list[str] | None:
    """``values_of`` the converted value of a raw little endian numeric element, or None."""
    fmt = _NUMBER_FORMATS.get(elem.VR) if elem.VR is not None else None
    raw = elem.value
    if fmt is None or not elem.is_little_endian or not isinstance(raw, bytes) or elem.tag in _LUT_DESCRIPTORS:
        return None
    size = struct.calcsize("=" + fmt)
    if len(raw) % size:
        return None
    return [str(v) for v in struct.unpack(f"<{len(raw) // size}{fmt}", raw)]


class Identifiers:
    """The identifiers of one instance; collected before, used during and after the walk."""

    __slots__ = ("strong", "strong_dates", "context", "weak", "weak_dates", "names", "kept", "kept_numbers",
                 "orig_uids", "kept_uids", "_clean")

    def __init__(self) -> None:
        self.strong: set[str] = set()
        self.strong_dates: set[str] = set()
        self.context: set[str] = set()
        self.weak: list[str] = []
        self.weak_dates: set[str] = set()
        self.names: set[str] = set()  # person names removed anywhere (weak): cleaning removes them
        self.kept: list[str] = []
        # kept raw numeric elements: decoded only if a weak identifier could be a number
        self.kept_numbers: list[tuple[RawDataElement, Dataset]] = []
        self.orig_uids: set[str] = set()
        self.kept_uids: set[str] = set()
        self._clean: Forms | None = None

    def add_name(self, value: str, patient: bool = True) -> None:
        """A person name; ``patient``: the patient's own (always flagged) or staff (context)."""
        target = self.strong if patient else self.context
        for p in name_parts(value):
            target.add(p)
        self._clean = None

    def add_value(self, value: str, patient: bool = True, split: bool = False) -> None:
        """An ID, an address or (``split``) an institution's name, whose distinctive words
        (``Riverside`` of ``Riverside Mercy Hospital``) count as context too."""
        v = value.strip()
        if _is_identifying(v):
            (self.strong if patient else self.context).add(v)
            if split and " " in v:
                self.context.update(words(v))
            self._clean = None

    def add_birth_date(self, value: str) -> None:
        v = value.strip()
        if parse_date(v) is not None:
            self.strong_dates.add(v[:8])
        elif len(v) >= 4:
            self.strong.add(v)
        self._clean = None

    def add_weak(self, vr: str, value: object) -> None:
        if vr not in TEXT_VRS:
            return
        self._clean = None
        weak = self.weak
        if vr == "PN":
            for v in values_of(value):
                parts = name_parts(v)
                weak.extend(parts)
                self.names.update(parts)
            return
        if vr in _DATE_VRS:
            for v in values_of(value):
                for one in v.split("-") if vr == "DA" else (v,):
                    if parse_date(one) is not None:
                        self.weak_dates.add(one.strip()[:8])
            return
        for v in values_of(value):
            v = v.strip()
            if len(v) >= 4 and _is_identifying(v):
                weak.append(v)

    def add_kept(self, value: object) -> None:
        self.kept.extend(values_of(value))

    def add_kept_element(self, rd: Reader, ds: Dataset, elem: Element, vr: str) -> None:
        """A kept element, read from its raw bytes when possible."""
        if type(elem) is RawDataElement:
            if vr in STRING_VRS:
                text = rd.text(elem, vr)
                if text is not None:
                    self.kept.append(text)
                    return
            elif vr in _BYTES_VRS:
                if elem.value:
                    self.kept.append(elem.value.decode("latin-1"))
                return
            elif vr != "SQ":
                self.kept_numbers.append((elem, ds))
                return
            self.add_kept(convert_raw_data_element(elem, encoding=ds._character_set, ds=ds).value)
            return
        self.add_kept(elem.value)

    def literal_terms(self) -> set[str]:
        """Strong and context identifiers as plain strings, the birth date in its common
        spellings: for matchers that cannot use ``Forms`` (OCR of burned-in text)."""
        return self.strong | self.context | {f for d in self.strong_dates for f in date_spellings(d)}

    def clean_forms(self) -> Forms:
        """What cleaning removes: strong and context identifiers, removed person names, dates
        and ID-like values, in every written form."""
        if self._clean is None:
            literals = self.strong | self.context | self.names | {w for w in self.weak if id_like(w)}
            self._clean = forms(literals, self.strong_dates | self.weak_dates)
        return self._clean

    def clean(self, text: str) -> str:
        """Remove every identifier of this instance, in any written form, from free text."""
        found = self.clean_forms()
        if not found:
            return text
        out = found.remove(text)
        if out != text:
            out = _COLLAPSE.sub(" ", out).strip()
        return out

    def scan_pattern(self, generic: Iterable[str] = ()) -> Forms | None:
        """Strong identifiers plus the weak ones the profile did not keep elsewhere."""
        kept_blob = "\n".join(self.kept).upper()
        extra = {g.upper() for g in generic}
        weak = {w for w in (*self.weak, *self.context) if w.upper() not in kept_blob and w.upper() not in extra}
        if weak and self.kept_numbers and any(_could_be_number(w) for w in weak):
            numbers: list[str] = []
            for elem, ds in self.kept_numbers:
                fast = _number_texts(elem)
                if fast is None:
                    fast = values_of(convert_raw_data_element(elem, ds=ds).value)
                numbers.extend(fast)
            numbers_blob = "\n".join(numbers).upper()
            weak = {w for w in weak if w.upper() not in numbers_blob}
        strong = {s for s in self.strong if s.upper() not in extra}
        dates = self.strong_dates | {d for d in self.weak_dates if d not in kept_blob}
        context = {c for c in self.context if c in weak}
        found = forms(strong | context, dates, exact=weak - context)
        return found if found else None


def scan(
    ds: Dataset, ids: Identifiers, skip: frozenset[int], class_uids: frozenset[int] = frozenset(),
    generic: Iterable[str] = (), shifted_dates: bool = False,
) -> None:
    """Raise DeidError('residual_phi') naming the first attribute path that still holds an identifier.

    ``skip``: top-level tags written by the engine itself; ``class_uids``: UI tags naming
    classes/syntaxes, which are never remapped and so never compared with original UIDs.
    Raw elements are searched in their decoded text without converting them. The texts are
    searched together, once (one regular-expression pass instead of one per element: a
    third of the scan's time on a CT); only a hit looks for the attribute that holds it.
    """
    meta = getattr(ds, "file_meta", None)
    if meta is not None:
        # the file meta the engine keeps (ImplementationVersionName...) is kept text like any other:
        # a vendor's name in it is no residue of an institution of the same name
        for e in meta._dict.values():  # read raw, never converted (the writer copies raw bytes)
            if e.VR in _META_TEXT_VRS and e.value:
                ids.kept.append(e.value.decode("latin-1") if isinstance(e.value, bytes) else str(e.value))
    pattern = ids.scan_pattern(generic)
    bad_uids = ids.orig_uids - ids.kept_uids
    # every DA/DT of the output was shifted: an equal original date elsewhere is a coincidence
    vrs = SCAN_VRS - {"DA", "DT"} if shifted_dates else SCAN_VRS
    texts: list[tuple[str, int, str]] = []
    if meta is not None:
        _scan(meta, pattern, bad_uids, skip, class_uids, vrs, "", None, texts)
    _scan(ds, pattern, bad_uids, skip, class_uids, vrs, "", None, texts)
    if pattern is not None and texts and pattern.search("\0".join(t for _p, _t, t in texts)):
        for path, tag, text in texts:
            if pattern.search(text):
                raise DeidError("residual_phi", "an original identifier survived", path + _name(tag))


def _scan(
    ds: Dataset, pattern: Forms | None, bad_uids: set[str], skip: frozenset[int],
    class_uids: frozenset[int], vrs: frozenset[str], path: str, parent: Reader | None,
    texts: list[tuple[str, int, str]],
) -> None:
    """Check the UIDs and raw bytes of ``ds``; collect its texts (path, text) for one search."""
    rd = Reader.of(ds, parent)
    for tag, elem in list(ds._dict.items()):
        vr = rd.vr(ds, tag, elem)
        elem = ds._dict[tag]
        t = int(tag)
        if t in skip and type(elem) is RawDataElement:
            continue  # a top-level element the engine wrote from its own constants
        if vr == "SQ":
            for i, item in enumerate(ds[tag].value or ()):
                _scan(item, pattern, bad_uids, frozenset(), class_uids, vrs, f"{path}{_name(t)}[{i}].", rd, texts)
            continue
        if t in skip:
            continue
        if vr == "UI":
            if bad_uids and t not in class_uids:
                if any(v in bad_uids for v in values_of(rd.value(ds, tag, elem, vr))):
                    raise DeidError("residual_phi", "an original UID survived", path + _name(t))
            continue
        if pattern is None:
            continue
        private_bytes = t >> 16 & 1 and vr in ("UN", "OB")
        if vr in vrs or private_bytes:
            text = None
            if type(elem) is RawDataElement:
                if pattern.has_bytes and elem.value and pattern.search_bytes(elem.value):
                    raise DeidError("residual_phi", "an original identifier survived", path + _name(t))
                if private_bytes:
                    text = elem.value.decode("latin-1") if elem.value else ""
                else:
                    text = rd.text(elem, vr)
            if text is not None:
                if text:
                    texts.append((path, t, text))
                continue
            for v in values_of(rd.value(ds, tag, elem, vr)):
                texts.append((path, t, v))


def _name(tag: int) -> str:
    """Keyword of a public tag, else (gggg,eeee)."""
    kw = keyword_for_tag(tag) if not tag >> 16 & 1 else ""
    return kw or f"({tag >> 16:04X},{tag & 0xFFFF:04X})"
