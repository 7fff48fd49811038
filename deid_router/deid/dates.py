"""Per-patient date shifting of DA and DT values. Anything unparseable is dropped, never kept."""

from __future__ import annotations

import datetime as _dt

_ORDINAL_CACHE: dict[tuple[str, int], str] = {}


def shift_da(value: str, days: int) -> str:
    """Shift one DA (YYYYMMDD, or a YYYYMMDD-YYYYMMDD range); '' if invalid or partial."""
    value = value.strip()
    if "-" in value:
        parts = value.split("-")
        if len(parts) != 2:
            return ""
        a = shift_da(parts[0], days) if parts[0] else ""
        b = shift_da(parts[1], days) if parts[1] else ""
        if (parts[0] and not a) or (parts[1] and not b) or not (a or b):
            return ""
        return f"{a}-{b}"
    key = (value, days)
    hit = _ORDINAL_CACHE.get(key)
    if hit is not None:
        return hit
    out = ""
    if len(value) == 8 and value.isdigit():
        try:
            d = _dt.date(int(value[:4]), int(value[4:6]), int(value[6:8])) + _dt.timedelta(days=days)
            out = d.strftime("%Y%m%d") if d.year >= 1 else ""
        except (ValueError, OverflowError):
            out = ""
    if len(_ORDINAL_CACHE) > 100_000:
        _ORDINAL_CACHE.clear()
    _ORDINAL_CACHE[key] = out
    return out


def shift_dt(value: str, days: int) -> str:
    """Shift the date part of one DT; a DT without a full date is dropped ('')."""
    value = value.strip()
    if "-" in value[1:] and not any(c in value for c in "+") and value.count("-") == 1 and len(value.split("-")[1]) >= 8:
        a, b = value.split("-")
        sa = shift_dt(a, days) if a else ""
        sb = shift_dt(b, days)
        return f"{sa}-{sb}" if sb and (sa or not a) else ""
    if len(value) < 8:
        return ""
    date = shift_da(value[:8], days)
    if not date:
        return ""
    rest = value[8:]
    if rest and not all(c in "0123456789.+-" for c in rest):
        return ""
    return date + rest


def clamp_age(value: str) -> str:
    """AS ages of 90 years or more become '090Y' (HIPAA); others are kept as they are."""
    v = value.strip()
    if len(v) == 4 and v[:3].isdigit() and v[3] == "Y" and int(v[:3]) >= 90:
        return "090Y"
    if len(v) == 4 and v[:3].isdigit() and v[3] in "DWM":
        return v
    if len(v) == 4 and v[:3].isdigit() and v[3] == "Y":
        return v
    return ""
