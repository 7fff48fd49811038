"""The crosswalk's batch insert and the secret's fingerprint, with SQLAlchemy Core only.

What the offline tool needs of the queue database: storing crosswalk rows in batches and the
secret check (``db.guard``). Importing the ORM models and the job repository costs more
start-up than de-identifying a few files, so this module needs neither; the repository's
crosswalk store (``db.crosswalk_audit``) inherits these statements rather than repeating them.
The insert is idempotent (unique on kind + keyed token), as ``crosswalk_record`` is.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timezone

from sqlalchemy import DateTime, LargeBinary, bindparam, text
from sqlalchemy.engine import Connection

from deid_router.config import Config
from deid_router.db.engine import Store, make_engine, migrate_if_behind

Row = tuple[str, str, str, bytes]  # kind, token, pseudonym, original encrypted

_INSERT = text(
    "INSERT INTO crosswalk (kind, token, pseudonym, scope, original_encrypted, created_at) "
    "VALUES (:kind, :token, :pseudonym, :scope, :original_encrypted, :created_at) "
    "ON CONFLICT (kind, token) DO NOTHING"
).bindparams(bindparam("original_encrypted", type_=LargeBinary()), bindparam("created_at", type_=DateTime()))
_FINGERPRINT = text("SELECT fingerprint FROM secret_fingerprint WHERE id = 1")
_RECORD_FINGERPRINT = text(
    "INSERT INTO secret_fingerprint (id, fingerprint, created_at) VALUES (1, :fingerprint, :created_at) "
    "ON CONFLICT (id) DO NOTHING"
).bindparams(bindparam("created_at", type_=DateTime()))
_ANY_INSTANCE = text("SELECT 1 FROM instances LIMIT 1")
_FIRST_ORIGINAL = text("SELECT original_encrypted FROM crosswalk ORDER BY id LIMIT 1")


def _stored_time(conn: Connection, now: datetime) -> datetime:
    """``now`` as models.UTCDateTime stores it: UTC, naive on SQLite (which has no time zones)."""
    now = now.astimezone(timezone.utc)
    return now.replace(tzinfo=None) if conn.dialect.name == "sqlite" else now


def insert_rows(conn: Connection, rows: Sequence[Row], now: datetime, scope: str = "default") -> None:
    """Insert ``rows`` of ``scope`` in the caller's transaction; rows already there are left alone."""
    if not rows:
        return
    now = _stored_time(conn, now)
    conn.execute(_INSERT, [{"kind": k, "token": t, "pseudonym": p, "scope": scope, "original_encrypted": o,
                            "created_at": now} for k, t, p, o in rows])


class CrosswalkRows(Store):
    """Crosswalk batches and the secret's fingerprint: one transaction per call."""

    def crosswalk_record_many(self, rows: Sequence[Row], scope: str = "default") -> None:
        """Many ``(kind, token, pseudonym, original_encrypted)`` rows of ``scope`` in one
        transaction; rows already recorded are no-ops."""
        if not rows:
            return
        with self._tx("crosswalk_record_many") as conn:
            insert_rows(conn, rows, self._clock(), scope)

    def secret_fingerprint(self) -> str | None:
        """The fingerprint of the secret this database was first started with, if recorded."""
        with self._read("secret_fingerprint") as conn:
            found = conn.execute(_FINGERPRINT).scalar()
        return None if found is None else str(found)

    def record_secret_fingerprint(self, fingerprint: str) -> str:
        """Record ``fingerprint`` unless one is recorded; return the one now recorded.

        Nodes starting together agree: the first insert wins, the others read it back.
        """
        with self._tx("record_secret_fingerprint") as conn:
            conn.execute(_RECORD_FINGERPRINT, {"fingerprint": fingerprint,
                                               "created_at": _stored_time(conn, self._clock())})
            return str(conn.execute(_FINGERPRINT).scalar_one())

    def holds_keyed_data(self) -> bool:
        """True once anything keyed by the secret is stored (an instance or a crosswalk row)."""
        with self._read("holds_keyed_data") as conn:
            return conn.execute(_ANY_INSTANCE).first() is not None or conn.execute(_FIRST_ORIGINAL).first() is not None

    def first_crosswalk_original(self) -> bytes | None:
        """The oldest crosswalk row's encrypted original (which secret wrote the data), if any."""
        with self._read("first_crosswalk_original") as conn:
            found = conn.execute(_FIRST_ORIGINAL).scalar()
        return None if found is None else bytes(found)


def crosswalk_store(config: Config) -> CrosswalkRows:
    """Open the queue database named by ``config``, migrated (the table must exist)."""
    engine = make_engine(config.queue.url, busy_timeout_ms=int(config.queue.busy_timeout_seconds * 1000))
    try:
        migrate_if_behind(engine)
    except BaseException:
        engine.dispose()
        raise
    return CrosswalkRows(engine)
