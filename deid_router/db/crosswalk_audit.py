"""The crosswalk and the audit trail: what ties pseudonyms to originals (encrypted), who
looked, and the fingerprint of the secret everything keyed was made with.

Recording a mapping is idempotent (unique on kind + keyed token), so concurrent first
sightings on any worker or node leave one row; the batch insert and the fingerprint live in
``db.crosswalk_rows`` (the offline tool uses them without this module).
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime

from sqlalchemy import func, insert, select

from deid_router.db.crosswalk_rows import CrosswalkRows
from deid_router.db.models import AuditEvent, Crosswalk

__all__ = ["CrosswalkAuditStore"]


class CrosswalkAuditStore(CrosswalkRows):
    """Crosswalk rows, audit records and (inherited, Core only) the batch insert and the secret's fingerprint."""

    def crosswalk_record(
        self, kind: str, token: str, pseudonym: str, original_encrypted: bytes, scope: str = "default"
    ) -> bool:
        """Insert a mapping; a concurrent or repeated first sighting is a no-op.

        Returns True when this call inserted the row. Tokens are keyed per scope, so two
        scopes never share a row.
        """
        values = {"kind": kind, "token": token, "pseudonym": pseudonym, "scope": scope,
                  "original_encrypted": original_encrypted, "created_at": self._clock()}
        stmt = self._insert_ignoring(Crosswalk, values, ["kind", "token"])
        with self._tx("crosswalk_record") as conn:
            # Explicit RETURNING: rowcount is unreliable once the dialect adds implicit RETURNING.
            return conn.execute(stmt.returning(Crosswalk.id)).first() is not None

    def crosswalk_lookup(self, pseudonym: str, scope: str = "default") -> list[tuple[str, bytes]]:
        """``(kind, original_encrypted)`` for a pseudonym of ``scope`` (callers audit the lookup)."""
        with self._read("crosswalk_lookup") as conn:
            rows = conn.execute(
                select(Crosswalk.kind, Crosswalk.original_encrypted)
                .where(Crosswalk.pseudonym == pseudonym, Crosswalk.scope == scope).order_by(Crosswalk.id)
            ).all()
        return [(r.kind, bytes(r.original_encrypted)) for r in rows]

    def crosswalk_all(self, scope: str = "default") -> Iterator[tuple[str, str, bytes]]:
        """Every ``(kind, pseudonym, original_encrypted)`` of ``scope``, in pages of 1000 (for exports)."""
        last = 0
        while True:
            with self._read("crosswalk_all") as conn:
                rows = conn.execute(
                    select(Crosswalk.id, Crosswalk.kind, Crosswalk.pseudonym, Crosswalk.original_encrypted)
                    .where(Crosswalk.id > last, Crosswalk.scope == scope).order_by(Crosswalk.id).limit(1000)
                ).all()
            if not rows:
                return
            for r in rows:
                yield (r.kind, r.pseudonym, bytes(r.original_encrypted))
            last = rows[-1].id

    def crosswalk_count(self) -> int:
        """Number of crosswalk rows."""
        with self._read("crosswalk_count") as conn:
            return int(conn.execute(select(func.count()).select_from(Crosswalk)).scalar_one())

    def audit(self, action: str, actor: str, detail: str) -> None:
        """Append an audit record (crosswalk lookups and exports, operator actions)."""
        with self._tx("audit") as conn:
            conn.execute(insert(AuditEvent).values(at=self._clock(), action=action, actor=actor, detail=detail))

    def audit_events(self) -> list[tuple[datetime, str, str, str]]:
        """All audit records, oldest first."""
        with self._read("audit_events") as conn:
            rows = conn.execute(
                select(AuditEvent.at, AuditEvent.action, AuditEvent.actor, AuditEvent.detail).order_by(AuditEvent.id)
            ).all()
        return [(r.at, r.action, r.actor, r.detail) for r in rows]
