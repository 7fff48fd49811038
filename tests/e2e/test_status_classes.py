"""Every class of C-STORE status, through the whole router, as the PACS administrator sees it.

A FakePacs answers a chosen status; the test counts what arrived at the PACS, reads the job
history and ``quarantine show``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from tests.support.corpus import make_series
from tests.support.fake_pacs import FakePacs
from tests.support.fault_harness import all_job_events, expected_uids, uids_at
from tests.support.peers import storescu, storescu_acknowledged
from tests.support.router import RouterProcess, dicom_destination, wait_until

pytestmark = pytest.mark.e2e

INITIAL = 0.5


def _run(tmp_path: Path, status: Any, n: int = 1, **queue: Any) -> tuple[RouterProcess, FakePacs, list[Path]]:
    series = make_series(tmp_path / "in", n, rows=16, cols=16)
    pacs = FakePacs(status=status, ae_title="PACS").start()
    router = RouterProcess(
        tmp_path / "router", [dicom_destination("pacs", pacs.port, "PACS")],
        queue={"retry_initial_seconds": INITIAL, "retry_max_seconds": 4, "max_attempts": 10, **queue},
    )
    router.start()
    assert storescu_acknowledged(storescu("127.0.0.1", router.port, [tmp_path / "in"])) == n
    return router, pacs, series


def _attempt_events(router: RouterProcess) -> list[Any]:
    (events,) = all_job_events(router).values()
    return [e for e in events if e.from_state == "running"]


def test_a700_twice_then_success_is_delivered_after_spaced_retries(tmp_path: Path) -> None:
    router, pacs, series = _run(tmp_path, lambda n: 0xA700 if n < 2 else 0x0000)
    try:
        status = router.wait_idle(30, expect_done=1)
        assert status["quarantined"] == 0
        assert uids_at(pacs)[next(iter(expected_uids(router, series)))] == 3  # two refused, one stored
        attempts = _attempt_events(router)
        assert [e.to_state for e in attempts] == ["retrying", "retrying", "done"]
        assert [e.status_code for e in attempts] == [0xA700, 0xA700, 0x0000]
        # equal jitter keeps at least half of the base delay (0.5 s, then 1 s) between tries
        times = [t for _uid, _ts, t in pacs.received]
        assert times[1] - times[0] >= INITIAL / 2
        assert times[2] - times[1] >= INITIAL * 2 / 2
    finally:
        router.stop()
        pacs.stop()


@pytest.mark.parametrize("code", [0xB000, 0xB006, 0xB007])
def test_warnings_are_delivered_after_one_attempt(tmp_path: Path, code: int) -> None:
    router, pacs, _series = _run(tmp_path, code)
    try:
        status = router.wait_idle(30, expect_done=1)
        assert status["jobs"]["retrying"] == 0 and status["quarantined"] == 0
        assert len(pacs.received) == 1
        attempts = _attempt_events(router)
        assert [(e.to_state, e.status_code) for e in attempts] == [("done", code)]
    finally:
        router.stop()
        pacs.stop()


@pytest.mark.parametrize("code", [0xA900, 0xC000, 0x0122, 0x0124, 0xA771])
def test_permanent_failures_are_quarantined_after_exactly_one_attempt(tmp_path: Path, code: int) -> None:
    router, pacs, _series = _run(tmp_path, code)
    try:
        wait_until(lambda: router.status()["quarantined"] == 1, 30, 0.3, "the quarantine")
        status = router.wait_idle(10)
        assert status["jobs"]["failed"] == 1 and status["jobs"]["done"] == 0
        assert len(pacs.received) == 1  # one attempt, no retry
        listing = router.cli("quarantine", "list").stdout
        qid = re.search(r"id=(\d+)", listing).group(1)  # type: ignore[union-attr]
        shown = router.cli("quarantine", "show", qid).stdout
        assert f"0x{code:04X}" in shown, shown
    finally:
        router.stop()
        pacs.stop()


@pytest.mark.parametrize("code", [0x0110, 0x0213])
def test_processing_failures_are_retried(tmp_path: Path, code: int) -> None:
    router, pacs, _series = _run(tmp_path, lambda n: code if n == 0 else 0x0000)
    try:
        router.wait_idle(30, expect_done=1)
        assert len(pacs.received) == 2
        assert [e.to_state for e in _attempt_events(router)] == ["retrying", "done"]
    finally:
        router.stop()
        pacs.stop()


def test_max_attempts_exhausted_is_quarantined_with_its_reason(tmp_path: Path) -> None:
    router, pacs, _series = _run(tmp_path, 0xA700, max_attempts=3, retry_initial_seconds=0.2, retry_max_seconds=0.4)
    try:
        wait_until(lambda: router.status()["quarantined"] == 1, 30, 0.3, "the quarantine")
        assert len(pacs.received) == 3
        assert router.status()["jobs"]["failed"] == 1
        assert "max_attempts_exceeded" in router.cli("quarantine", "list").stdout
    finally:
        router.stop()
        pacs.stop()
