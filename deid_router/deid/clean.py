"""The C (clean) action: free text, structured content, graphics and descriptors cleaned of
this instance's identifiers, so that the instance can be delivered instead of quarantined.

Three parts, each a small piece of data or one function the engine calls:

* ``collect_context``: before the walk, the person, institution and ID values held INSIDE
  sequences (a performing physician in a procedure step, an observer in an SR, an
  institution in a code sequence) join the identifiers, as the top-level ones already do.
* ``inside_cleaned``: the action of an element inside a sequence an option cleans
  (``ContentSequence`` under clean_structured_content, ``GraphicAnnotationSequence`` under
  clean_graphics, the code sequences of clean_descriptors). Text the table does not list,
  or would replace by a dummy, is cleaned (an SR TEXT item, an annotation's
  UnformattedTextValue, a CodeMeaning); person names the table does not list become dummies;
  dates it does not list are shifted or dummies; UIDs are remapped and codes kept as the
  table says. The tree keeps its structure, so an SR viewer still opens it.
* ``Cleaning``: C values are cleaned after the walk, when every identifier of the instance
  is known (a staff name met after the free text that mentions it is still removed); the
  cleaned text, never the original, is what the residual scan counts as kept.

What counts as an identifier's written form (dates in any order, IDs with separators, names
in each character set) is decided in ``deid/identifiers.py`` for both cleaning and the scan.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TypeVar

from pydicom.datadict import keyword_dict
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag

from deid_router.deid import actions as act
from deid_router.deid.raw import Element, Reader, public_vr
from deid_router.deid.residual import Identifiers, values_of

A = TypeVar("A", bound=str)
Put = Callable[[Reader, Dataset, BaseTag, Element, str, object], None]
_TEXT = "text"
_NAME = "name"
_DATE = "date"
_VR_CLASS = {"SH": _TEXT, "LO": _TEXT, "ST": _TEXT, "LT": _TEXT, "UT": _TEXT, "UC": _TEXT,
             "PN": _NAME, "DA": _DATE, "DT": _DATE}
# (table action, VR class) -> action inside a sequence that an option cleans; others unchanged.
INSIDE_CLEANED: dict[tuple[str, str], str] = {
    ("", _TEXT): "C",   # SR TextValue, CodeMeaning, labels: cleaned of identifiers
    ("D", _TEXT): "C",  # UnformattedTextValue of an annotation: cleaned, not replaced
    ("", _NAME): "D",   # a person name the table does not list: dummy
    ("", _DATE): "D",   # a date the table does not list: shifted (with the option) or dummy
}

# Attributes inside sequences whose values name an institution or a place (context).
_CONTEXT_KEYWORDS = (
    "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName", "VerifyingOrganization",
    "ResponsibleOrganization", "PersonAddress", "PersonTelephoneNumbers", "ReferringPhysicianAddress",
    "ReferringPhysicianTelephoneNumbers", "StationName", "RequestingService", "ScheduledStationName",
    "PerformedStationName", "ScheduledProcedureStepLocation", "PerformedLocation",
)
# Institution names: each distinctive word of them identifies as the whole name does.
INSTITUTION_TAGS = frozenset(int(keyword_dict[k]) for k in (
    "InstitutionName", "InstitutionalDepartmentName", "VerifyingOrganization", "ResponsibleOrganization",
) if k in keyword_dict)
# Attributes inside sequences whose values are the patient's or the order's IDs (strong).
_ID_KEYWORDS = (
    "PatientID", "OtherPatientIDs", "AccessionNumber", "MedicalRecordLocator", "RequestedProcedureID",
    "AdmissionID", "FillerOrderNumberImagingServiceRequest", "PlacerOrderNumberImagingServiceRequest",
    "IssuerOfPatientID",
)
# Code sequences whose CodeMeaning names an institution or a person (a real
# InstitutionCodeSequence holds the hospital's name).
_NAMING_CODE_SEQUENCES = ("InstitutionCodeSequence", "InstitutionalDepartmentTypeCodeSequence",
                          "PersonIdentificationCodeSequence")
CONTEXT_TAGS = frozenset(int(keyword_dict[k]) for k in _CONTEXT_KEYWORDS if k in keyword_dict)
ID_TAGS = frozenset(int(keyword_dict[k]) for k in _ID_KEYWORDS if k in keyword_dict)
NAMING_CODE_TAGS = frozenset(int(keyword_dict[k]) for k in _NAMING_CODE_SEQUENCES if k in keyword_dict)
_T_CODE_MEANING = 0x00080104
# The code of a coded entry stays as it is (CODE kept): changing a CodeValue or a coding
# scheme would turn it into another concept. Only its CodeMeaning is cleaned.
CODE_TAGS = frozenset(int(keyword_dict[k]) for k in (
    "CodeValue", "CodingSchemeDesignator", "CodingSchemeVersion", "LongCodeValue", "URNCodeValue",
    "MappingResource", "ContextIdentifier", "ContextGroupVersion", "ContextGroupLocalVersion",
    "MappingResourceName",
) if k in keyword_dict)


def inside_cleaned(action: A, vr: str, tag: int) -> A:
    """The action of an element inside a sequence that an option cleans (of the caller's
    type: the action letters are strings, or an enum of them)."""
    cls = _VR_CLASS.get(vr)
    if cls is None or tag in CODE_TAGS:
        return action
    found = INSIDE_CLEANED.get((str(action), cls))
    return action if found is None else type(action)(found)


def collect_context(ds: Dataset, rd: Reader, actions: Mapping[int, str], ids: Identifiers) -> None:
    """Add the names, institutions and IDs held inside the sequences of ``ds`` to ``ids``.

    Only sequences are visited (the top-level values are collected by the engine by tag);
    values the profile keeps (K) are not identifiers to remove.
    """
    store = ds._dict
    for tag in [t for t, e in store.items() if e.VR == "SQ" or (e.VR is None and public_vr(t) == "SQ")]:
        if tag & 0x10000:
            continue
        if rd.vr(ds, tag, store[tag]) == "SQ":
            naming = int(tag) in NAMING_CODE_TAGS
            for item in ds[tag].value or ():
                _collect_item(item, Reader.of(item, rd), actions, ids, naming)


def _collect_item(item: Dataset, rd: Reader, actions: Mapping[int, str], ids: Identifiers, naming: bool) -> None:
    for tag, elem in list(item._dict.items()):
        t = int(tag)
        if t & 0x10000 or actions.get(t, "") == "K":
            continue
        vr = rd.vr(item, tag, elem)
        if vr == "SQ":
            inner = t in NAMING_CODE_TAGS
            for sub in item[tag].value or ():
                _collect_item(sub, Reader.of(sub, rd), actions, ids, inner)
            continue
        if vr == "PN":
            for v in values_of(rd.value(item, tag, item._dict[tag], vr)):
                ids.add_name(v, patient=False)
        elif t in CONTEXT_TAGS or (naming and t == _T_CODE_MEANING):
            for v in values_of(rd.value(item, tag, item._dict[tag], vr)):
                ids.add_value(v, patient=False, split=t in INSTITUTION_TAGS or naming)
        elif t in ID_TAGS:
            for v in values_of(rd.value(item, tag, item._dict[tag], vr)):
                ids.add_value(v)


class Cleaning:
    """The C values of one instance, cleaned once the walk has collected every identifier."""

    __slots__ = ("_pending",)

    def __init__(self) -> None:
        self._pending: list[tuple[Dataset, BaseTag, Reader, str]] = []

    def defer(self, ds: Dataset, tag: BaseTag, rd: Reader, vr: str) -> None:
        self._pending.append((ds, tag, rd, vr))

    def apply(self, ids: Identifiers, put: Put | None = None) -> None:
        """Clean every deferred value; the cleaned text is what counts as kept.

        ``put(rd, ds, tag, elem, vr, value)`` stores a new value (default: ``Reader.set``); an
        engine that records what it wrote (for an output check) passes its own.
        """
        for ds, tag, rd, vr in self._pending:
            elem = ds._dict[tag]
            value = rd.value(ds, tag, elem, vr)
            new: object
            if isinstance(value, (list, MultiValue)):
                new = [_clean_one(ids, str(v), vr) for v in value]
            elif value is None or value == "":
                continue
            else:
                new = _clean_one(ids, str(value), vr)
            ids.add_kept(new)
            if put is None:
                rd.set(ds, tag, elem, vr, new)
            else:
                put(rd, ds, tag, elem, vr, new)
        self._pending.clear()


def _clean_one(ids: Identifiers, text: str, vr: str) -> str:
    out = ids.clean(text)
    if text.strip() and not out:
        return str(act.dummy(vr) or "")  # nothing but identifiers: a dummy keeps a Type 1 value valid
    return out
