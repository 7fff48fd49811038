"""Lane leases in the queue database: the only SQL that bounds associations per destination.

A destination has ``max_associations`` lanes (rows of ``lane_leases``); a worker sends to it
only while it holds one, so the bound holds for the node and for every node sharing a
PostgreSQL queue. A lease is taken with a conditional UPDATE of a free or expired row (on
PostgreSQL the row is picked with ``FOR UPDATE SKIP LOCKED``; on SQLite the write
transaction's ``BEGIN IMMEDIATE`` serialises takers), renewed while held and expires after
``queue.lease_seconds``, so a killed worker's lane comes free on its own.

Waiters poll: each look is a read first (on SQLite reads do not take the write lock the
listener needs for every acknowledged instance), and only a free lane is written to.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta

from sqlalchemy import Engine, and_, or_, select, update
from sqlalchemy.sql.elements import ColumnElement

from deid_router.db.engine import Store, utc_now
from deid_router.db.models import LaneLease

_L = LaneLease


class LaneLeases(Store):
    """Take, renew, give back and ask for lanes of destinations."""

    def __init__(self, engine: Engine, clock: Callable[[], datetime] = utc_now) -> None:
        super().__init__(engine, clock)
        self._made: set[tuple[str, int]] = set()

    def _free(self, destination: str, count: int, now: datetime) -> ColumnElement[bool]:
        return and_(
            _L.destination == destination,
            _L.lane < count,
            or_(_L.owner.is_(None), _L.expires_at < now),
        )

    def _ensure(self, destination: str, count: int) -> None:
        """Make the destination's lane rows once per process (idempotent across nodes)."""
        if (destination, count) in self._made:
            return
        rows = [{"destination": destination, "lane": i} for i in range(count)]
        stmt = self._insert_ignoring(LaneLease, rows, ["destination", "lane"])
        with self._tx("lane_create") as conn:
            conn.execute(stmt)
        self._made.add((destination, count))

    def acquire(self, destination: str, count: int, owner: str, lease_seconds: float, want: bool = True) -> int | None:
        """Take a free (or expired) lane of ``destination`` for ``owner``: its number, or None.

        With ``want``, a failed take also marks the held lanes as wanted (once: a mark stays
        until its holder lets the lane go), so a holder idling between batches lets go.
        """
        self._ensure(destination, count)
        now = self._clock()
        with self._read("lane_probe") as conn:
            rows = conn.execute(
                select(_L.lane, _L.owner, _L.expires_at, _L.wanted_at)
                .where(_L.destination == destination, _L.lane < count)
            ).all()
        if not any(r.owner is None or r.expires_at is None or r.expires_at < now for r in rows):
            if want and any(r.owner != owner and r.wanted_at is None for r in rows):
                self.want(destination, count, owner)
            return None
        with self._tx("lane_acquire") as conn:
            pick = (
                select(_L.lane).where(self._free(destination, count, now)).order_by(_L.lane).limit(1)
                .with_for_update(skip_locked=True)
            )
            lane = conn.execute(pick).scalar()
            if lane is None:
                return None
            taken = conn.execute(
                update(LaneLease)
                .where(_L.destination == destination, _L.lane == lane, or_(_L.owner.is_(None), _L.expires_at < now))
                .values(owner=owner, expires_at=now + timedelta(seconds=lease_seconds), wanted_at=None)
            )
            return int(lane) if taken.rowcount == 1 else None

    def want(self, destination: str, count: int, owner: str) -> int:
        """Tell the holders of ``destination``'s lanes that ``owner`` waits for one (they let an
        idle association go); returns the number of lanes newly marked."""
        held = and_(
            _L.destination == destination, _L.lane < count, _L.owner.is_not(None), _L.owner != owner,
            _L.wanted_at.is_(None),
        )
        with self._tx("lane_want") as conn:
            return int(conn.execute(update(LaneLease).where(held).values(wanted_at=self._clock())).rowcount)

    def wanted(self, destination: str, lane: int, owner: str) -> bool | None:
        """Whether someone waits for the lane ``owner`` holds; None when ``owner`` lost it."""
        now = self._clock()
        with self._read("lane_wanted") as conn:
            row = conn.execute(
                select(_L.wanted_at, _L.expires_at)
                .where(_L.destination == destination, _L.lane == lane, _L.owner == owner)
            ).first()
        if row is None or (row.expires_at is not None and row.expires_at < now):
            return None
        return row.wanted_at is not None

    def renew(self, destination: str, lane: int, owner: str, lease_seconds: float) -> bool:
        """Extend ``owner``'s lease; False when it was lost (expired and taken by another)."""
        now = self._clock()
        with self._tx("lane_renew") as conn:
            res = conn.execute(
                update(LaneLease)
                .where(_L.destination == destination, _L.lane == lane, _L.owner == owner)
                .values(expires_at=now + timedelta(seconds=lease_seconds))
            )
            return bool(res.rowcount == 1)

    def release(self, destination: str, lane: int, owner: str) -> bool:
        """Give the lane back (its association must already be closed)."""
        with self._tx("lane_release") as conn:
            res = conn.execute(
                update(LaneLease)
                .where(_L.destination == destination, _L.lane == lane, _L.owner == owner)
                .values(owner=None, expires_at=None, wanted_at=None)
            )
            return bool(res.rowcount == 1)

    def release_owned_by(self, owner_prefix: str) -> int:
        """Free every lane whose owner starts with ``owner_prefix`` (a worker process known
        dead: its lanes need not wait for their leases to expire)."""
        with self._tx("lane_release_dead") as conn:
            res = conn.execute(
                update(LaneLease)
                .where(_L.owner.startswith(owner_prefix, autoescape=True))
                .values(owner=None, expires_at=None, wanted_at=None)
            )
            return int(res.rowcount)

    def holders(self, destination: str) -> dict[int, str]:
        """Current (unexpired) holders of ``destination``'s lanes, for status and tests."""
        now = self._clock()
        with self._read("lane_holders") as conn:
            rows = conn.execute(
                select(_L.lane, _L.owner).where(_L.destination == destination, _L.owner.is_not(None), _L.expires_at >= now)
            ).all()
        return {int(r.lane): str(r.owner) for r in rows}
