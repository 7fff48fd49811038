"""LeasedLane on a real SQLite queue: a worker's idle association never holds up another
worker's batch, and two lanes' associations never overlap when the destination has one."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from deid_router.db.engine import make_engine, migrate
from deid_router.db.lanes import LaneLeases
from deid_router.forward.base import Delivery
from deid_router.forward.lanes import LeasedLane
from deid_router.jobs.outcome import Outcome, OutcomeKind


class CountingPacs:
    """Stands in for DicomDestination: an 'association' is open from a send until close()."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.open: set[int] = set()
        self.peak = 0
        self.opened = 0


class FakeDest:
    def __init__(self, pacs: CountingPacs, ident: int) -> None:
        self.name = "pacs"
        self.pacs = pacs
        self.ident = ident

    def send(self, items: Sequence[Delivery]) -> dict[int, Outcome]:
        with self.pacs.lock:
            if self.ident not in self.pacs.open:
                self.pacs.opened += 1
            self.pacs.open.add(self.ident)
            self.pacs.peak = max(self.pacs.peak, len(self.pacs.open))
        time.sleep(0.005)
        return {i.job_id: Outcome(OutcomeKind.DELIVERED) for i in items}

    def close(self) -> None:
        with self.pacs.lock:
            self.pacs.open.discard(self.ident)


@pytest.fixture
def leases(tmp_path: Path) -> LaneLeases:
    engine = make_engine(f"sqlite:///{tmp_path / 'queue.db'}")
    migrate(engine)
    return LaneLeases(engine)


def _lane(leases: LaneLeases, pacs: CountingPacs, ident: int, count: int = 1) -> LeasedLane:
    return LeasedLane(FakeDest(pacs, ident), leases, count, f"w{ident}", lease_seconds=30, idle_seconds=30)


def test_an_idle_holder_lets_go_as_soon_as_another_waits(leases: LaneLeases) -> None:
    pacs = CountingPacs()
    a, b = _lane(leases, pacs, 1), _lane(leases, pacs, 2)
    stop = threading.Event()
    try:
        assert a.hold(stop)
        a.send([])
        a.idle(due=True)  # a goes on de-identifying its next batch, keeping the association
        assert pacs.open == {1}
        started = time.monotonic()
        assert b.hold(stop)
        waited = time.monotonic() - started
        assert waited < 1.0, waited  # not a's idle_seconds (30)
        assert pacs.open == set()  # a closed its association before b got the lane
        b.send([])
        assert pacs.open == {2}
    finally:
        stop.set()
        a.close()
        b.close()


def test_no_due_work_lets_go_at_once_and_close_gives_the_lane_back(leases: LaneLeases) -> None:
    pacs = CountingPacs()
    a = _lane(leases, pacs, 1)
    stop = threading.Event()
    assert a.hold(stop)
    a.send([])
    a.idle(due=False)
    assert pacs.open == set() and leases.holders("pacs") == {}
    assert a.hold(stop)
    a.close()
    assert leases.holders("pacs") == {}


def test_a_waiter_gives_up_when_stopped(leases: LaneLeases) -> None:
    pacs = CountingPacs()
    a, b = _lane(leases, pacs, 1), _lane(leases, pacs, 2)
    stop = threading.Event()
    assert a.hold(stop)  # sending (busy): b must wait
    threading.Timer(0.3, stop.set).start()
    assert not b.hold(stop)
    a.close()
    b.close()


@pytest.mark.parametrize("count", [1, 2])
def test_four_busy_senders_never_overlap_beyond_the_lanes(leases: LaneLeases, count: int) -> None:
    pacs = CountingPacs()
    lanes = [_lane(leases, pacs, i, count) for i in range(4)]
    stop = threading.Event()
    sent = [0] * 4

    def worker(k: int) -> None:
        while not stop.is_set():
            time.sleep(0.01)  # "de-identifying" without the lane
            if lanes[k].hold(stop):
                lanes[k].send([])
                sent[k] += 1
                lanes[k].idle(due=True)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    time.sleep(3.0)
    stop.set()
    for t in threads:
        t.join()
    for lane in lanes:
        lane.close()
    assert pacs.peak == count
    assert all(sent), sent  # every sender got its turn
