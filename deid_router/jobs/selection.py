"""Which jobs or quarantine entries an operator action takes: the filters and the safety rule.

``retry``, ``quarantine release|purge`` and ``resend`` (CLI and HTTP API alike) select by ids
or by filters (destination, reason, age). A bulk re-queue never takes an item whose reason
says sending it would do harm (:data:`PROTECTED_REASONS`: a same-UID conflict would overwrite
what the PACS holds; a burned-in annotation would leak what is written in the pixels) unless
that reason is named with ``--reason``. Items named by id are the operator's explicit choice.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from fnmatch import fnmatchcase
from typing import Generic, TypeVar

from deid_router.db.quarantine import CONFLICT_REASON
from deid_router.errors import ConfigError

# Reasons a bulk retry or release never re-queues unless named (globs on the recorded reason).
PROTECTED_REASONS: tuple[str, ...] = (
    CONFLICT_REASON,
    "deid:burned_in_annotation",
    "deid:burned_in_no_rule",
)

_AGE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_age(text: str) -> timedelta:
    """``90s``, ``30m``, ``24h``, ``7d``, ``2w``; ConfigError (exit 2) otherwise."""
    m = _AGE_RE.match(text)
    if m is None:
        raise ConfigError([("-", "--older-than", f"{text!r} is not an age such as 30m, 24h or 7d")])
    return timedelta(seconds=float(m.group(1)) * _AGE_UNITS[m.group(2)])


def reason_matches(reason: str, pattern: str) -> bool:
    """A recorded reason matches a pattern exactly, as a glob, or by its code after ``deid:``."""
    reason = reason or ""
    return reason == pattern or fnmatchcase(reason, pattern) or reason.split(":", 1)[-1] == pattern


def is_protected(reason: str) -> bool:
    return any(reason_matches(reason, p) for p in PROTECTED_REASONS)


@dataclass(frozen=True)
class Selection:
    """What an operator named: ids, or filters (all of them must match)."""

    ids: tuple[int, ...] = ()
    destination: str | None = None
    reasons: tuple[str, ...] = ()
    older_than: timedelta | None = None

    @property
    def bulk(self) -> bool:
        return not self.ids

    @property
    def filtered(self) -> bool:
        return self.destination is not None or bool(self.reasons) or self.older_than is not None


@dataclass(frozen=True)
class Item:
    """A candidate: a job or a quarantine entry, described by what the filters look at."""

    id: int
    destination: str | None
    reason: str
    at: datetime  # when it failed, or was quarantined


T = TypeVar("T")


@dataclass(frozen=True)
class Choice(Generic[T]):
    take: list[T]
    protected: list[T]  # matched the filters but skipped by the safety rule


def choose(candidates: Sequence[tuple[Item, T]], sel: Selection, now: datetime, guard: bool = True) -> Choice[T]:
    """Apply ``sel`` to ``candidates``; with ``guard`` (re-queues), skip protected reasons
    in a bulk selection unless a ``--reason`` names them."""
    take: list[T] = []
    protected: list[T] = []
    wanted = set(sel.ids)
    for item, value in candidates:
        if wanted and item.id not in wanted:
            continue
        if sel.destination is not None and item.destination != sel.destination:
            continue
        if sel.reasons and not any(reason_matches(item.reason, r) for r in sel.reasons):
            continue
        if sel.older_than is not None and now - item.at < sel.older_than:
            continue
        if guard and sel.bulk and is_protected(item.reason) and not any(
            reason_matches(item.reason, r) for r in sel.reasons
        ):
            protected.append(value)
            continue
        take.append(value)
    return Choice(take, protected)
