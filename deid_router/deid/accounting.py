"""The output check: every value of a de-identified instance is accounted for.

A second guard beside the residual scan, and independent of the table walk: the scan looks
for the identifiers it knows; this check asks of every value where it came from, so that a
value the walk forgot (a table gap, a new attribute, a bug) is caught even when nothing
about it is known. A value is accounted for when

* PN: the engine wrote it (pseudonym, dummy, cleaned text, rule value) or the profile keeps the attribute;
* UI: it is registered (pydicom's UID dictionary), derived by the keyed map, names a class
  or syntax, or the profile keeps UIDs (``retain_uids``, a K action);
* DA/DT: the engine wrote it (shifted, dummy) or an option or a K action keeps it;
* text inside a sequence (LO, SH, ST, LT, UT, UC, UR, AS, TM, AE, public UN): the engine
  wrote it, it belongs to a coded entry of a registered scheme (of any scheme inside a
  sequence an option or a rule keeps), or the profile or a rule keeps it (a K action, times
  under the date options);
* private: the Retain Safe Private Option keeps it (Table E.3.10-1) or a rule names it.

Anything else raises DeidError("output_unaccounted") with the attribute path, never the value.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydicom._uid_dict import UID_dictionary
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag

from deid_router.deid.actions import CODE_TAGS, REGISTERED_SCHEMES
from deid_router.deid.raw import Reader
from deid_router.deid.residual import values_of
from deid_router.errors import DeidError

if TYPE_CHECKING:
    from deid_router.deid.profile import Profile

_NESTED_VRS = frozenset({"LO", "SH", "ST", "LT", "UT", "UC", "UR", "AS", "TM", "AE", "UN"})
_CHECKED_VRS = _NESTED_VRS | {"PN", "UI", "DA", "DT"}
_T_CSD = BaseTag(0x00080102)
_T_CODE_VALUE, _T_LONG_CODE, _T_URN_CODE = BaseTag(0x00080100), BaseTag(0x00080119), BaseTag(0x00080120)
_T_MEDIA_INSTANCE = BaseTag(0x00020003)


class _Check:
    __slots__ = ("written", "derived", "profile", "own", "class_uids", "kept_tags", "dates_kept", "times_kept")

    def __init__(self, written: set[str], derived: set[str], profile: Profile, own: frozenset[int],
                 class_uids: frozenset[int]) -> None:
        self.written = written
        self.derived = derived
        self.profile = profile
        self.own = own
        self.class_uids = class_uids
        self.kept_tags = profile.kept_tags
        self.dates_kept = profile.full_dates
        self.times_kept = profile.full_dates or profile.shift_dates

    def uid_ok(self, t: int, values: list[str]) -> bool:
        if self.profile.retain_uids or t in self.class_uids or t in self.kept_tags:
            return True
        derived, written = self.derived, self.written
        return all(v in derived or v in written or v in UID_dictionary for v in (x.strip(" \0") for x in values) if v)

    def written_ok(self, values: list[str]) -> bool:
        written = self.written
        return all(v in written for v in (x.strip(" \0") for x in values) if v)

    def dataset(self, ds: Dataset, parent: Reader | None, path: str, nested: bool, kept: bool) -> None:
        rd = Reader.of(ds, parent)
        store = ds._dict
        registered: bool | None = None
        if nested and _T_CSD in store and (_T_CODE_VALUE in store or _T_LONG_CODE in store or _T_URN_CODE in store):
            csd = values_of(rd.value(ds, _T_CSD, store[_T_CSD], "SH"))
            registered = bool(csd) and csd[0].strip() in REGISTERED_SCHEMES
        for tag, elem in list(store.items()):
            t = int(tag)
            if not nested and t in self.own and type(elem) is RawDataElement:
                continue  # written by the engine from its own constants
            if type(elem) is RawDataElement and not elem.length:
                continue
            group = t >> 16
            if group & 1:
                self.private(ds, rd, tag, path, nested, kept)
                continue
            if group == 0x0002:
                continue
            vr = rd.vr(ds, tag, elem)
            if vr == "SQ":
                whole = t in self.profile.whole_keep  # its own items, not deeper
                name = _name(t)
                for i, item in enumerate(ds[tag].value or ()):
                    self.dataset(item, rd, f"{path}{name}[{i}].", True, whole)
                continue
            if vr not in _CHECKED_VRS or (not nested and vr in _NESTED_VRS):
                continue
            values = values_of(rd.value(ds, tag, store[tag], vr))
            if not values or self.accounted(t, vr, values, nested, kept, registered):
                continue
            where = path + _name(t)
            raise DeidError("output_unaccounted", f"{where}: a {vr} value the engine neither wrote nor keeps", where)

    def accounted(self, t: int, vr: str, values: list[str], nested: bool, kept: bool,
                  registered: bool | None) -> bool:
        if vr == "UI":
            return self.uid_ok(t, values)
        if t in self.kept_tags or self.written_ok(values):
            return True
        if vr == "DA" or vr == "DT":
            return self.dates_kept or bool(registered and t in CODE_TAGS)
        if vr == "PN":
            return False
        # text inside a sequence
        if t in CODE_TAGS and (registered or (kept and registered is not None)):
            return True
        if t == 0x00080102 and registered is None:
            return True  # a designator outside a coded entry (CodingSchemeIdentificationSequence)
        return vr == "TM" and self.times_kept

    def private(self, ds: Dataset, rd: Reader, tag: BaseTag, path: str, nested: bool, kept: bool) -> None:
        t = int(tag)
        lo = t & 0xFFFF
        if lo <= 0xFF or t in self.profile.rule_tags:
            return  # a creator (its block is kept), or an attribute a rule decides
        safe = False
        if "retain_safe_private" in self.profile.options:
            creator = ds._dict.get(BaseTag((t & 0xFFFF0000) | (lo >> 8)))
            if creator is not None:
                cval = values_of(rd.value(ds, creator.tag, creator, "LO"))
                key = (cval[0].strip().upper() if cval else "", t >> 16, lo & 0xFF)
                safe = key in self.profile.safe_private
        if not safe:
            where = path + _name(t)
            raise DeidError("output_unaccounted", f"{where}: a private attribute no option keeps", where)
        if rd.vr(ds, tag, ds._dict[tag]) == "SQ":
            for i, item in enumerate(ds[tag].value or ()):
                self.dataset(item, rd, f"{path}{_name(t)}[{i}].", True, kept)


def check_accounted(ds: Dataset, written: set[str], derived: set[str], profile: Profile,
                    own: frozenset[int], class_uids: frozenset[int]) -> None:
    """Raise DeidError('output_unaccounted') at the first value of ``ds`` nobody accounts for."""
    check = _Check(written, derived, profile, own, class_uids)
    meta = getattr(ds, "file_meta", None)
    if meta is not None:
        elem = meta._dict.get(_T_MEDIA_INSTANCE)
        if elem is not None:
            values = values_of(elem.value if not isinstance(elem.value, bytes)
                               else elem.value.decode("latin-1"))
            if values and not check.uid_ok(0x00080018, values):
                raise DeidError("output_unaccounted", "file_meta.MediaStorageSOPInstanceUID: an underived UID",
                                "file_meta.MediaStorageSOPInstanceUID")
    check.dataset(ds, None, "", False, False)


def _name(tag: int) -> str:
    from pydicom.datadict import keyword_for_tag

    kw = keyword_for_tag(tag) if not tag >> 16 & 1 else ""
    return kw or f"({tag >> 16:04X},{tag & 0xFFFF:04X})"
