"""Engine construction and schema migration for SQLite (embedded) and PostgreSQL (shared).

SQLite is tuned for durability first: an acknowledged instance must survive a power cut
(WAL + ``synchronous=FULL``), and every write transaction takes the write lock up front
(``BEGIN IMMEDIATE``) so that a claim is atomic and lock upgrades never deadlock.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from datetime import datetime, timezone
from functools import cache
from importlib.resources import files
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import DBAPIError

from deid_router.errors import QueueError

MIGRATIONS_PACKAGE = "deid_router.migrations"  # the top-level migrations/ folder, installed under this name
READ_ONLY_OPTION = "deid_router_read_only"
_REVISION_LINE = re.compile(r"^(down_)?revision\b[^=\n]*=\s*(.+?)\s*$", re.M)
SQLITE_BUSY_TIMEOUT_MS = 30000


def utc_now() -> datetime:
    """The current time, tz-aware UTC (the only kind of datetime the queue accepts)."""
    return datetime.now(timezone.utc)


@cache
def migrations_dir() -> Path:
    """The Alembic scripts, wherever the install put them.

    The source tree keeps them in the top-level ``migrations/`` folder; pyproject.toml installs
    that folder as the package ``deid_router.migrations`` (in a wheel as in an editable
    install), so the import system, not a path relative to this file, finds them.
    """
    try:
        where = files(MIGRATIONS_PACKAGE)
    except ModuleNotFoundError as exc:
        raise QueueError(f"the database migrations ({MIGRATIONS_PACKAGE}) are missing: reinstall deid-router") from exc
    path = Path(str(where))
    if not (path / "env.py").is_file():
        raise QueueError(f"the database migrations ({MIGRATIONS_PACKAGE}) are not a folder on disk: {path}")
    return path


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
    cfg.set_main_option("script_location", str(migrations_dir()))
    try:
        with engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(7215347300214)"))
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
    except DBAPIError as exc:
        raise QueueError("migrating the queue database failed") from exc


def _script_heads() -> set[str] | None:
    """Head revisions of the migration scripts, read from their text (None: not sure)."""
    revisions: set[str] = set()
    downs: set[str] = set()
    for script in (migrations_dir() / "versions").glob("*.py"):
        if script.name == "__init__.py":
            continue
        found = {m.group(1) or "": m.group(2) for m in _REVISION_LINE.finditer(script.read_text(encoding="utf-8"))}
        try:
            revision, down = ast.literal_eval(found[""]), ast.literal_eval(found["down_"])
        except (KeyError, ValueError, SyntaxError):
            return None
        if not isinstance(revision, str):
            return None
        revisions.add(revision)
        downs.update([down] if isinstance(down, str) else list(down or ()))
    return (revisions - downs) or None


def migrate_if_behind(engine: Engine) -> None:
    """``migrate``, skipped when the database is already at the scripts' head.

    For short commands (offline ``deidentify``): importing Alembic costs more than the whole
    de-identification of a few files. Anything unexpected falls back to ``migrate``.
    """
    heads = _script_heads()
    if heads is not None:
        try:
            with engine.connect() as conn:
                conn = conn.execution_options(**{READ_ONLY_OPTION: True})
                with conn.begin():
                    current = {str(r[0]) for r in conn.execute(text("SELECT version_num FROM alembic_version"))}
        except DBAPIError:
            current = set()  # a new database: no version table yet
        if current == heads:
            return
    migrate(engine)


@contextmanager
def write_tx(engine: Engine, op: str) -> Iterator[Connection]:
    """One write transaction; driver errors become QueueError naming ``op`` only (the one
    translation every store of the queue database uses)."""
    try:
        with engine.begin() as conn:
            yield conn
    except DBAPIError as exc:
        raise QueueError(f"queue database error during {op}") from exc


@contextmanager
def read_tx(engine: Engine, op: str) -> Iterator[Connection]:
    """A read-only transaction (plain BEGIN on SQLite: does not take the write lock)."""
    try:
        with engine.connect() as conn:
            conn = conn.execution_options(**{READ_ONLY_OPTION: True})
            with conn.begin():
                yield conn
    except DBAPIError as exc:
        raise QueueError(f"queue database error during {op}") from exc


class Store:
    """A store of the queue database: an engine, a clock, and its transactions through
    :func:`write_tx` / :func:`read_tx` (the job queue, the quarantine, the crosswalk and
    audit trail, the operator stores all start from here)."""

    def __init__(self, engine: Engine, clock: Callable[[], datetime] = utc_now) -> None:
        self._engine = engine
        self._clock = clock
        self._pg = engine.dialect.name == "postgresql"

    @property
    def engine(self) -> Engine:
        return self._engine

    def _tx(self, op: str) -> AbstractContextManager[Connection]:
        """One write transaction (:func:`write_tx`)."""
        return write_tx(self._engine, op)

    def _read(self, op: str) -> AbstractContextManager[Connection]:
        """A read-only transaction (:func:`read_tx`)."""
        return read_tx(self._engine, op)

    def _insert_ignoring(self, table: Any, values: dict[str, Any] | list[dict[str, Any]], keys: list[str]) -> Any:
        """``INSERT ... ON CONFLICT (keys) DO NOTHING`` of one row or many, in the engine's dialect."""
        from sqlalchemy.dialects import postgresql, sqlite

        dialect: Any = postgresql if self._pg else sqlite
        return dialect.insert(table).values(values).on_conflict_do_nothing(index_elements=keys)
