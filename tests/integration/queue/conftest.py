"""Queue fixtures: every test runs on a real SQLite file and on the real PostgreSQL server.

The PostgreSQL variant creates a uniquely named database and drops it afterwards. When the
server is unreachable the test is skipped locally but FAILS when ``CI`` is set: CI must never
pass by silently skipping the shared-database backend.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, text

from deid_router.db.engine import make_engine, migrate
from deid_router.db.repository import JobRepository, NewInstance, new_instance_id

PG_ADMIN_URL = os.environ.get("DEID_ROUTER_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")


def _pg_database() -> Iterator[str]:
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"deid_q_{uuid.uuid4().hex[:12]}"
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:  # unreachable server, refused login, ...
        admin.dispose()
        msg = f"PostgreSQL at {PG_ADMIN_URL} unreachable: {type(exc).__name__}"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    try:
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def backend_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """URL of an empty database on each backend."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'db' / 'queue.db'}"
    else:
        yield from _pg_database()


@pytest.fixture
def engine(backend_url: str) -> Iterator[Engine]:
    eng = make_engine(backend_url)
    migrate(eng)
    yield eng
    eng.dispose()


class Clock:
    """A controllable clock so leases and backoff are tested without sleeping."""

    def __init__(self) -> None:
        self.now = datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def repo(engine: Engine, clock: Clock) -> JobRepository:
    return JobRepository(engine, clock=clock)


def make_instance(sop_key: str | None = None, sha: str = "a" * 64) -> NewInstance:
    iid = new_instance_id()
    return NewInstance(
        instance_id=iid, sop_key=sop_key or uuid.uuid4().hex * 2, content_sha256=sha, raw_path=f"raw/{iid}.dcm",
        size=1234, sop_class_uid="1.2.840.10008.5.1.4.1.1.2", transfer_syntax="1.2.840.10008.1.2.1",
        calling_aet="MODALITY", called_aet="DEID_ROUTER", modality="CT",
    )


@pytest.fixture
def instance_factory() -> Callable[..., NewInstance]:
    return make_instance
