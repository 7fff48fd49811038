"""Lanes: a worker sends to a destination only through a lane, at most ``max_associations``
of them per destination for the whole cluster.

Every worker process de-identifies (that is what uses the cores); the association is the
scarce thing. A :class:`LeasedLane` holds a lease row (``db.lanes``) while it sends, keeps
it (and the association) while its worker goes straight on to the next batch, and lets both
go, association first, as soon as

* its worker finds no due work (``idle(due=False)``),
* another worker, on this node or another, waits for a lane (checked every
  ``poll_seconds`` while the association idles between batches),
* the association has idled ``idle_seconds``, or the lease was lost.

So a claimed, de-identified batch waits only for associations that are sending, never for
one another worker keeps open while idle. Destinations without associations (folders) use
a :class:`FreeLane`, which never waits.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Protocol

from deid_router.errors import QueueError
from deid_router.forward.base import Delivery, Destination
from deid_router.jobs.outcome import Outcome
from deid_router.observability.logging import get_logger

log = get_logger("lanes")

POLL_SECONDS = 0.01  # a waiter's look (one read) and an idle holder's look at its lane
QUEUE_RETRY_SECONDS = 1.0  # while the queue database is unreachable


class LeaseStore(Protocol):
    """What a lane needs from the queue database (``db.lanes.LaneLeases``)."""

    def acquire(self, destination: str, count: int, owner: str, lease_seconds: float) -> int | None: ...
    def wanted(self, destination: str, lane: int, owner: str) -> bool | None: ...
    def renew(self, destination: str, lane: int, owner: str, lease_seconds: float) -> bool: ...
    def release(self, destination: str, lane: int, owner: str) -> bool: ...


class Lane(Protocol):
    """A destination as a worker thread sees it: hold, send, idle, close."""

    name: str

    def hold(self, stop: threading.Event) -> bool:
        """Block until sending is allowed (True), or ``stop`` is set (False)."""
        ...

    def send(self, items: Sequence[Delivery]) -> dict[int, Outcome]: ...

    def idle(self, due: bool) -> None:
        """Sending is over for now; ``due``: the worker has more due work to go on with."""
        ...

    def close(self) -> None: ...


class FreeLane:
    """A destination whose parallelism needs no bound across workers (a folder)."""

    def __init__(self, destination: Destination) -> None:
        self.name = destination.name
        self._dest = destination

    def hold(self, stop: threading.Event) -> bool:
        return not stop.is_set()

    def send(self, items: Sequence[Delivery]) -> dict[int, Outcome]:
        return self._dest.send(items)

    def idle(self, due: bool) -> None:
        """Nothing held."""

    def close(self) -> None:
        self._dest.close()


class LeasedLane:
    """One of a worker's senders to one destination, bounded by the destination's lane leases."""

    def __init__(
        self,
        destination: Destination,
        leases: LeaseStore,
        count: int,
        owner: str,
        lease_seconds: float,
        idle_seconds: float = 5.0,
        poll_seconds: float = POLL_SECONDS,
    ) -> None:
        self.name = destination.name
        self._dest = destination
        self._leases = leases
        self._count = count
        self._owner = owner
        self._lease_seconds = lease_seconds
        self._idle_seconds = idle_seconds
        self._poll = poll_seconds
        self._lock = threading.Lock()
        self._lane: int | None = None  # the lane held, if any
        self._busy = False
        self._idle_since = 0.0
        self._renewed = 0.0
        self._closed = threading.Event()
        self._monitor: threading.Thread | None = None
        self.held_lanes: list[int] = []  # every lane taken, in order (tests, logs)
        self._db_ok = True  # log the first error of an outage only

    # -- the worker's side ------------------------------------------------------------------

    def hold(self, stop: threading.Event) -> bool:
        """Take a lane (or keep the one held); wait while every lane is sending."""
        with self._lock:
            if self._lane is not None and time.monotonic() - self._renewed >= self._lease_seconds / 2.0:
                self._renew()  # the monitor fell behind (a starved process): never send on a stale lease
            if self._lane is not None:
                self._busy = True
                return True
        waited_since = time.monotonic()
        while not stop.is_set() and not self._closed.is_set():
            try:
                lane = self._leases.acquire(self.name, self._count, self._owner, self._lease_seconds)
            except QueueError:
                self._db_trouble()
                stop.wait(QUEUE_RETRY_SECONDS)
                continue
            self._db_ok = True
            if lane is not None:
                with self._lock:
                    self._lane, self._busy = lane, True
                    self._renewed = time.monotonic()
                    self.held_lanes.append(lane)
                    self._start_monitor()
                waited = time.monotonic() - waited_since
                if waited > 1.0:
                    log.info("lane_waited", destination=self.name, lane=lane, seconds=round(waited, 1))
                return True
            stop.wait(self._poll)
        return False

    def send(self, items: Sequence[Delivery]) -> dict[int, Outcome]:
        return self._dest.send(items)

    def idle(self, due: bool) -> None:
        """Keep the lane while the worker goes on with due work, unless someone waited for it
        meanwhile; otherwise let it go now."""
        with self._lock:
            self._busy = False
            self._idle_since = time.monotonic()
            if not due:
                self._let_go("no_due_work")
            elif self._lane is not None:
                try:
                    self._check_wanted()
                except QueueError:
                    self._db_trouble()

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            self._busy = False
            self._let_go("closing")
            self._dest.close()
        if self._monitor is not None:
            self._monitor.join(timeout=5.0)

    # -- the monitor: renew while held, let an idle association go when wanted ---------------

    def _start_monitor(self) -> None:
        """Start the monitor on first use; it lives until close() (one that stopped when its lane
        was let go could miss the next hold, and a lease nobody renews expires under a sender)."""
        if self._monitor is None:
            self._monitor = threading.Thread(target=self._watch, name=f"lane-{self.name}", daemon=True)
            self._monitor.start()

    def _watch(self) -> None:
        wait = self._poll
        while not self._closed.wait(wait):
            wait = self._poll
            with self._lock:
                if self._lane is None:
                    continue
                try:
                    self._tick()
                    self._db_ok = True
                except QueueError:
                    self._db_trouble()
                    wait = QUEUE_RETRY_SECONDS

    def _db_trouble(self) -> None:
        if self._db_ok:
            log.error("lane_queue_unavailable", destination=self.name)
        self._db_ok = False

    def _tick(self) -> None:
        assert self._lane is not None
        now = time.monotonic()
        if now - self._renewed >= self._lease_seconds / 3.0:
            self._renew()
            if self._lane is None:
                return
        if self._busy:
            return
        if now - self._idle_since >= self._idle_seconds:
            self._let_go("idle")
            return
        self._check_wanted()

    def _renew(self) -> None:
        assert self._lane is not None
        started = time.monotonic()
        try:
            kept = self._leases.renew(self.name, self._lane, self._owner, self._lease_seconds)
        except QueueError:
            self._db_trouble()
            if started - self._renewed < self._lease_seconds * 0.8:
                return  # tried again at the next tick; the lease is still ours until it expires
            kept = False  # it may have expired in the database: another may take it any moment
        if kept:
            self._renewed = started
            return
        log.error("lane_lease_lost", destination=self.name, lane=self._lane)
        self._dest.close()  # waits for a send in progress; the lease is someone else's now
        self._lane = None

    def _check_wanted(self) -> None:
        assert self._lane is not None
        wanted = self._leases.wanted(self.name, self._lane, self._owner)
        if wanted is None:
            log.error("lane_lease_lost", destination=self.name, lane=self._lane)
            self._dest.close()
            self._lane = None
        elif wanted:
            self._let_go("wanted")

    def _let_go(self, why: str) -> None:
        """Close the association, then give the lease back (never two associations at once)."""
        lane, self._lane = self._lane, None
        if lane is None:
            return
        self._dest.close()
        try:
            self._leases.release(self.name, lane, self._owner)
        except QueueError:
            log.error("lane_release_failed", destination=self.name, lane=lane)  # it expires instead
        log.debug("lane_released", destination=self.name, lane=lane, reason=why)
