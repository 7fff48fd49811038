"""Operator selections (issue 13): ages, reasons, the safety rule; and the purged state."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from deid_router.errors import ConfigError
from deid_router.jobs.selection import Item, Selection, choose, is_protected, parse_age, reason_matches
from deid_router.jobs.states import ALL_STATES, JobState, allowed

NOW = datetime(2026, 1, 2, tzinfo=timezone.utc)


def test_purged_is_reached_only_from_failed_and_is_final() -> None:
    assert [s for s in (None, *JobState) if allowed(s, JobState.PURGED)] == [JobState.FAILED]
    assert not any(allowed(JobState.PURGED, s) for s in JobState)
    assert JobState.PURGED not in ALL_STATES  # status counts the v1 states only


@pytest.mark.parametrize("text,seconds", [("90s", 90), ("30m", 1800), ("24h", 86400), ("7d", 604800), ("1.5h", 5400)])
def test_ages(text: str, seconds: int) -> None:
    assert parse_age(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "7", "d", "-1d", "soon", "3y"])
def test_bad_ages_are_usage_errors(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_age(text)


def test_reasons_match_by_code_glob_or_exactly() -> None:
    assert reason_matches("deid:burned_in_annotation", "burned_in_annotation")
    assert reason_matches("deid:burned_in_annotation", "deid:burned_in_annotation")
    assert reason_matches("refused_0xA900", "refused_*")
    assert not reason_matches("refused_0xA900", "burned_in_annotation")
    assert is_protected("conflict_same_sop_instance_uid") and is_protected("deid:burned_in_no_rule")
    assert not is_protected("deid:residual_phi")


def test_choose_applies_every_filter_and_skips_protected_in_bulk_only() -> None:
    items = [
        (Item(1, "pacs", "refused_0xA900", NOW - timedelta(days=2)), "a"),
        (Item(2, "pacs", "deid:burned_in_annotation", NOW - timedelta(days=2)), "b"),
        (Item(3, "outbox", "refused_0xA900", NOW - timedelta(hours=1)), "c"),
        (Item(4, "pacs", "conflict_same_sop_instance_uid", NOW), "d"),
    ]
    everything = choose(items, Selection(), NOW)
    assert (everything.take, everything.protected) == (["a", "c"], ["b", "d"])
    assert choose(items, Selection(destination="pacs", older_than=timedelta(days=1)), NOW).take == ["a"]
    assert choose(items, Selection(reasons=("burned_in_annotation",)), NOW).take == ["b"]
    assert choose(items, Selection(ids=(4,)), NOW).take == ["d"]  # named by id: the operator's choice
    assert choose(items, Selection(), NOW, guard=False).take == ["a", "b", "c", "d"]  # purge takes all
