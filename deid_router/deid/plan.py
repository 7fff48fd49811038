"""Dry run: what de-identification would do to each attribute of one dataset, without doing it.

Used by ``deid-router deidentify --dry-run``. The privacy officer running it already holds
the input, so the input values are shown next to the output values. The plan is computed
by de-identifying a copy with a crosswalk that records nothing, then comparing attribute
by attribute, so it cannot drift from what the engine really does.
"""

from __future__ import annotations

import copy

from pydicom.datadict import keyword_for_tag
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from deid_router.deid.actions import DUMMY, DUMMY_CODE, PLAN_NAMES, Action
from deid_router.deid.crosswalk import NullCrosswalk
from deid_router.deid.engine import Deidentifier
from deid_router.deid.profile import CURVE, OVERLAY_COMMENTS, OVERLAY_DATA, PRIVATE

PlanRow = tuple[str, str, str | None, str | None]

_CODE_NAMES = PLAN_NAMES
# what a swept or dummy value reads as (untabled text inside a sequence, a dummy code)
_DUMMIES = frozenset(str(v) for v in DUMMY.values() if isinstance(v, str) and v) | {v for _, _, v in DUMMY_CODE}
_PSEUDONYM_TAGS = frozenset({0x00100010, 0x00100020, 0x00080050, 0x00200010})


def _name(tag: int) -> str:
    kw = keyword_for_tag(tag) if not tag >> 16 & 1 else ""
    return kw or f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def _text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, (bytes, bytearray)):
        return f"<{len(value)} bytes>"
    if isinstance(value, (list, tuple, MultiValue)):
        return "\\".join(_text(v) for v in value)
    return str(value)


def _flatten(ds: Dataset, prefix: str, out: dict[str, tuple[int, str, str]]) -> None:
    """path -> (tag, VR, value text); sequences as '<n items>' followed by their items."""
    for elem in ds:
        tag = int(elem.tag)
        path = prefix + _name(tag)
        if elem.VR == "SQ":
            items = list(elem.value or ())
            out[path] = (tag, "SQ", f"<{len(items)} items>")
            for i, item in enumerate(items):
                _flatten(item, f"{path}[{i}].", out)
        else:
            out[path] = (tag, str(elem.VR), _text(elem.value))


def _profile_code(d: Deidentifier, tag: int) -> Action:
    code = d.profile.actions.get(tag)
    if code is not None:
        return code
    group = tag >> 16
    if group & 1:
        return d.profile.patterns[PRIVATE]
    if (group & 0xFF00) == 0x5000:
        return d.profile.patterns[CURVE]
    if (group & 0xFF01) == 0x6000:
        if tag & 0xFFFF == 0x3000:
            return d.profile.patterns[OVERLAY_DATA]
        if tag & 0xFFFF == 0x4000:
            return d.profile.patterns[OVERLAY_COMMENTS]
    return Action.KEEP


def _action(d: Deidentifier, tag: int, vr: str, before: str, after: str | None, top: bool) -> str:
    if after is None:
        return "remove"
    if top and tag in _PSEUDONYM_TAGS:
        return "pseudonym" if after != before else "keep"
    if tag in _PSEUDONYM_TAGS and before and after != before and tag not in (0x00100010, 0x00100020):
        return "pseudonym"
    if after == before:
        return "keep"
    if vr == "UI":
        return "uid"
    if vr in ("DA", "DT") and after and d.profile.shift_dates:
        return "shift_date"
    if not after or after == "<0 items>":
        return "empty"
    code = _profile_code(d, tag)
    name = _CODE_NAMES.get(code, "replace")
    if name in ("keep", "remove", "empty"):  # the value changed anyway: swept, an age clamp or cleaned text
        return "dummy" if after in _DUMMIES else "clean"
    return name


def dry_run(deidentifier: Deidentifier, ds: Dataset) -> list[PlanRow]:
    """(path, action, before, after) for every attribute of ``ds`` and every one the engine adds.

    ``ds`` is not modified and nothing is recorded in the crosswalk. A dataset the engine
    would quarantine raises the same DeidError as ``deidentify``.
    """
    quiet = copy.copy(deidentifier)
    quiet.crosswalk = NullCrosswalk()
    out = quiet.deidentify(copy.deepcopy(ds))
    before: dict[str, tuple[int, str, str]] = {}
    after: dict[str, tuple[int, str, str]] = {}
    meta_in, meta_out = getattr(ds, "file_meta", None), getattr(out, "file_meta", None)
    if meta_in is not None:
        _flatten(meta_in, "file_meta.", before)
    if meta_out is not None:
        _flatten(meta_out, "file_meta.", after)
    _flatten(ds, "", before)
    _flatten(out, "", after)
    rows: list[PlanRow] = []
    for path, (tag, vr, text) in before.items():
        new = after.get(path)
        new_text = new[2] if new is not None else None
        top = "." not in path
        rows.append((path, _action(quiet, tag, vr, text, new_text, top), text, new_text))
    for path, (_tag, _vr, text) in after.items():
        if path not in before:
            rows.append((path, "replace", None, text))  # written by the engine (PatientIdentityRemoved...)
    return rows
