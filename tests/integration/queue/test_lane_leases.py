"""Lane leases on SQLite and PostgreSQL: never more holders than lanes, a dead holder's lane
comes free when its lease expires, a waiter's mark reaches the holder."""

from __future__ import annotations

import threading
import time

from sqlalchemy import Engine

from deid_router.db.lanes import LaneLeases
from tests.integration.queue.conftest import Clock


def test_at_most_count_holders_and_release_frees(engine: Engine) -> None:
    leases = LaneLeases(engine)
    assert leases.acquire("pacs", 2, "a", 60) == 0
    assert leases.acquire("pacs", 2, "b", 60) == 1
    assert leases.acquire("pacs", 2, "c", 60) is None
    assert leases.acquire("other", 1, "c", 60) == 0  # lanes are per destination
    assert leases.holders("pacs") == {0: "a", 1: "b"}
    assert leases.release("pacs", 0, "a")
    assert not leases.release("pacs", 0, "a")  # twice: nothing left to give back
    assert leases.acquire("pacs", 2, "c", 60) == 0
    assert leases.holders("pacs") == {0: "c", 1: "b"}


def test_a_lower_max_associations_uses_fewer_lanes(engine: Engine) -> None:
    leases = LaneLeases(engine)
    assert leases.acquire("pacs", 2, "a", 60) == 0
    assert leases.acquire("pacs", 1, "b", 60) is None  # lane 1 exists but is beyond max 1


def test_expired_lease_is_taken_over_and_its_holder_learns_it(engine: Engine, clock: Clock) -> None:
    leases = LaneLeases(engine, clock)
    assert leases.acquire("pacs", 1, "dead", 10) == 0
    clock.advance(5)
    assert leases.acquire("pacs", 1, "b", 10) is None
    assert leases.renew("pacs", 0, "dead", 10)  # renewed at +5: good until +15
    clock.advance(9)
    assert leases.acquire("pacs", 1, "b", 10) is None
    clock.advance(2)  # +16: expired
    assert leases.wanted("pacs", 0, "dead") is None  # its holder would stop sending
    assert leases.acquire("pacs", 1, "b", 10) == 0
    assert not leases.renew("pacs", 0, "dead", 10)
    assert not leases.release("pacs", 0, "dead")  # a late release cannot free b's lane
    assert leases.holders("pacs") == {0: "b"}


def test_waiter_marks_the_lane_wanted_until_it_is_let_go(engine: Engine) -> None:
    leases = LaneLeases(engine)
    assert leases.acquire("pacs", 1, "a", 60) == 0
    assert leases.wanted("pacs", 0, "a") is False
    assert leases.acquire("pacs", 1, "b", 60) is None  # ...and marks it
    assert leases.wanted("pacs", 0, "a") is True
    assert leases.release("pacs", 0, "a")
    assert leases.acquire("pacs", 1, "b", 60) == 0
    assert leases.wanted("pacs", 0, "b") is False  # a new holder starts unwanted
    assert leases.acquire("pacs", 1, "b", 60) is None  # its own look does not mark its own lane
    assert leases.wanted("pacs", 0, "b") is False


def test_lanes_of_a_dead_worker_process_are_freed_by_owner_prefix(engine: Engine) -> None:
    leases = LaneLeases(engine)
    assert leases.acquire("pacs", 2, "host:123:0:ab/0", 60) == 0
    assert leases.acquire("pacs", 2, "host:1234:1:cd/0", 60) == 1
    assert leases.release_owned_by("host:123:") == 1
    assert leases.holders("pacs") == {1: "host:1234:1:cd/0"}


def test_concurrent_takers_never_exceed_the_lanes(backend_url: str, engine: Engine) -> None:
    """Threads on their own engines (as worker processes would) race for 2 lanes."""
    from deid_router.db.engine import make_engine

    lock = threading.Lock()
    holding: set[str] = set()
    peak = 0
    errors: list[BaseException] = []
    stop = time.monotonic() + 4.0
    rounds: dict[str, int] = {}

    def taker(name: str) -> None:
        nonlocal peak
        eng = make_engine(backend_url)
        leases = LaneLeases(eng)
        try:
            while time.monotonic() < stop or rounds.get(name, 0) < 3:
                lane = leases.acquire("pacs", 2, name, 30)
                if lane is None:
                    time.sleep(0.002)
                    continue
                with lock:
                    holding.add(name)
                    peak = max(peak, len(holding))
                time.sleep(0.05)  # "sending"
                with lock:
                    holding.discard(name)
                    rounds[name] = rounds.get(name, 0) + 1
                assert leases.release("pacs", lane, name)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            eng.dispose()

    threads = [threading.Thread(target=taker, args=(f"w{i}",)) for i in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert peak == 2, peak  # both lanes were used at once, never a third holder
    assert min(rounds.values()) >= 3
