"""The de-identification profile as data: Table E.1-1 + selected options + per-route rules.

Everything is resolved once, in the constructor, into one dict ``tag -> Action`` (the enum
of actions.py) so that the engine does one dictionary lookup per element; the compound
codes (X/Z, X/D, X/Z/D, Z/D, X/Z/U*) are resolved per IOD by ``actions_in`` from the
attribute's type there (iod_types.py), once per IOD and context, cached.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from typing import Any

from pydicom.datadict import tag_for_keyword

from deid_router.config import DEID_OPTIONS, DeidConfig
from deid_router.deid import iod_types
from deid_router.deid.actions import RULE_ACTIONS, VERBS, Action
from deid_router.deid.raw import public_vr

EDITION = "2026d"
_TAG_RE = re.compile(r"^\(([0-9A-Fa-f]{4}),([0-9A-Fa-f]{4})\)$")

_BASIC = {a.value: a for a in (Action.REMOVE, Action.EMPTY, Action.DUMMY, Action.UID, Action.KEEP, Action.CLEAN)}
# Compound codes are resolved per IOD from the attribute's type there (iod_types.py):
# each choice and the type it satisfies (X: Type 3 or absent, Z: Type 2, D and U*: Type 1).
COMPOUND = frozenset({"X/Z", "X/D", "X/Z/D", "Z/D", "X/Z/U*"})
_SATISFIES = {"X": 0, "Z": 1, "D": 2, "U*": 2}
_CHOICE = {"X": Action.REMOVE, "Z": Action.EMPTY, "D": Action.DUMMY, "U*": Action.UID}
_NEEDS = {None: 0, "3": 0, "2": 1, "1": 2}
_RULE_CODES = RULE_ACTIONS
# Codes that keep (part of) the original information.
KEEPING = frozenset(a for a in Action if a.keeps)

CURVE = "curve"
OVERLAY_DATA = "overlay_data"
OVERLAY_COMMENTS = "overlay_comments"
PRIVATE = "private"


@lru_cache(maxsize=1)
def table_rows() -> tuple[dict[str, Any], ...]:
    """Table E.1-1 rows as shipped in the package."""
    text = resources.files("deid_router.deid").joinpath("data/ps3.15-e1-1.json").read_text("utf-8")
    return tuple(json.loads(text))


@lru_cache(maxsize=1)
def safe_private_rows() -> tuple[dict[str, Any], ...]:
    text = resources.files("deid_router.deid").joinpath("data/safe-private.json").read_text("utf-8")
    return tuple(json.loads(text))


def parse_tag(text: str) -> int | None:
    """``(gggg,eeee)`` or a keyword -> tag int; None if neither."""
    m = _TAG_RE.match(text.strip())
    if m:
        return int(m.group(1) + m.group(2), 16)
    found = tag_for_keyword(text.strip())
    return int(found) if found is not None else None


def _row_key(tag: str) -> int | str:
    if tag.startswith("(50xx"):
        return CURVE
    if tag == "(60xx,3000)":
        return OVERLAY_DATA
    if tag == "(60xx,4000)":
        return OVERLAY_COMMENTS
    if tag.startswith("(gggg"):
        return PRIVATE
    return int(tag[1:5] + tag[6:10], 16)


def resolve_compound(code: str, type_: str | None) -> Action:
    """The choice of a compound code for an attribute of ``type_`` ("1", "2", "3"; None: absent).

    The most removing choice that the type allows: X for Type 3 or absent, Z for Type 2, D
    (or U*, which keeps the sequence with its UIDs remapped) for Type 1; when the code has no
    such choice, its last (most keeping) one.
    """
    choices = code.split("/")
    need = _NEEDS.get(type_, 0)
    for choice in choices:
        if _SATISFIES[choice] >= need:
            return _CHOICE[choice]
    return _CHOICE[choices[-1]]


def resolve_row(row: dict[str, Any], options: tuple[str, ...], type_: str | None = None) -> Action:
    """Effective action of one table row for the selected options (and the attribute's IOD type).

    The first selected option (in ``DEID_OPTIONS`` order) with a non-empty cell wins over
    ``basic``; ``retain_long_modified_dates`` C means "shift the date" (S). A compound basic
    code is resolved for ``type_`` (None: an unknown IOD, the most removing choice).
    """
    opt = option_of(row, options)
    if opt is not None:
        cell = str(row[opt])
        if cell == "C" and opt == "retain_long_modified_dates":
            return Action.SHIFT
        return Action.KEEP if cell == "K" else Action.CLEAN
    basic = str(row["basic"])
    if basic in COMPOUND:
        return resolve_compound(basic, type_)
    return _BASIC[basic]


def option_of(row: dict[str, Any], options: tuple[str, ...]) -> str | None:
    """The selected option whose cell decides this row, if any."""
    for opt in DEID_OPTIONS:
        if opt in options and row[opt]:
            return opt
    return None


@dataclass(frozen=True)
class Profile:
    """Per-tag actions, pattern actions, safe-private keys and rule values, resolved once."""

    actions: dict[int, Action]
    patterns: dict[str, Action]
    safe_private: frozenset[tuple[str, int, int]]
    replace_values: dict[int, str]
    rule_tags: frozenset[int]
    options: tuple[str, ...]
    shift_dates: bool
    full_dates: bool
    retain_uids: bool
    # tag -> compound basic code, where neither an option nor a rule decides the tag
    compound: dict[int, str] = field(default_factory=dict)
    # sequences kept by an option (other than retain_uids) or a rule: their items keep their
    # coded entries whatever the scheme (the institution's code, the station's code...)
    whole_keep: frozenset[int] = frozenset()
    # tags whose values the profile or a rule keeps as they are (K; S keeps times)
    kept_tags: frozenset[int] = frozenset()
    _resolved: dict[tuple[str | None, int, bool], dict[int, Action]] = field(default_factory=dict, compare=False, repr=False)

    def actions_in(self, ciod: str | None, parent: int = -1, referencing: bool = False) -> dict[int, Action]:
        """The per-tag actions for an instance of IOD ``ciod`` (None: unknown), at the top level
        (``parent`` -1) or inside the items of the sequence ``parent``; cached.

        ``referencing``: the instance lists the instances it references (Common Instance
        Reference Module); its IOD then needs the references themselves, so X/Z/U* keeps
        them (U*: the sequence stays, its UIDs remapped), whatever the sequence's type.
        """
        types = iod_types.types_of(ciod)
        if parent != -1 and not iod_types.has_parent(ciod, parent):
            parent = -2  # no compound-coded attribute is defined in this context: all absent
        key = (ciod, parent, referencing)
        found = self._resolved.get(key)
        if found is not None:
            return found
        out = dict(self.actions)
        for tag, code in self.compound.items():
            type_ = "1" if referencing and code == "X/Z/U*" else types.get((parent, tag))
            out[tag] = resolve_compound(code, type_)
        if len(self._resolved) < 4096:
            self._resolved[key] = out
        return out

    @classmethod
    def build(cls, config: DeidConfig, with_rules: bool = True) -> Profile:
        options = tuple(config.options)
        actions: dict[int, Action] = {}
        patterns: dict[str, Action] = {}
        compound: dict[int, str] = {}
        whole_keep: set[int] = set()
        for row in table_rows():
            key = _row_key(str(row["tag"]))
            code = resolve_row(row, options)
            if isinstance(key, int):
                actions[key] = code
                opt = option_of(row, options)
                if opt is None and str(row["basic"]) in COMPOUND:
                    compound[key] = str(row["basic"])
                if code == Action.KEEP and opt not in (None, "retain_uids") and public_vr(key) == "SQ":
                    whole_keep.add(key)
            else:
                patterns[key] = code
        safe = frozenset(
            (str(r["private_creator"]).strip().upper(), int(str(r["group"]), 16), int(str(r["element"]), 16))
            for r in safe_private_rows()
        )
        replace_values: dict[int, str] = {}
        rule_tags: set[int] = set()
        if with_rules:
            for rule in config.rules:
                tag = parse_tag(rule.tag)
                if tag is None:
                    continue  # config validation reports it
                actions[tag] = _RULE_CODES[rule.action]
                compound.pop(tag, None)
                whole_keep.discard(tag)
                if rule.action == "keep":
                    whole_keep.add(tag)
                rule_tags.add(tag)
                if rule.action == "replace":
                    replace_values[tag] = rule.value or ""
        return cls(
            actions=actions,
            patterns=patterns,
            safe_private=safe,
            replace_values=replace_values,
            rule_tags=frozenset(rule_tags),
            options=options,
            shift_dates="retain_long_modified_dates" in options,
            full_dates="retain_long_full_dates" in options,
            retain_uids="retain_uids" in options,
            compound=compound,
            whole_keep=frozenset(whole_keep),
            kept_tags=frozenset(t for t, a in actions.items() if a in (Action.KEEP, Action.SHIFT)),
        )


def weakening_rules(config: DeidConfig) -> list[str]:
    """Warnings for rules that keep what the profile would remove or replace (for check-config)."""
    base = Profile.build(config, with_rules=False)
    warnings: list[str] = []
    for i, rule in enumerate(config.rules):
        tag = parse_tag(rule.tag)
        if tag is None:
            continue
        code = _RULE_CODES.get(rule.action)
        if code is None or not code.keeps:
            continue
        if tag >> 16 & 1:
            profile_code = base.patterns[PRIVATE]
        else:
            profile_code = base.actions.get(tag, Action.KEEP)
        if profile_code == code or profile_code == Action.KEEP:
            continue
        verb = VERBS.get(profile_code, "change")
        warnings.append(
            f"deid.rules[{i}]: action {rule.action!r} on {rule.tag} weakens the profile, which would {verb} it"
        )
    return warnings
