"""Crosswalk rows stored in batches, with SQLAlchemy Core only.

The offline tool's one use of the queue database. Importing the job repository (ORM models,
both dialects) costs more start-up than de-identifying a few files, so this module needs
neither; ``JobRepository.crosswalk_record_many`` uses the same insert. Same table and the same
idempotent insert (unique on kind + keyed token) as ``JobRepository.crosswalk_record``.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timezone

from sqlalchemy import DateTime, Engine, LargeBinary, bindparam, text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError

from deid_router.config import Config
from deid_router.db.engine import make_engine, migrate_if_behind
from deid_router.errors import QueueError

Row = tuple[str, str, str, bytes]  # kind, token, pseudonym, original encrypted

_INSERT = text(
    "INSERT INTO crosswalk (kind, token, pseudonym, scope, original_encrypted, created_at) "
    "VALUES (:kind, :token, :pseudonym, :scope, :original_encrypted, :created_at) "
    "ON CONFLICT (kind, token) DO NOTHING"
).bindparams(bindparam("original_encrypted", type_=LargeBinary()), bindparam("created_at", type_=DateTime()))


def insert_rows(conn: Connection, rows: Sequence[Row], now: datetime, scope: str = "default") -> None:
    """Insert ``rows`` of ``scope`` in the caller's transaction; rows already there are left alone."""
    if not rows:
        return
    now = now.astimezone(timezone.utc)
    if conn.dialect.name == "sqlite":
        now = now.replace(tzinfo=None)  # stored as models.UTCDateTime stores it: naive UTC
    conn.execute(_INSERT, [{"kind": k, "token": t, "pseudonym": p, "scope": scope, "original_encrypted": o,
                            "created_at": now} for k, t, p, o in rows])


class CrosswalkStore:
    """The crosswalk table alone, for the offline tool: one transaction per batch of rows."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def record_many(self, rows: Sequence[Row], scope: str = "default") -> None:
        if not rows:
            return
        try:
            with self.engine.begin() as conn:
                insert_rows(conn, rows, datetime.now(timezone.utc), scope)
        except DBAPIError as exc:
            raise QueueError("queue database error during crosswalk_record_many") from exc

    def close(self) -> None:
        self.engine.dispose()


def crosswalk_store(config: Config) -> CrosswalkStore:
    """Open the queue database named by ``config``, migrated (the table must exist)."""
    engine = make_engine(config.queue.url, busy_timeout_ms=int(config.queue.busy_timeout_seconds * 1000))
    try:
        migrate_if_behind(engine)
    except BaseException:
        engine.dispose()
        raise
    return CrosswalkStore(engine)
