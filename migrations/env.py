"""Alembic environment.

Programmatic use (``deid_router.db.engine.migrate``) passes an open connection in
``config.attributes["connection"]``. Command-line use (``alembic -c alembic.ini ...``) takes
the URL from ``DEID_ROUTER_QUEUE_URL`` or ``sqlalchemy.url``.
"""

from __future__ import annotations

import os

from alembic import context
from sqlalchemy.engine import Connection

from deid_router.db.models import Base

config = context.config
target_metadata = Base.metadata


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_offline() -> None:
    url = os.environ.get("DEID_ROUTER_QUEUE_URL") or config.get_main_option("sqlalchemy.url")
    context.configure(url=url, target_metadata=target_metadata, literal_binds=True,
                      render_as_batch=bool(url and url.startswith("sqlite")))
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    from deid_router.db.engine import make_engine

    url = os.environ.get("DEID_ROUTER_QUEUE_URL") or config.get_main_option("sqlalchemy.url")
    if not url:
        raise SystemExit("set DEID_ROUTER_QUEUE_URL or sqlalchemy.url in alembic.ini")
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            _run(conn)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
