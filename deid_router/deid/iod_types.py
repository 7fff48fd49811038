"""Types (1, 2, 3) of the compound-coded Table E.1-1 attributes in each composite IOD.

Data only: ``data/iod-types.json``, derived at development time from the PyPI package
``dicom-standard`` by ``scripts/derive-iod-types`` (provenance in ``data/PROVENANCE.md``).
Keys are ``(parent, tag)``: ``parent`` -1 for the top level, else the tag of the sequence
whose items hold the attribute. An attribute absent from a context is not there at all.
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from typing import Any

_EMPTY: dict[tuple[int, int], str] = {}


def _tag(text: str) -> int:
    return int(text[1:5] + text[6:10], 16)


@lru_cache(maxsize=1)
def _table() -> dict[str, Any]:
    text = resources.files("deid_router.deid").joinpath("data/iod-types.json").read_text("utf-8")
    raw = json.loads(text)
    types: dict[str, dict[tuple[int, int], str]] = {}
    parents: dict[str, frozenset[int]] = {}
    for ciod, entries in raw["types"].items():
        out: dict[tuple[int, int], str] = {}
        for key, type_ in entries.items():
            if ">" in key:
                p, t = key.split(">")
                out[(_tag(p), _tag(t))] = str(type_)
            else:
                out[(-1, _tag(key))] = str(type_)
        types[ciod] = out
        parents[ciod] = frozenset(p for p, _ in out if p != -1)
    return {"sop": dict(raw["sop_classes"]), "types": types, "parents": parents, "source": raw["source"]}


def source() -> dict[str, Any]:
    """Where the table comes from (package, version, SHA-256 of each file read)."""
    return dict(_table()["source"])


def ciod_of(sop_class_uid: str) -> str | None:
    """The composite IOD of a SOP class; None for unknown or private classes."""
    found = _table()["sop"].get(sop_class_uid)
    return str(found) if found is not None else None


def types_of(ciod: str | None) -> dict[tuple[int, int], str]:
    if ciod is None:
        return _EMPTY
    found: dict[tuple[int, int], str] = _table()["types"].get(ciod, _EMPTY)
    return found


def has_parent(ciod: str | None, parent: int) -> bool:
    """Whether any compound-coded attribute is defined inside the items of ``parent`` in ``ciod``."""
    if ciod is None:
        return False
    return parent in _table()["parents"].get(ciod, frozenset())
