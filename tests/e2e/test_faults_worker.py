"""The worker-side faults the one-at-a-time tests did not cover: the database gone while a
worker records what it delivered, a COMMIT whose reply is lost on the claim and on the
finish, and every listener fault point with two listener processes sharing the port.

What the administrator checks after each: every acknowledged instance is at the PACS under
its de-identified UID, each job is done, nothing is left behind, and a delivered instance
came again at most once per outage (at-least-once is the promise; a second copy per outage
is its price, a third would be a bug).
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.test_faults_crash import LISTENER_POINTS
from tests.support.corpus import make_series
from tests.support.fake_pacs import FakePacs
from tests.support.fault_harness import (
    FAST_QUEUE,
    all_job_events,
    assert_delivered,
    assert_no_stray_files,
    backend,  # noqa: F401  (fixture)
    queue_url,
    uids_at,
)
from tests.support.peers import StoreSCP, storescu, storescu_acknowledged
from tests.support.router import RouterProcess, dicom_destination, wait_until
from tests.support.tcp_proxy import TcpProxy, proxy_for_url

pytestmark = pytest.mark.e2e

N = 8


def _router(tmp_path: Path, queue: dict[str, Any], port: int, ae_title: str = "FAKEPACS", **kw: Any) -> RouterProcess:
    return RouterProcess(
        tmp_path / "router", [dicom_destination("pacs", port, ae_title)],
        queue={**FAST_QUEUE, "max_attempts": 50, "batch_size": 4, **queue}, **kw,
    )


class _OutageOnFirstStore:
    """A PACS that stores everything; on its first C-STORE it takes the database away for
    ``seconds`` (in another thread, so the response still goes back): the worker has
    delivered and must now record it with no database."""

    def __init__(self, take: Any, give: Any, seconds: float) -> None:
        self.fired = threading.Event()
        self.over = threading.Event()
        self._take, self._give, self._seconds = take, give, seconds
        self.pacs = FakePacs(status=self._answer)

    def _end(self) -> None:
        self._give()
        self.over.set()

    def _answer(self, n: int) -> int:
        if not self.fired.is_set():
            self.fired.set()
            self._take()
            threading.Timer(self._seconds, self._end).start()
        return 0x0000


@pytest.mark.postgres
def test_postgres_gone_during_finish_delivered_once_more_at_most_and_done_lands(tmp_path: Path, pg_url: str) -> None:
    series = make_series(tmp_path / "in", N, rows=16, cols=16)
    proxy = proxy_for_url(pg_url)
    outage = _OutageOnFirstStore(proxy.cut, proxy.restore, seconds=4.0)
    pacs = outage.pacs.start()
    try:
        router = _router(tmp_path, {"url": proxy.url_for(pg_url)}, pacs.port)
        with router:
            assert storescu_acknowledged(storescu("127.0.0.1", router.port, [tmp_path / "in"])) == N
            assert outage.fired.wait(60) and outage.over.wait(60)
            router.wait_idle(120, expect_done=N)
            dups = assert_delivered(router, uids_at(pacs), series, duplicates_allowed=True)
            assert max(uids_at(pacs).values()) <= 2, uids_at(pacs)  # one outage: one extra copy at most
            assert len(dups) <= 4  # only the batch that was in flight (batch_size 4)
            assert_no_stray_files(router)
            assert "child_died" not in router.log_text()
    finally:
        pacs.stop()
        proxy.stop()


def test_sqlite_locked_during_finish_delivered_once_more_at_most_and_done_lands(tmp_path: Path) -> None:
    series = make_series(tmp_path / "in", N, rows=16, cols=16)
    holder: dict[str, sqlite3.Connection] = {}
    router_box: list[RouterProcess] = []

    def take() -> None:  # another process holds SQLite's write lock: the worker's finish waits, then fails
        conn = sqlite3.connect(queue_url(router_box[0]).removeprefix("sqlite:///"), timeout=5, isolation_level=None, check_same_thread=False)
        conn.execute("BEGIN EXCLUSIVE")
        holder["conn"] = conn

    def give() -> None:
        conn = holder.pop("conn")
        conn.execute("ROLLBACK")
        conn.close()

    outage = _OutageOnFirstStore(take, give, seconds=4.0)
    pacs = outage.pacs.start()
    try:
        router = _router(tmp_path, {"busy_timeout_seconds": 0.5}, pacs.port)
        router_box.append(router)
        with router:
            assert storescu_acknowledged(storescu("127.0.0.1", router.port, [tmp_path / "in"])) == N
            assert outage.fired.wait(60) and outage.over.wait(60)
            router.wait_idle(120, expect_done=N)
            dups = assert_delivered(router, uids_at(pacs), series, duplicates_allowed=True)
            assert max(uids_at(pacs).values()) <= 2, uids_at(pacs)
            assert len(dups) <= 4
            assert_no_stray_files(router)
            assert "child_died" not in router.log_text()
    finally:
        pacs.stop()


@pytest.mark.postgres
@pytest.mark.parametrize("step,marker", [("claim", b"claimed"), ("finish", b"delivered")])
def test_commit_reply_lost_on_worker_transaction(tmp_path: Path, pg_url: str, step: str, marker: bytes) -> None:
    # The COMMIT reaches PostgreSQL, its reply never comes back: committed, while the worker
    # sees the connection fail. A lost claim reply leaves jobs running under a lease nobody
    # works on: they must come back when it expires. A lost finish reply leaves them done.
    series = make_series(tmp_path / "in", N, rows=16, cols=16)
    proxy: TcpProxy = proxy_for_url(pg_url)
    pacs = FakePacs().start()
    try:
        router = _router(tmp_path, {"url": proxy.url_for(pg_url)}, pacs.port)
        with router:
            proxy.lose_commit_reply(marker)
            assert storescu_acknowledged(storescu("127.0.0.1", router.port, [tmp_path / "in"])) == N
            wait_until(lambda: proxy.replies_lost == 1, 60, 0.1, f"the {step} COMMIT reply to be lost")
            router.wait_idle(120, expect_done=N)
            # a lost finish reply is applied already: nothing is sent again
            assert_delivered(router, uids_at(pacs), series, duplicates_allowed=step == "claim")
            assert max(uids_at(pacs).values()) == 1, uids_at(pacs)
            assert_no_stray_files(router)
            if step == "claim":  # those jobs came back through lease expiry, then were delivered
                histories = [[e.reason for e in evs] for evs in all_job_events(router).values()]
                assert any("lease_expired" in h for h in histories), histories[:3]
    finally:
        pacs.stop()
        proxy.stop()


@pytest.mark.parametrize("point", LISTENER_POINTS)
def test_listener_fault_points_with_two_listener_processes(
    tmp_path: Path, backend: dict[str, Any], point: str  # noqa: F811
) -> None:
    series = make_series(tmp_path / "in", N, rows=16, cols=16)
    with StoreSCP(tmp_path / "pacs", ae_title="PACS") as pacs:
        router = _router(tmp_path, backend, pacs.port, ae_title="PACS", listener={"processes": 2})
        router.env = {"DEID_ROUTER_FAULT": f"{point}@3"}
        router.start()
        first = storescu("127.0.0.1", router.port, [tmp_path / "in"], timeout=60)
        acked = storescu_acknowledged(first)
        assert acked == 2, first.stdout[-2000:]  # the listener process that took it died at the third
        proc = router.proc
        assert proc is not None
        # the node's own listener died (and the node with it), or a child listener did (the
        # node notices and restarts it)
        wait_until(lambda: proc.poll() is not None or "child_died" in router.log_text(), 30, 0.1,
                   "the listener that took the association to die")
        router.kill()
        router.env = {}
        router.start()
        again = storescu("127.0.0.1", router.port, [tmp_path / "in"])  # the modality re-sends all
        assert storescu_acknowledged(again) == N, again.stdout[-2000:]
        router.wait_idle(120, expect_done=N)
        assert_delivered(router, uids_at(pacs), series)
        assert_no_stray_files(router)
        router.stop()
    assert len(all_job_events(router)) == N  # never a second job for a re-sent instance
