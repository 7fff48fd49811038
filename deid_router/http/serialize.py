"""Rows to JSON-ready dicts (the API) and display helpers (the console): one place for both."""

from __future__ import annotations

import dataclasses
from datetime import datetime
from typing import Any


def plain(value: Any) -> Any:
    """Dataclasses, datetimes and containers as JSON types (datetimes in ISO 8601, UTC)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [plain(v) for v in value]
    return value


def status_hex(code: int | None) -> str:
    return "" if code is None else f"0x{code:04X}"


def when(t: datetime | None) -> str:
    return "" if t is None else t.strftime("%Y-%m-%d %H:%M:%S UTC")


def age(seconds: float | None) -> str:
    if seconds is None:
        return ""
    s = int(seconds)
    if s < 120:
        return f"{s} s"
    if s < 7200:
        return f"{s // 60} min"
    return f"{s // 3600} h"
