"""The holding area: durable, atomic, and never addressed by a value a peer sent."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest

from deid_router.config import RouteConfig
from deid_router.errors import StorageError
from deid_router.routing import Router, RoutingFacts
from deid_router.store.holding import SPARE_AT_START, SPARE_SLOTS, WORK_KEEP_BYTES, Holding


def test_a_received_raw_file_is_written_in_place_and_committed_with_size_and_digest(tmp_path: Path) -> None:
    h = Holding(tmp_path / "hold", "node-a")
    h.prepare()
    head = b"\0" * 128 + b"DICM"
    raw = h.new_raw_file(head)
    chunks = [bytes(range(256)) * 2000, b"x" * 300_000, memoryview(b"tail")]
    for chunk in chunks:
        raw.write(chunk)
    content = head + b"".join(bytes(c) for c in chunks)
    stored = raw.commit()
    assert stored.relative_path == f"raw/{raw.instance_id[:2]}/node-a~{raw.instance_id}.dcm"
    assert h.own_raw_files() == [stored.relative_path]
    assert Holding(tmp_path / "hold", "node-b").own_raw_files() == []
    assert h.absolute(stored.relative_path).read_bytes() == content
    assert stored.size == len(content)
    assert stored.sha256 == hashlib.sha256(content).hexdigest()
    raw.discard()  # the acceptor always calls it: a committed file stays
    assert h.absolute(stored.relative_path).exists()


def test_an_uncommitted_raw_file_is_removed_by_discard_and_a_failed_write_at_once(tmp_path: Path) -> None:
    h = Holding(tmp_path, "n")
    h.prepare()
    refused = h.new_raw_file(b"\0" * 132)
    refused.discard()
    assert not refused.path.exists()
    broken = h.new_raw_file(b"\0" * 132)
    assert broken._fd is not None
    os.close(broken._fd)  # the next write fails as on a full disk (EBADF stands in for ENOSPC)
    broken._fd = os.open(os.devnull, os.O_RDONLY)
    broken.write(b"more")
    assert broken.failed and not broken.path.exists() and broken.sha256() is None
    with pytest.raises(StorageError):
        broken.commit()


def test_the_reserve_hands_out_empty_durable_files_and_removes_the_unused_ones(tmp_path: Path) -> None:
    h = Holding(tmp_path, "n")
    h.prepare()
    h.start_reserve()
    try:
        deadline = time.monotonic() + 10
        while len(h.own_raw_files()) < Holding.RESERVE_SIZE and time.monotonic() < deadline:
            time.sleep(0.01)
        reserved = set(h.own_raw_files())  # the queue, plus at most one waiting to join it
        assert Holding.RESERVE_SIZE <= len(reserved) <= Holding.RESERVE_SIZE + 1
        assert all(h.absolute(rel).stat().st_size == 0 for rel in reserved)
        raw = h.new_raw_file(b"head")
        assert raw.relative_path in reserved and raw._entry_durable
        raw.write(b"+data")
        stored = raw.commit()
        assert h.absolute(stored.relative_path).read_bytes() == b"head+data"
    finally:
        h.stop_reserve()
    assert h.own_raw_files() == [stored.relative_path]
    late = h.new_raw_file(b"inline")  # stopped: created on demand, as without a reserve
    assert late.commit().size == len(b"inline")


def test_failed_atomic_write_leaves_nothing(tmp_path: Path) -> None:
    h = Holding(tmp_path, "n")
    h.prepare()
    final = h.work_path("w0-0-7")
    with pytest.raises(RuntimeError):
        with h.atomic_writer(final) as fh:
            fh.write(b"half")
            raise RuntimeError("killed mid-write")
    assert not final.exists()
    assert list(h.work_dir.iterdir()) == []


def test_failed_work_write_leaves_nothing_and_a_crash_leftover_goes_at_start(tmp_path: Path) -> None:
    h = Holding(tmp_path, "n")
    h.prepare()
    with pytest.raises(RuntimeError):
        with h.work_writer("w0-0-7") as fh:
            fh.write(b"half")
            raise RuntimeError("deid failed mid-write")
    assert list(h.work_dir.iterdir()) == []
    # a worker killed after writing, before sending: the work file is scratch, redone from raw
    with h.work_writer("w0-0-8") as fh:
        fh.write(b"whole but never sent")
    assert h.work_path("w0-0-8").read_bytes() == b"whole but never sent"
    assert h.prepare() == 1
    assert not h.work_path("w0-0-8").exists()


def test_a_work_slot_is_one_file_holding_exactly_its_latest_instance(tmp_path: Path) -> None:
    h = Holding(tmp_path, "n")
    h.prepare()
    with h.work_writer("w1-0-0") as fh:
        fh.write(b"a longer first instance")
    inode = h.work_path("w1-0-0").stat().st_ino
    h.release_work("w1-0-0")
    with h.work_writer("w1-0-0") as fh:
        fh.write(b"second")
    assert h.work_path("w1-0-0").read_bytes() == b"second"  # nothing of the first one left
    assert h.work_path("w1-0-0").stat().st_ino == inode  # the same file: no create, no delete
    with h.work_writer("w1-0-1") as fh:
        fh.seek(WORK_KEEP_BYTES)
        fh.write(b"end of a large instance")
    h.release_work("w1-0-1")  # a large instance's file is not kept for the next one
    assert not h.work_path("w1-0-1").exists()
    with pytest.raises(StorageError):
        h.work_path("../../raw/x")


def test_a_deleted_raw_file_is_emptied_and_received_into_again(tmp_path: Path) -> None:
    h = Holding(tmp_path, "n")
    h.prepare()
    h.prepare()  # a restart tops the pool up; it does not grow it
    spares = {p.stat().st_ino: p for p in h.spare_dir.iterdir()}
    assert len(spares) == SPARE_AT_START and all(p.stat().st_size == 0 for p in spares.values())
    stored = h.new_raw_file(b"identified bytes").commit()
    inode = h.absolute(stored.relative_path).stat().st_ino
    assert inode not in spares  # no reserve running: created
    h.delete(stored.relative_path)
    h.delete(stored.relative_path)  # twice: nothing to do
    assert not h.absolute(stored.relative_path).exists()
    emptied = [p for p in h.spare_dir.iterdir() if p.stat().st_ino == inode]
    assert len(emptied) == 1 and emptied[0].read_bytes() == b""  # kept as a spare, no byte of it left
    pool = {p.stat().st_ino for p in h.spare_dir.iterdir()}
    h.start_reserve()
    try:
        deadline = time.monotonic() + 5
        while len(h.own_raw_files()) < Holding.RESERVE_SIZE and time.monotonic() < deadline:
            time.sleep(0.01)
        reserved = {h.absolute(rel).stat().st_ino for rel in h.own_raw_files()}
        assert len(reserved) >= Holding.RESERVE_SIZE and reserved <= pool  # taken, not created
    finally:
        h.stop_reserve()
    names = [p.name for p in h.spare_dir.iterdir()]  # one of SPARE_SLOTS names: the pool is bounded
    assert all(int(name, 16) < SPARE_SLOTS for name in names)


def test_deleting_without_a_spare_folder_still_deletes(tmp_path: Path) -> None:
    h = Holding(tmp_path, "n")  # as a command that is not a node sees it: never prepared
    h.raw_dir.mkdir()
    stored = h.new_raw_file(b"identified bytes").commit()
    h.delete(stored.relative_path)
    assert not h.absolute(stored.relative_path).exists() and not h.spare_dir.exists()


def test_prepare_removes_only_this_nodes_leftovers(tmp_path: Path) -> None:
    mine, other = Holding(tmp_path, "a"), Holding(tmp_path, "b")
    mine.prepare()
    other.prepare()
    (mine.work_dir / "5.dcm").write_bytes(b"partial")
    (mine.work_dir / "5.dcm.1234.part").write_bytes(b"partial")
    (other.work_dir / "6.dcm").write_bytes(b"in flight on node b")
    assert mine.prepare() == 2
    assert (other.work_dir / "6.dcm").exists()


def test_paths_never_come_from_peer_values(tmp_path: Path) -> None:
    h = Holding(tmp_path, "n")
    for hostile in ("../../etc/passwd", "1.2.3/../../x", "a\x00b", "1.2.840.10008/../"):
        with pytest.raises(StorageError):
            h.raw_relative(hostile)
    for tampered in ("../outside.dcm", "raw/../../outside.dcm", "/etc/passwd", "raw/a\0b.dcm", ".."):
        with pytest.raises(StorageError):
            h.absolute(tampered)
    assert h.absolute("raw/ab/../ab/n~x.dcm") == tmp_path / "raw/ab/n~x.dcm"


def test_routes_match_globs_and_merge_destinations() -> None:
    router = Router(
        (
            RouteConfig("ct", ("pacs", "archive"), {"modality": "CT", "calling_aet": "CT*"}),
            RouteConfig("all", ("archive",), {}),
            RouteConfig("mr", ("research",), {"modality": "MR"}),
        )
    )
    assert router.destinations_for(RoutingFacts("CT_1", "DEID", "CT", "1.2")) == ["pacs", "archive"]
    assert router.destinations_for(RoutingFacts("US_1", "DEID", "CT", "1.2")) == ["archive"]
    assert router.destinations_for(RoutingFacts("MR_1", "DEID", "MR", "1.2")) == ["archive", "research"]
    assert Router(()).destinations_for(RoutingFacts("X", "Y", "CT", "1.2")) == []


def test_metrics_textfile(tmp_path: Path) -> None:
    from deid_router.db.engine import make_engine, migrate
    from deid_router.db.repository import JobRepository
    from deid_router.jobs.policy import RetryPolicy
    from deid_router.scheduler import Housekeeping

    engine = make_engine(f"sqlite:///{tmp_path / 'q.sqlite3'}")
    migrate(engine)
    h = Holding(tmp_path, "n")
    h.prepare()
    Housekeeping(JobRepository(engine), h, 0, RetryPolicy(1, 2, 3), destinations=["pacs"]).report()
    text = h.metrics_path.read_text()
    assert 'deid_router_jobs{destination="pacs",state="queued"} 0.0' in text  # the names of /metrics
    assert "deid_router_quarantined 0.0" in text
    assert "deid_router_holding_free_bytes " in text
