"""Chaos: every fault at once, under load, and the history checked afterwards (see harness.py).

CI runs three minutes on SQLite (one node) and three on PostgreSQL (two nodes sharing the queue
and the holding area); ``scripts/run-tests -m slow`` runs thirty minutes of each. The table of
each run is printed and written next to the test's files (chaos-report.md).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.chaos.harness import RSS_LIMIT_MB, Chaos, Report
from tests.conftest import missing, require_tool

pytestmark = pytest.mark.e2e

MIN_FAULTS = 30
MIN_KINDS = 5


def _run(tmp_path: Path, seconds: float, seed: int, nodes: int = 1, pg_url: str | None = None) -> Report:
    require_tool("storescp")
    require_tool("storescu")
    require_tool("Orthanc")
    if os.geteuid() != 0:
        missing("the chaos run mounts a small tmpfs as the holding disk: it needs root")
    # about one instance every 0.3 s per sender over the window, a fault every 2-5 s
    chaos = Chaos(tmp_path / "chaos", seconds=seconds, seed=seed, nodes=nodes, pg_url=pg_url,
                  instances=max(200, int(seconds * 3)), fault_every=(2.0, 4.5))
    try:
        report = chaos.run()
    finally:
        chaos.close()
    table = report.table()
    print("\n" + table)
    (tmp_path / "chaos-report.md").write_text(table + "\n", encoding="utf-8")
    return report


def _assert_invariant(report: Report) -> None:
    table = report.table()
    assert report.acknowledged == report.sent, table  # senders re-send until acknowledged
    assert all(n == 0 for n in report.lost.values()), table
    assert all(n == 0 for n in report.duplicates.values()), table
    assert all(n == 0 for n in report.unexpected.values()), table
    assert all(n == report.acknowledged for n in report.delivered.values()), table
    assert report.quarantine_reasons == [], table
    assert report.crashes == 0, table
    assert report.partial_files == [], table
    assert {k: v for k, v in report.jobs.items() if v and k not in ("done",)} == {}, table
    assert report.fault_count >= MIN_FAULTS, table
    assert len([k for k, v in report.faults.items() if v]) >= MIN_KINDS, table
    assert report.peak_rss_mb < RSS_LIMIT_MB, table


@pytest.mark.timeout(1200)
def test_chaos_sqlite_one_node(tmp_path: Path) -> None:
    _assert_invariant(_run(tmp_path, seconds=180, seed=11))


@pytest.mark.postgres
@pytest.mark.timeout(1200)
def test_chaos_postgres_two_nodes(tmp_path: Path, pg_url: str) -> None:
    _assert_invariant(_run(tmp_path, seconds=180, seed=12, nodes=2, pg_url=pg_url))


@pytest.mark.slow
@pytest.mark.timeout(3 * 3600)
def test_chaos_sqlite_thirty_minutes(tmp_path: Path) -> None:
    _assert_invariant(_run(tmp_path, seconds=1800, seed=21))


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.timeout(3 * 3600)
def test_chaos_postgres_thirty_minutes(tmp_path: Path, pg_url: str) -> None:
    _assert_invariant(_run(tmp_path, seconds=1800, seed=22, nodes=2, pg_url=pg_url))

