"""Local faults: the holding disk fills up, the queue database goes away or stays locked.

What the modality must see: never 0x0000 for an instance that was not stored and committed
(0xA700 or a refused association instead, so it keeps the images and retries); what the
administrator must see afterwards: nothing truncated or orphaned on disk, and after the
fault is cleared a re-send delivers everything.
"""

from __future__ import annotations

import errno
import os
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import in_ci, missing
from tests.support.corpus import make_series
from tests.support.fault_harness import (
    FAST_QUEUE,
    assert_delivered,
    assert_no_stray_files,
    backend,  # noqa: F401  (fixture)
    uids_at,
)
from tests.support.peers import StoreSCP, storescu, storescu_acknowledged, storescu_failed
from tests.support.router import RouterProcess, dicom_destination, wait_until
from tests.support.tcp_proxy import proxy_for_url

pytestmark = pytest.mark.e2e

OUT_OF_RESOURCES = "Refused: OutOfResources"  # dcmtk storescu -v text for a 0xA7xx C-STORE response


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 40 MB tmpfs: a disk we can fill without hurting the machine."""
    mnt = tmp_path / "store"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if res.returncode != 0:
        reason = f"cannot mount a tmpfs (needs root): {res.stderr.strip()}"
        if in_ci():
            pytest.fail(reason, pytrace=False)
        missing(reason)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(disk: Path, leave_bytes: int = 0) -> Path:
    """Write a ballast file until only ``leave_bytes`` are free (0: until ENOSPC)."""
    ballast = disk / "ballast.bin"
    chunk = b"\0" * (1 << 20)
    with open(ballast, "wb") as fh:
        while True:
            free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
            want = free - leave_bytes
            if want <= 0:
                break
            try:
                fh.write(chunk[: min(len(chunk), want)])
                fh.flush()
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                break
    if leave_bytes == 0:  # the last pages too, however the filesystem rounds
        n = 0
        while True:
            try:
                (disk / f"ballast-{n}.bin").write_bytes(b"\0" * 512)
                n += 1
            except OSError:
                break
    return ballast


def unfill(disk: Path) -> None:
    for p in disk.glob("ballast*.bin"):
        p.unlink()


def _router(tmp_path: Path, backend: dict[str, Any], pacs: StoreSCP, **kw: Any) -> RouterProcess:
    queue = {**FAST_QUEUE, "max_attempts": 50, **backend, **kw.pop("queue", {})}
    return RouterProcess(tmp_path / "router", [dicom_destination("pacs", pacs.port, "PACS")], queue=queue, **kw)


def test_holding_disk_full_answers_a700_then_resend_delivers(
    tmp_path: Path, backend: dict[str, Any], small_disk: Path
) -> None:
    before = make_series(tmp_path / "before", 3, rows=16, cols=16)
    during = make_series(tmp_path / "during", 5, rows=16, cols=16)
    with StoreSCP(tmp_path / "pacs", ae_title="PACS") as pacs:
        router = _router(tmp_path, backend, pacs, storage={"root": str(small_disk), "min_free_mb": 0})
        with router:
            assert storescu_acknowledged(storescu("127.0.0.1", router.port, [tmp_path / "before"])) == 3
            router.wait_idle(120, expect_done=3)

            fill(small_disk)
            res = storescu("127.0.0.1", router.port, [tmp_path / "during"], timeout=120)
            out = res.stdout + res.stderr
            assert storescu_acknowledged(res) == 0, out[-3000:]  # never 0x0000 for what was not stored
            assert storescu_failed(res) == 5, out[-3000:]
            assert OUT_OF_RESOURCES in out, out[-3000:]
            assert router.proc is not None and router.proc.poll() is None, "the node must survive a full disk"
            assert_no_stray_files(router, root=small_disk)  # no truncated raw file, nothing half-received

            unfill(small_disk)
            again = storescu("127.0.0.1", router.port, [tmp_path / "during"])
            assert storescu_acknowledged(again) == 5, again.stdout[-2000:]
            router.wait_idle(120, expect_done=8)
            assert_delivered(router, uids_at(pacs), before + during)
            assert_no_stray_files(router, root=small_disk)


def test_holding_below_reserve_refuses_associations_then_accepts(
    tmp_path: Path, backend: dict[str, Any], small_disk: Path
) -> None:
    series = make_series(tmp_path / "in", 4, rows=16, cols=16)
    with StoreSCP(tmp_path / "pacs", ae_title="PACS") as pacs:
        router = _router(tmp_path, backend, pacs, storage={"root": str(small_disk), "min_free_mb": 20})
        with router:
            fill(small_disk, leave_bytes=10 * 1024 * 1024)
            res = storescu("127.0.0.1", router.port, [tmp_path / "in"], timeout=60)
            out = res.stdout + res.stderr
            assert res.returncode != 0
            assert "Association Rejected" in out, out[-2000:]
            assert storescu_acknowledged(res) == 0
            assert "association_refused_low_disk" in router.log_text()
            assert router.status()["jobs"] == {s: 0 for s in ("queued", "running", "retrying", "done", "failed")}
            assert_no_stray_files(router, root=small_disk)

            unfill(small_disk)
            again = storescu("127.0.0.1", router.port, [tmp_path / "in"])
            assert storescu_acknowledged(again) == 4, again.stdout[-2000:]
            router.wait_idle(120, expect_done=4)
            assert_delivered(router, uids_at(pacs), series)
            assert_no_stray_files(router, root=small_disk)


@pytest.mark.postgres
def test_postgres_unreachable_answers_a700_workers_back_off_then_recover(tmp_path: Path, pg_url: str) -> None:
    before = make_series(tmp_path / "before", 3, rows=16, cols=16)
    during = make_series(tmp_path / "during", 4, rows=16, cols=16)
    proxy = proxy_for_url(pg_url)
    try:
        with StoreSCP(tmp_path / "pacs", ae_title="PACS") as pacs:
            router = _router(tmp_path, {"url": proxy.url_for(pg_url)}, pacs)
            with router:
                assert storescu_acknowledged(storescu("127.0.0.1", router.port, [tmp_path / "before"])) == 3
                router.wait_idle(120, expect_done=3)

                proxy.cut()
                res = storescu("127.0.0.1", router.port, [tmp_path / "during"], timeout=120)
                out = res.stdout + res.stderr
                assert storescu_acknowledged(res) == 0, out[-3000:]
                assert storescu_failed(res) == 4, out[-3000:]
                assert OUT_OF_RESOURCES in out, out[-3000:]
                wait_until(lambda: "worker_queue_unavailable" in router.log_text(), 60, 0.2, "workers to back off")
                time.sleep(2)  # a few more worker polls against the dead database
                assert router.proc is not None and router.proc.poll() is None, "the node must survive"
                assert "child_died" not in router.log_text()

                proxy.restore()
                again = storescu("127.0.0.1", router.port, [tmp_path / "during"])
                assert storescu_acknowledged(again) == 4, again.stdout[-2000:]
                router.wait_idle(120, expect_done=7)
                assert_delivered(router, uids_at(pacs), before + during)
                assert_no_stray_files(router)  # raw files of the refused attempts were removed
    finally:
        proxy.stop()


def test_sqlite_locked_longer_than_busy_timeout_answers_a700_then_recovers(tmp_path: Path) -> None:
    series = make_series(tmp_path / "in", 4, rows=16, cols=16)
    with StoreSCP(tmp_path / "pacs", ae_title="PACS") as pacs:
        router = _router(tmp_path, {}, pacs, queue={"busy_timeout_seconds": 1})
        with router:
            db = sqlite3.connect(router.workdir / "var" / "queue.sqlite3", isolation_level=None)
            try:
                db.execute("BEGIN EXCLUSIVE")
                res = storescu("127.0.0.1", router.port, [tmp_path / "in"], timeout=120)
                assert router.proc is not None and router.proc.poll() is None, "the node must survive"
                # (an idle worker only reads, and WAL readers are not blocked: nothing to log there)
                assert "instance_enqueue_failed" in router.log_text()
            finally:
                db.execute("ROLLBACK")
                db.close()
            out = res.stdout + res.stderr
            assert storescu_acknowledged(res) == 0, out[-3000:]  # never a 0x0000 without a commit
            assert storescu_failed(res) == 4, out[-3000:]
            assert OUT_OF_RESOURCES in out, out[-3000:]
            assert_no_stray_files(router)

            again = storescu("127.0.0.1", router.port, [tmp_path / "in"])
            assert storescu_acknowledged(again) == 4
            router.wait_idle(120, expect_done=4)
            assert_delivered(router, uids_at(pacs), series)
            assert_no_stray_files(router)


def test_sqlite_lock_released_within_busy_timeout_is_waited_for(tmp_path: Path) -> None:
    series = make_series(tmp_path / "in", 2, rows=16, cols=16)
    with StoreSCP(tmp_path / "pacs", ae_title="PACS") as pacs:
        router = _router(tmp_path, {}, pacs, queue={"busy_timeout_seconds": 10})
        with router:
            db = sqlite3.connect(router.workdir / "var" / "queue.sqlite3", isolation_level=None, check_same_thread=False)
            db.execute("BEGIN EXCLUSIVE")

            def unlock() -> None:
                db.execute("ROLLBACK")
                db.close()

            timer = threading.Timer(2.0, unlock)
            timer.start()
            try:
                res = storescu("127.0.0.1", router.port, [tmp_path / "in"], timeout=120)
            finally:
                timer.join()
            assert storescu_acknowledged(res) == 2, res.stdout[-2000:]  # waited, then committed
            router.wait_idle(120, expect_done=2)
            assert_delivered(router, uids_at(pacs), series)
            assert_no_stray_files(router)


def test_metrics_temp_file_left_by_a_kill_is_removed_at_start(tmp_path: Path) -> None:
    # Found by the worker fault-point tests: a SIGKILL while the scheduler rewrote the
    # Prometheus textfile left <node>.prom.<random>.part in var/metrics for good.
    from deid_router.store.holding import Holding

    holding = Holding(tmp_path / "var", "host-11112")
    holding.metrics_path.parent.mkdir(parents=True)
    stale = holding.metrics_path.with_name(holding.metrics_path.name + ".1a2b3c4d.part")
    stale.write_bytes(b"# partial")
    other_node = holding.metrics_path.with_name("other-11112.prom.1a2b3c4d.part")
    other_node.write_bytes(b"# another node's write in progress")
    assert holding.prepare() >= 1
    assert not stale.exists()
    assert other_node.exists()  # never touch another node's files on a shared volume


@pytest.mark.postgres
def test_commit_reply_lost_instance_is_neither_lost_nor_quarantined(tmp_path: Path, pg_url: str) -> None:
    # The enqueue COMMIT reaches PostgreSQL but its reply never comes back: the jobs exist,
    # while the listener sees a database error. Deleting the raw file then (as on any queue
    # error) left a committed job without its file: quarantined as raw_file_missing, and a
    # re-send answered 0x0000 as a duplicate of it, so an acknowledged instance was lost.
    series = make_series(tmp_path / "in", 3, rows=16, cols=16)
    proxy = proxy_for_url(pg_url)
    try:
        with StoreSCP(tmp_path / "pacs", ae_title="PACS") as pacs:
            router = _router(tmp_path, {"url": proxy.url_for(pg_url)}, pacs)
            with router:
                proxy.lose_commit_reply(b"INSERT INTO instances")
                first = storescu("127.0.0.1", router.port, [tmp_path / "in"])
                assert proxy.replies_lost == 1
                if storescu_acknowledged(first) < 3:  # the modality re-sends what was refused
                    again = storescu("127.0.0.1", router.port, [tmp_path / "in"])
                    assert storescu_acknowledged(again) == 3, again.stdout[-2000:]
                router.wait_idle(120, expect_done=3)
                assert_delivered(router, uids_at(pacs), series)
                assert_no_stray_files(router)
    finally:
        proxy.stop()
