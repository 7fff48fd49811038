"""Dummy values per VR and VR length limits: what D, H and R write so the output stays valid."""

from __future__ import annotations

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
