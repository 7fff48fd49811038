"""Shared fixtures: real peers (dcmtk storescp, Orthanc), a fresh PostgreSQL database, the test corpus.

Missing infrastructure (a tool, the PostgreSQL server) skips a test locally but FAILS it when
the ``CI`` environment variable is set: CI must never pass by silently skipping.
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import pytest
from hypothesis import settings as hypothesis_settings

_REPO = Path(__file__).resolve().parent.parent
if str(_REPO) not in sys.path:  # so ``tests.support`` imports work however pytest is started
    sys.path.insert(0, str(_REPO))

from tests.support.corpus import pydicom_test_files  # noqa: E402
from tests.support.peers import Orthanc, StoreSCP, find_tool  # noqa: E402

PG_ADMIN_URL = os.environ.get("DEID_ROUTER_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")

# Every dcmtk tool and Orthanc started from a test inherits this (Debian's dcmtk leaves Nagle on).
os.environ.setdefault("TCP_NODELAY", "1")


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def missing(reason: str) -> NoReturn:
    """Skip locally, fail under CI (never skip silently in CI)."""
    if in_ci():
        pytest.fail(f"{reason} (CI is set: missing infrastructure is a failure, not a skip)", pytrace=False)
    pytest.skip(reason)


def require_tool(name: str) -> Path:
    """Path of a native tool (dcmtk, Orthanc, dicom3tools); skip locally / fail in CI if absent."""
    path = find_tool(name)
    if path is None:
        missing(f"{name} is not installed; run scripts/run-tests or: apt-get install -y dcmtk orthanc dicom3tools")
    return path


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[StoreSCP]:
    """A running dcmtk storescp (AE title PACS) writing into tmp_path/pacs."""
    require_tool("storescp")
    require_tool("storescu")
    scp = StoreSCP(tmp_path / "pacs", ae_title="PACS")
    try:
        yield scp
    finally:
        scp.stop()


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    """A running Orthanc (AE title ORTHANC) with its database under tmp_path/orthanc."""
    require_tool("Orthanc")
    server = Orthanc(tmp_path / "orthanc", ae_title="ORTHANC")
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def pg_url() -> Iterator[str]:
    """URL of a fresh, empty PostgreSQL database, dropped (WITH FORCE) after the test."""
    from sqlalchemy import create_engine, text

    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 5})
    name = f"deid_test_{uuid.uuid4().hex[:12]}"
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:  # unreachable server, refused login, ...
        admin.dispose()
        missing(f"PostgreSQL at {PG_ADMIN_URL} unreachable ({type(exc).__name__}); set DEID_ROUTER_TEST_PG")
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    try:
        yield url
    finally:
        try:
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        finally:
            admin.dispose()


@pytest.fixture(scope="session")
def corpus() -> dict[str, Path]:
    """File name -> path of the curated mixed pydicom corpus (see tests/support/corpus.py).

    The files are pydicom's own: copy them before modifying anything.
    """
    return pydicom_test_files()


@pytest.fixture(autouse=True)
def _reap_routers() -> Iterator[None]:
    """Kill any deid-router node a test started and did not stop (a failed assertion, say)."""
    yield
    from tests.support.router import LIVE

    for router in list(LIVE):
        router.kill()
        LIVE.discard(router)


# CI gates on a fixed set of examples (the same on every run); locally hypothesis explores.
hypothesis_settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
if os.environ.get("CI"):
    hypothesis_settings.load_profile("ci")
