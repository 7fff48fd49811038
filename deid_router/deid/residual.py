"""Identifiers of one instance, cleaning of free text, and the residual-PHI scan of the output.

Two classes of identifiers are collected from the ORIGINAL dataset:

* strong: the patient's name parts, patient IDs, accession number, birth date (four
  spellings) -- unless the profile keeps that attribute. Any occurrence in the output is
  residual PHI.
* context: institution, physician and operator names. Cleaning removes them (like the
  strong ones) from free text; in the output they count as weak identifiers.
* weak: every other value (>= 4 characters, not a generic token) of a text attribute that
  the profile removes or replaces. They are only flagged when the profile did not choose to
  keep the same text elsewhere (so "CT HEAD" removed in one place and kept in another is
  not a false positive).

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
GENERIC = frozenset({
    "YES", "NO", "NONE", "NULL", "UNKNOWN", "ANONYMOUS", "ANONYMIZED", "REMOVED", "MALE", "FEMALE",
    "OTHER", "TRUE", "FALSE", "ANON", "TEST", "DEID", "PATIENT", "HOSPITAL", "DOCTOR", "MR", "MRS", "DR",
    "NAME", "ORIGINAL", "DERIVED", "PRIMARY", "SECONDARY", "AXIAL", "LOCALIZER", "IMAGE",
})
TEXT_VRS = frozenset({"AE", "LO", "SH", "PN", "ST", "LT", "UT", "UC", "DA"})
_BYTES_VRS = frozenset({"OB", "OW", "OD", "OF", "OL", "OV", "UN"})
SCAN_VRS = frozenset({"AE", "AS", "CS", "DA", "DT", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UR", "UT"})
_SPLIT_NAME = re.compile(r"[\^=,\s]+")
_BOUND_L = r"(?<![0-9A-Za-z])"
_BOUND_R = r"(?![0-9A-Za-z])"


def name_parts(value: str) -> list[str]:
    """Components of a PN (family, given, middle...) of at least 3 characters."""
    return [p for p in _SPLIT_NAME.split(value) if len(p) >= 3 and p.upper() not in GENERIC]


def date_forms(da: str) -> list[str]:
    """A DA value as YYYYMMDD, DD.MM.YYYY, YYYY-MM-DD and MM/DD/YYYY."""
    da = da.strip()
    if len(da) != 8 or not da.isdigit():
        return [da] if len(da) >= 4 else []
    y, m, d = da[:4], da[4:6], da[6:]
    return [da, f"{d}.{m}.{y}", f"{y}-{m}-{d}", f"{m}/{d}/{y}"]


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


def _alternation(items: Iterable[str]) -> re.Pattern[str] | None:
    uniq = sorted({i.strip() for i in items if i.strip()}, key=lambda s: (-len(s), s))
    if not uniq:
        return None
    body = "|".join(u if u.isalnum() else re.escape(u) for u in uniq)  # escape changes no alnum text
    return re.compile(f"{_BOUND_L}(?:{body}){_BOUND_R}", re.IGNORECASE)


class Identifiers:
    """The identifiers of one instance; collected before, used during and after the walk."""

    __slots__ = ("strong", "context", "weak", "kept", "kept_numbers", "orig_uids", "kept_uids", "_clean_re")

    def __init__(self) -> None:
        self.strong: set[str] = set()
        self.context: set[str] = set()
        self.weak: list[str] = []
        self.kept: list[str] = []
        # kept raw numeric elements: decoded only if a weak identifier could be a number
        self.kept_numbers: list[tuple[RawDataElement, Dataset]] = []
        self.orig_uids: set[str] = set()
        self.kept_uids: set[str] = set()
        self._clean_re: re.Pattern[str] | None = None

    def add_name(self, value: str, patient: bool = True) -> None:
        """A person name; ``patient``: the patient's own (always flagged) or staff (context)."""
        target = self.strong if patient else self.context
        for p in name_parts(value):
            target.add(p)
        self._clean_re = None

    def add_value(self, value: str, patient: bool = True) -> None:
        v = value.strip()
        if _is_identifying(v):
            (self.strong if patient else self.context).add(v)
            self._clean_re = None

    def add_birth_date(self, value: str) -> None:
        for f in date_forms(value):
            self.strong.add(f)
        self._clean_re = None

    def add_weak(self, vr: str, value: object) -> None:
        if vr not in TEXT_VRS:
            return
        weak = self.weak
        if vr == "PN":
            for v in values_of(value):
                weak.extend(name_parts(v))
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

    def clean(self, text: str) -> str:
        """Remove every strong identifier token from free text."""
        if not self.strong and not self.context:
            return text
        if self._clean_re is None:
            self._clean_re = _alternation(self.strong | self.context)
        assert self._clean_re is not None
        out = self._clean_re.sub("", text)
        if out != text:
            out = re.sub(r"[ \t]{2,}", " ", out).strip()
        return out

    def scan_pattern(self, generic: Iterable[str] = ()) -> re.Pattern[str] | None:
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
        return _alternation(strong | weak)


def scan(
    ds: Dataset, ids: Identifiers, skip: frozenset[int], class_uids: frozenset[int] = frozenset(),
    generic: Iterable[str] = (), shifted_dates: bool = False,
) -> None:
    """Raise DeidError('residual_phi') naming the first attribute path that still holds an identifier.

    ``skip``: top-level tags written by the engine itself; ``class_uids``: UI tags naming
    classes/syntaxes, which are never remapped and so never compared with original UIDs.
    Raw elements are searched in their decoded text without converting them.
    """
    pattern = ids.scan_pattern(generic)
    bad_uids = ids.orig_uids - ids.kept_uids
    # every DA/DT of the output was shifted: an equal original date elsewhere is a coincidence
    vrs = SCAN_VRS - {"DA", "DT"} if shifted_dates else SCAN_VRS
    meta = getattr(ds, "file_meta", None)
    if meta is not None:
        _scan(meta, pattern, bad_uids, skip, class_uids, vrs, "", None)
    _scan(ds, pattern, bad_uids, skip, class_uids, vrs, "", None)


def _scan(
    ds: Dataset, pattern: re.Pattern[str] | None, bad_uids: set[str], skip: frozenset[int],
    class_uids: frozenset[int], vrs: frozenset[str], path: str, parent: Reader | None,
) -> None:
    rd = Reader.of(ds, parent)
    for tag, elem in list(ds._dict.items()):
        vr = rd.vr(ds, tag, elem)
        elem = ds._dict[tag]
        t = int(tag)
        if t in skip and type(elem) is RawDataElement:
            continue  # a top-level element the engine wrote from its own constants
        if vr == "SQ":
            for i, item in enumerate(ds[tag].value or ()):
                _scan(item, pattern, bad_uids, frozenset(), class_uids, vrs, f"{path}{_name(t)}[{i}].", rd)
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
                if private_bytes:
                    text = elem.value.decode("latin-1") if elem.value else ""
                else:
                    text = rd.text(elem, vr)
            if text is not None:
                if pattern.search(text):
                    raise DeidError("residual_phi", "an original identifier survived", path + _name(t))
                continue
            for v in values_of(rd.value(ds, tag, elem, vr)):
                if pattern.search(v):
                    raise DeidError("residual_phi", "an original identifier survived", path + _name(t))


def _name(tag: int) -> str:
    """Keyword of a public tag, else (gggg,eeee)."""
    kw = keyword_for_tag(tag) if not tag >> 16 & 1 else ""
    return kw or f"({tag >> 16:04X},{tag & 0xFFFF:04X})"
