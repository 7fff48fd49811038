"""The action letters as one enum, dummy values per VR and VR length limits (what D, H and R
write so the output stays valid), and the coded-entry data the sequence sweep uses."""

from __future__ import annotations

from enum import StrEnum


class Action(StrEnum):
    """What happens to one element: the letters of Table E.1-1, plus the rules' own.

    Shared by the profile (which resolves every tag to one), the engine (whose handler table
    is keyed by it), the dry-run plan and the weakening warnings of ``check-config``.
    """

    REMOVE = "X"
    EMPTY = "Z"
    DUMMY = "D"
    KEEP = "K"
    CLEAN = "C"
    UID = "U"
    SHIFT = "S"  # shift a date (Retain Longitudinal Temporal Information Modified Dates)
    HASH = "H"  # keyed hash (rule)
    REPLACE = "R"  # a fixed value (rule)
    UNTABLED = ""  # not in Table E.1-1: kept at the top level, swept inside sequences

    @property
    def keeps(self) -> bool:
        """Whether the action keeps (part of) the original information."""
        return self in (Action.KEEP, Action.CLEAN, Action.SHIFT)


# rule action names of the configuration (config.RULE_ACTIONS) -> actions
RULE_ACTIONS: dict[str, Action] = {
    "keep": Action.KEEP, "remove": Action.REMOVE, "empty": Action.EMPTY, "dummy": Action.DUMMY,
    "replace": Action.REPLACE, "uid": Action.UID, "hash": Action.HASH, "shift_date": Action.SHIFT,
    "clean": Action.CLEAN,
}
# names the dry-run plan prints
PLAN_NAMES: dict[Action, str] = {
    Action.REMOVE: "remove", Action.EMPTY: "empty", Action.DUMMY: "dummy", Action.KEEP: "keep",
    Action.CLEAN: "clean", Action.UID: "uid", Action.SHIFT: "shift_date", Action.HASH: "hash",
    Action.REPLACE: "replace",
}
# verbs of the weakening warnings
VERBS: dict[Action, str] = {
    Action.REMOVE: "remove", Action.EMPTY: "empty", Action.DUMMY: "replace with a dummy",
    Action.UID: "replace with a keyed UID", Action.CLEAN: "clean", Action.SHIFT: "date-shift",
}

TEXT_DUMMY = "ANONYMIZED"
PN_DUMMY = "ANONYMOUS"

DUMMY: dict[str, object] = {
    "AE": TEXT_DUMMY, "AS": "000Y", "CS": "REMOVED", "DA": "19000101", "DS": "0",
    "DT": "19000101000000.000000", "IS": "0", "LO": TEXT_DUMMY, "LT": TEXT_DUMMY, "PN": PN_DUMMY,
    "SH": TEXT_DUMMY, "ST": TEXT_DUMMY, "TM": "000000.00", "UC": TEXT_DUMMY, "UT": TEXT_DUMMY,
    "UR": "", "FL": 0.0, "FD": 0.0, "SL": 0, "SS": 0, "UL": 0, "US": 0, "SV": 0, "UV": 0,
    "AT": None, "OB": b"", "OW": b"", "OF": b"", "OD": b"", "OL": b"", "OV": b"", "UN": b"",
}
TEXT_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UR", "UT", "UI"})
MAX_LEN: dict[str, int] = {"AE": 16, "CS": 16, "LO": 64, "SH": 16, "PN": 64, "ST": 1024, "LT": 10240,
                           "UT": 1 << 20, "UC": 1 << 20, "DS": 16, "IS": 12, "UR": 1 << 20}


def dummy(vr: str) -> object:
    """The dummy value D writes for a VR (empty for binary VRs)."""
    return DUMMY.get(vr, None)


def empty(vr: str) -> object:
    """The zero-length value Z writes."""
    return "" if vr in TEXT_VRS else None


def fit(vr: str, text: str) -> str:
    """Truncate to the VR's maximum length; CS must be upper case."""
    n = MAX_LEN.get(vr)
    out = text[:n] if n else text
    return out.upper() if vr == "CS" else out


# Values swept out of the items of kept sequences (and replaced by dummies in D sequences).
SWEPT_VRS = frozenset({"PN", "LO", "SH", "ST", "LT", "UT", "UC", "UR", "DA", "DT", "TM", "AS", "AE"})
CLEANABLE_VRS = frozenset({"LO", "SH", "ST", "LT", "UT", "UC"})
BINARY_VRS = frozenset({"OB", "OW", "OF", "OD", "OL", "OV", "UN"})

# The attributes of a coded entry (PS3.3 Table 8.8-1); a code of a registered scheme is not
# free text, one of a local scheme (99..., L, ...) may name anything and becomes DUMMY_CODE.
CODE_TAGS = frozenset({
    0x00080100, 0x00080102, 0x00080103, 0x00080104, 0x00080105, 0x00080106, 0x00080107, 0x0008010B,
    0x0008010D, 0x0008010F, 0x00080117, 0x00080118, 0x00080119, 0x00080120, 0x00080122,
})
DUMMY_CODE = ((0x00080100, "SH", "261665006"), (0x00080102, "SH", "SCT"), (0x00080104, "LO", "Unknown"))


def _registered_schemes() -> frozenset[str]:
    """Coding scheme designators of PS3.16 Table 8-1 (pydicom's concept dictionaries and the
    common ones they do not cover)."""
    from pydicom.sr import _concepts_dict

    extra = {"DCM", "SCT", "SRT", "SNM3", "LN", "UCUM", "FMA", "RADLEX", "NCIt", "UMLS", "MSH", "MDC",
             "NEU", "I10", "I10C", "I10P", "I9C", "I11", "ICDO3", "ACR", "ASTM-sigpurpose", "C4", "C5", "HPC",
             "ISO3166_1", "ISO639_1", "ISO639_2", "ISO_OID", "NCDR", "NICIP", "HL7", "RFC3066", "RFC5646",
             "ITIS_TSN", "NDC", "RXNORM", "PUBCHEM_CID", "IBSI", "BARI", "UNS", "SPN", "MAYOASRG", "NYUMCCG"}
    return frozenset(set(_concepts_dict.concepts) | extra)


REGISTERED_SCHEMES = _registered_schemes()
