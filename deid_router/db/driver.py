"""Core statements run on the driver's own cursor, for the one transaction a modality waits for.

SQLAlchemy's execution layer costs about 50 µs of Python per statement; the intake's enqueue
runs five for every instance received, before the acknowledgement, with the database write
lock held. Here the repository's Core statements are compiled once for the engine's dialect
(each parameter keeps its SQLAlchemy bind processor, so values are stored exactly as the rest
of the repository stores and reads them) and run on the DBAPI cursor of a pooled connection,
in a transaction begun and ended here. The SQL itself stays in the repository.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, cast

from sqlalchemy import Engine
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.expression import ClauseElement

from deid_router.errors import QueueError


class DriverStatement:
    """A statement compiled once: its SQL text and its parameters in the driver's form."""

    def __init__(self, statement: ClauseElement, dialect: Dialect, keys: Sequence[str] | None = None) -> None:
        # ``keys``: for an INSERT, the columns given (the others keep their defaults)
        compiled = cast(SQLCompiler, statement.compile(dialect=dialect, column_keys=list(keys) if keys else None))
        self.sql = compiled.string
        self._order = compiled.positiontup  # None for the named styles (psycopg)
        self._convert: dict[str, Callable[[Any], Any]] = {}
        for bind in compiled.binds.values():
            process = bind.type.dialect_impl(dialect).bind_processor(dialect)
            if process is not None:
                self._convert[bind.key] = process

    def args(self, values: Mapping[str, Any]) -> tuple[Any, ...] | dict[str, Any]:
        convert = self._convert
        if self._order is not None:
            return tuple(convert[k](values[k]) if k in convert else values[k] for k in self._order)
        return {k: convert[k](v) if k in convert else v for k, v in values.items()}


@contextmanager
def driver_transaction(engine: Engine, op: str) -> Iterator[Any]:
    """A write transaction on a pooled connection's DBAPI cursor, committed when the block ends.

    SQLite takes the write lock at the start (``BEGIN IMMEDIATE``, as ``db.engine`` does for
    every write); PostgreSQL's driver begins on the first statement. Driver errors leave as
    :class:`QueueError` naming ``op`` only, and a connection that failed is not pooled again.
    """
    driver_error = engine.dialect.loaded_dbapi.Error
    try:
        with engine.connect() as conn:
            raw = conn.connection.dbapi_connection
            assert raw is not None
            cursor = raw.cursor()
            try:
                if engine.dialect.name == "sqlite":
                    cursor.execute("BEGIN IMMEDIATE")
                yield cursor
                raw.commit()
            except BaseException:
                try:
                    raw.rollback()
                except driver_error:
                    conn.invalidate()
                raise
            finally:
                cursor.close()
    except (driver_error, DBAPIError) as exc:
        raise QueueError(f"queue database error during {op}") from exc
