"""FolderDestination: the layout users script against, atomic files, refusal of unsafe UIDs."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from deid_router.config import DestinationConfig
from deid_router.forward.base import build_destination
from deid_router.forward.folder import FolderDestination
from deid_router.jobs.outcome import OutcomeKind
from tests.integration.forward.forward_fixtures import bundled, copies


def _folder(path: Path) -> FolderDestination:
    dest = build_destination(DestinationConfig(name="outbox", type="folder", path=path), "DEID_ROUTER")
    assert isinstance(dest, FolderDestination)
    return dest


def test_layout_and_content(tmp_path: Path) -> None:
    items = copies(bundled("CT_small.dcm"), tmp_path / "in", 3)
    out = tmp_path / "outbox"
    outcomes = _folder(out).send(items)
    assert all(o.kind is OutcomeKind.DELIVERED for o in outcomes.values())
    for item in items:
        target = out / item.study_instance_uid / item.series_instance_uid / f"{item.sop_instance_uid}.dcm"
        assert target.read_bytes() == item.path.read_bytes()
    # No temp file is left anywhere.
    assert sorted(p.name for p in out.rglob("*") if p.is_file()) == sorted(f"{i.sop_instance_uid}.dcm" for i in items)


def test_resend_replaces_identically(tmp_path: Path) -> None:
    items = copies(bundled("CT_small.dcm"), tmp_path / "in", 1)
    dest = _folder(tmp_path / "outbox")
    dest.send(items)
    assert dest.send(items)[1].kind is OutcomeKind.DELIVERED
    assert len([p for p in (tmp_path / "outbox").rglob("*") if p.is_file()]) == 1


@pytest.mark.parametrize(
    "bad",
    ["../../etc", "1.2.3/4", "", "1." * 40 + "1", "1.2.abc", "1..2", "/abs"],
)
def test_invalid_uid_is_permanent_and_writes_nothing(tmp_path: Path, bad: str) -> None:
    item = copies(bundled("CT_small.dcm"), tmp_path / "in", 1)[0]
    out = tmp_path / "outbox"
    for field in ("study_instance_uid", "series_instance_uid", "sop_instance_uid"):
        outcome = _folder(out).send([dataclasses.replace(item, **{field: bad})])[1]
        assert outcome.kind is OutcomeKind.PERMANENT and outcome.reason == "invalid_uid_for_path"
    assert not out.exists() or not any(p.is_file() for p in out.rglob("*"))


def test_missing_source_is_retried_and_leaves_no_temp(tmp_path: Path) -> None:
    item = copies(bundled("CT_small.dcm"), tmp_path / "in", 1)[0]
    item.path.unlink()
    out = tmp_path / "outbox"
    outcome = _folder(out).send([item])[1]
    assert outcome.kind is OutcomeKind.RETRY and outcome.reason == "folder_write_failed:ENOENT"
    assert not any(p.is_file() for p in out.rglob("*"))


def test_os_error_is_retried_with_errno_name(tmp_path: Path) -> None:
    item = copies(bundled("CT_small.dcm"), tmp_path / "in", 1)[0]
    out = tmp_path / "outbox"
    out.mkdir()
    (out / item.study_instance_uid).write_bytes(b"")  # a file where a directory must go
    outcome = _folder(out).send([item])[1]
    assert outcome.kind is OutcomeKind.RETRY
    assert outcome.reason in ("folder_write_failed:ENOTDIR", "folder_write_failed:EEXIST")
