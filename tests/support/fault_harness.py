"""Shared pieces of the fault-injection tests: the backend fixture, the delivery invariant,
the stray-file check and a look into the router's queue database.

The invariant, as an administrator would check it: every instance the modality saw
acknowledged is at each PACS under its de-identified SOP Instance UID (or quarantined with a
reason); nothing else is left behind (no job, no raw file without a row, no partial file).
"""

from __future__ import annotations

import os
import re
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import pydicom
import pytest
from sqlalchemy import select

from deid_router.db.engine import make_engine
from deid_router.db.models import Instance
from deid_router.db.repository import JobEvent, JobRepository
from deid_router.deid.keys import Keys
from tests.support.fake_pacs import FakePacs
from tests.support.router import RouterProcess

FAST_QUEUE: dict[str, Any] = {
    "retry_initial_seconds": 0.2,
    "retry_max_seconds": 1,
    "lease_seconds": 3,
    "poll_seconds": 0.1,
    "workers": 1,
}


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def backend(request: pytest.FixtureRequest) -> dict[str, Any]:
    """Queue settings for RouterProcess: {} (SQLite under storage.root) or a fresh PostgreSQL."""
    if request.param == "sqlite":
        return {}
    url: str = request.getfixturevalue("pg_url")
    return {"url": url}


class Pacs(Protocol):
    def sop_instance_uids(self) -> Counter[str]: ...


def uids_at(pacs: Pacs | FakePacs) -> Counter[str]:
    """How often each SOP Instance UID arrived at a StoreSCP, Orthanc or FakePacs."""
    if isinstance(pacs, FakePacs):
        return Counter(uid for uid, _ts, _t in list(pacs.received))
    return pacs.sop_instance_uids()


def sop_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID)


def expected_uids(router: RouterProcess, files: Iterable[Path]) -> set[str]:
    """The de-identified SOP Instance UIDs the PACS must hold for ``files``."""
    keys = Keys.load_or_create(router.secret_path)
    return {keys.uid(sop_uid(p)) for p in files}


def storage_root(router: RouterProcess) -> Path:
    root = Path(str(router.storage.get("root", "var")))
    return root if root.is_absolute() else router.workdir / root


def queue_url(router: RouterProcess) -> str:
    url = router.queue.get("url")
    return str(url) if url else f"sqlite:///{storage_root(router) / 'queue.sqlite3'}"


@contextmanager
def open_repo(router: RouterProcess, url: str | None = None) -> Iterator[JobRepository]:
    engine = make_engine(url or queue_url(router))
    try:
        yield JobRepository(engine)
    finally:
        engine.dispose()


def all_job_events(router: RouterProcess) -> dict[int, list[JobEvent]]:
    """Every job's history, by job id."""
    from deid_router.db.models import Job

    engine = make_engine(queue_url(router))
    try:
        with engine.connect() as conn:
            ids = list(conn.execute(select(Job.id)).scalars())
        repo = JobRepository(engine)
        return {i: repo.job_events(i) for i in ids}
    finally:
        engine.dispose()


def held_raw_paths(router: RouterProcess) -> set[str]:
    """Relative raw paths the database says are still on disk."""
    engine = make_engine(queue_url(router))
    try:
        with engine.connect() as conn:
            return set(
                conn.execute(select(Instance.raw_path).where(Instance.raw_deleted_at.is_(None))).scalars()
            )
    finally:
        engine.dispose()


def files_under(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.exists() else []


def held_raw_files(var: Path) -> list[Path]:
    """Raw files holding received bytes. A running listener also keeps a few empty files in
    raw/ ready for the next transfers (its reserve): they hold nothing and are not counted.
    A running node may purge a file between the listing and its stat: it no longer holds
    anything, so it is not counted either."""
    held = []
    for p in files_under(var / "raw"):
        try:
            if p.stat().st_size > 0:
                held.append(p)
        except FileNotFoundError:
            continue
    return held


def assert_no_stray_files(router: RouterProcess, root: Path | None = None) -> None:
    """No transfer or work leftovers, no partial file, and every raw file belongs to a row."""
    var = root or storage_root(router)
    # work/ keeps one file per worker slot (w<worker>-<lane>-<position>.dcm), written over
    # for each instance; anything else there is a leftover
    leftovers = [p for p in files_under(var / "work") if not re.fullmatch(r"w\d+-\d+-\d+\.dcm", p.name)]
    assert leftovers == [], f"files left in work/: {leftovers[:5]}"
    partial = [p for p in files_under(var) if p.name.endswith(".part") or p.name.startswith(".tmp-")]
    assert partial == [], f"partial files: {partial[:5]}"
    # The scheduler may purge delivered raw files meanwhile (unlink, then mark the row): read
    # the rows before listing the disk, and give a purge in progress a moment to finish.
    for attempt in range(5):
        known = held_raw_paths(router)
        on_disk = {p.relative_to(var).as_posix() for p in held_raw_files(var)}
        orphans = on_disk - known
        missing = held_raw_paths(router) - on_disk
        if not orphans and not missing:
            return
        time.sleep(1.0)
    assert orphans == set(), f"raw files without a queue row (orphans): {sorted(orphans)[:5]}"
    assert missing == set(), f"queue rows whose raw file is missing: {sorted(missing)[:5]}"


def assert_delivered(
    router: RouterProcess,
    at_pacs: Counter[str],
    files: Iterable[Path],
    *,
    duplicates_allowed: bool = False,
) -> set[str]:
    """Every instance of ``files`` is at the PACS once (or at least once, when allowed), and
    nothing else is; the queue is drained with nothing failed or quarantined.

    Returns the UIDs that arrived more than once.
    """
    expected = expected_uids(router, files)
    assert set(at_pacs) == expected, (
        f"missing at PACS: {len(expected - set(at_pacs))}, unexpected: {len(set(at_pacs) - expected)}"
    )
    dups = {u for u, n in at_pacs.items() if n > 1}
    if not duplicates_allowed:
        assert dups == set(), f"{len(dups)} instances delivered more than once"
    status = router.status()
    jobs = status["jobs"]
    assert jobs["done"] == len(expected), status
    assert jobs["queued"] == jobs["running"] == jobs["retrying"] == jobs["failed"] == 0, status
    assert status["quarantined"] == 0, status
    return dups


def child_pids(pid: int) -> list[int]:
    """Direct children of ``pid`` (from /proc, no psutil)."""
    out: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as fh:
                stat = fh.read()
        except OSError:
            continue
        # the command name may contain spaces or parentheses: split after the last ')'
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid:
            out.append(int(entry))
    return out


def worker_pids(router: RouterProcess) -> list[int]:
    """PIDs of the router's de-identification worker processes (not the resource tracker)."""
    assert router.proc is not None
    found = []
    for pid in child_pids(router.proc.pid):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if b"spawn_main" in cmd:
            found.append(pid)
    return found
