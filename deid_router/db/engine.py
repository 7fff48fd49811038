"""Engine construction and schema migration for SQLite (embedded) and PostgreSQL (shared).

SQLite is tuned for durability first: an acknowledged instance must survive a power cut
(WAL + ``synchronous=FULL``), and every write transaction takes the write lock up front
(``BEGIN IMMEDIATE``) so that a claim is atomic and lock upgrades never deadlock.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import DBAPIError

from deid_router.errors import QueueError

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
READ_ONLY_OPTION = "deid_router_read_only"
SQLITE_BUSY_TIMEOUT_MS = 30000


def make_engine(url: str, *, busy_timeout_ms: int = SQLITE_BUSY_TIMEOUT_MS, **kwargs: Any) -> Engine:
    """Create the engine for ``url`` (``sqlite:///...`` or ``postgresql+psycopg://...``).

    ``busy_timeout_ms``: SQLite only, how long a statement waits for another writer's lock.
    """
    try:
        parsed = make_url(url)
    except Exception as exc:  # sqlalchemy.exc.ArgumentError and friends
        raise QueueError("invalid queue url (expected sqlite:///PATH or postgresql+psycopg://...)") from exc
    backend = parsed.get_backend_name()
    try:
        if backend == "sqlite":
            db = parsed.database
            if db and db != ":memory:" and not db.startswith("file:"):
                Path(db).expanduser().parent.mkdir(parents=True, exist_ok=True)
            engine = create_engine(parsed, **kwargs)
            _configure_sqlite(engine, busy_timeout_ms)
            return engine
        if backend == "postgresql":
            if parsed.drivername == "postgresql":
                parsed = parsed.set(drivername="postgresql+psycopg")
            kwargs.setdefault("pool_pre_ping", True)
            return create_engine(parsed, **kwargs)
    except (OSError, DBAPIError) as exc:
        raise QueueError(f"cannot open the {backend} queue database") from exc
    raise QueueError(f"unsupported queue database {backend!r} (use sqlite or postgresql+psycopg)")


def _configure_sqlite(engine: Engine, busy_timeout_ms: int = SQLITE_BUSY_TIMEOUT_MS) -> None:
    """The pysqlite recipe: driver autocommit off, SQLAlchemy emits BEGIN itself."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # stop pysqlite from issuing its own BEGIN
        cur = dbapi_conn.cursor()
        try:
            cur.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
            cur.execute("PRAGMA journal_mode = WAL")
            cur.execute("PRAGMA synchronous = FULL")
            cur.execute("PRAGMA foreign_keys = ON")
        finally:
            cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        # Reads may share the database; anything else takes the write lock at BEGIN.
        if conn.get_execution_options().get(READ_ONLY_OPTION):
            conn.exec_driver_sql("BEGIN")
        else:
            conn.exec_driver_sql("BEGIN IMMEDIATE")


def migrate(engine: Engine) -> None:
    """Apply every pending Alembic migration (``serve`` calls this at start).

    On PostgreSQL an advisory lock serialises nodes that start at the same time.
    """
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    try:
        with engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(7215347300214)"))
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
    except DBAPIError as exc:
        raise QueueError("migrating the queue database failed") from exc
