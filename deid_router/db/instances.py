"""What the queue holds about received instances beyond their jobs: whether their raw
(identified) file is still held and may now go, and their delivery state for storage
commitment. A row exists only once its raw file was fsync'd and its jobs committed."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import exists, func, select, update

from deid_router.db.batches import chunks
from deid_router.db.engine import Store
from deid_router.db.models import Instance, Job, QuarantineRow
from deid_router.db.predicates import OPEN_ENTRY, RAW_HELD
from deid_router.jobs.states import JobState

__all__ = ["CommitState", "InstanceRecords"]


@dataclass(frozen=True)
class CommitState:
    """What the queue knows of one SOP instance, for storage commitment."""

    sop_class_uid: str
    delivered: bool  # every job of it is done
    failed: bool  # some job of it failed (quarantined)


class InstanceRecords(Store):
    """Raw files held, purgeable and deleted; commitment state."""

    def held_instances(self) -> list[tuple[str, str]]:
        """``(instance_id, raw_path)`` of every instance whose raw file is still held."""
        with self._read("held_instances") as conn:
            rows = conn.execute(
                select(Instance.id, Instance.raw_path).where(RAW_HELD).order_by(Instance.received_at, Instance.id)
            ).all()
        return [(r.id, r.raw_path) for r in rows]

    def known_raw_paths(self, raw_paths: Sequence[str]) -> set[str]:
        """Which of ``raw_paths`` belong to a committed instance (the rest are orphans of a crash)."""
        known: set[str] = set()
        with self._read("known_raw_paths") as conn:
            for chunk in chunks(raw_paths):
                known.update(
                    conn.execute(select(Instance.raw_path).where(Instance.raw_path.in_(list(chunk)))).scalars()
                )
        return known

    def purgeable_instances(self, older_than: datetime) -> list[tuple[str, str]]:
        """``(instance_id, raw_path)`` of delivered instances whose raw file may now be deleted.

        All jobs done, the last one before ``older_than``, raw still present and no open
        quarantine entry.
        """
        not_done = exists().where(Job.instance_id == Instance.id, Job.state != JobState.DONE.value)
        open_q = exists().where(QuarantineRow.instance_id == Instance.id, OPEN_ENTRY)
        last_done = select(func.max(Job.updated_at)).where(Job.instance_id == Instance.id).scalar_subquery()
        with self._read("purgeable_instances") as conn:
            rows = conn.execute(
                select(Instance.id, Instance.raw_path)
                .where(RAW_HELD, ~not_done, ~open_q, last_done < older_than)
                .order_by(Instance.received_at)
            ).all()
        return [(r.id, r.raw_path) for r in rows]

    def mark_raw_deleted(self, instance_id: str) -> None:
        """Record that the raw file of ``instance_id`` is gone (it can no longer be retried)."""
        now = self._clock()
        with self._tx("mark_raw_deleted") as conn:
            conn.execute(update(Instance).where(Instance.id == instance_id, RAW_HELD).values(raw_deleted_at=now))

    def mark_raw_path_deleted(self, raw_path: str) -> None:
        """Same as :meth:`mark_raw_deleted`, for the paths returned by ``quarantine_purge``."""
        now = self._clock()
        with self._tx("mark_raw_deleted") as conn:
            conn.execute(update(Instance).where(Instance.raw_path == raw_path, RAW_HELD).values(raw_deleted_at=now))

    def delivered_count_without_raw(self, destination: str) -> int:
        """Instances delivered to ``destination`` whose raw file is already deleted."""
        with self._read("delivered_count_without_raw") as conn:
            return int(conn.execute(
                select(func.count(func.distinct(Instance.id))).select_from(Instance)
                .join(Job, Job.instance_id == Instance.id)
                .where(Job.destination == destination, Job.state == JobState.DONE.value,
                       Instance.raw_deleted_at.is_not(None))
            ).scalar_one())

    def commitment_state(self, sop_keys: Sequence[str]) -> dict[str, CommitState]:
        """Held instances among ``sop_keys`` (keyed SOP Instance UID tokens): the SOP class,
        and whether every job of theirs is done or some failed. A row exists only once its raw
        file was fsync'd and its jobs committed: what 0x0000 promised."""
        found: dict[str, tuple[str, list[str]]] = {}
        with self._read("commitment_state") as conn:
            for chunk in chunks(list(sop_keys)):
                rows = conn.execute(
                    select(Instance.sop_key, Instance.sop_class_uid, Job.state)
                    .join(Job, Job.instance_id == Instance.id, isouter=True)
                    .where(Instance.sop_key.in_(list(chunk)))
                ).all()
                for r in rows:
                    entry = found.setdefault(r.sop_key, (r.sop_class_uid, []))
                    if r.state is not None:
                        entry[1].append(r.state)
        return {
            key: CommitState(
                sop_class_uid=cls,
                delivered=bool(states) and all(s == JobState.DONE.value for s in states),
                failed=any(s in (JobState.FAILED.value, JobState.PURGED.value) for s in states),
            )
            for key, (cls, states) in found.items()
        }
