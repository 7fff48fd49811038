"""Destination faults, on SQLite and PostgreSQL: a PACS down longer than the backoff cap, a PACS
that never answers, permanent and transient association rejections. What an administrator
must see: nothing is failed or quarantined for a destination outage, the healthy destination
keeps receiving meanwhile, and everything arrives once the PACS is back.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.corpus import make_series
from tests.support.fake_pacs import FakePacs
from tests.support.fault_harness import all_job_events, backend, expected_uids, uids_at  # noqa: F401
from tests.support.peers import StoreSCP, storescu, storescu_acknowledged
from tests.support.router import RouterProcess, dicom_destination, free_port, wait_until

pytestmark = pytest.mark.e2e

N = 5


def test_pacs_down_longer_than_backoff_cap_spends_no_attempts(tmp_path: Path, backend: dict[str, Any]) -> None:
    port = free_port()
    series = make_series(tmp_path / "in", N, rows=16, cols=16)
    router = RouterProcess(
        tmp_path / "router", [dicom_destination("pacs", port, "PACS", connect_timeout_seconds=1)],
        queue={"retry_initial_seconds": 0.2, "retry_max_seconds": 1, "max_attempts": 2, **backend},
    )
    with router:
        assert storescu_acknowledged(storescu("127.0.0.1", router.port, [tmp_path / "in"])) == N
        time.sleep(8)  # many times the cap and more probes than max_attempts
        status = router.status()
        assert status["jobs"]["failed"] == 0 and status["quarantined"] == 0, status
        assert status["jobs"]["retrying"] + status["jobs"]["queued"] + status["jobs"]["running"] == N
        history = all_job_events(router)
        probes = [e for evs in history.values() for e in evs if e.from_state == "running"]
        assert len(probes) > N * 2, "the outage must be recorded in the job history"
        assert all("connection_refused" in e.reason or "connect" in e.reason for e in probes), {e.reason for e in probes}
        pacs = _fake_on(port)
        try:
            status = router.wait_idle(30, expect_done=N)
            assert status["jobs"]["failed"] == 0 and status["quarantined"] == 0
            assert uids_at(pacs) == {u: 1 for u in expected_uids(router, series)}
        finally:
            pacs.stop()


def _handlers(p: FakePacs) -> list[tuple[Any, Any]]:
    from pynetdicom import evt

    return [(evt.EVT_CONN_OPEN, p._on_conn_open), (evt.EVT_REQUESTED, p._on_requested),
            (evt.EVT_ESTABLISHED, p._on_established), (evt.EVT_C_STORE, p._on_store)]


def _fake_on(port: int, **kw: Any) -> FakePacs:
    """A FakePacs bound to a chosen port (to "fix" a PACS in place)."""
    p = FakePacs(ae_title="PACS", **kw)
    p._server = p._ae.start_server(("127.0.0.1", port), block=False, evt_handlers=_handlers(p))
    p.port = port
    return p


def _two_destinations(tmp_path: Path, bad_port: int, scp: StoreSCP, backend: dict[str, Any], **queue: Any) -> RouterProcess:
    return RouterProcess(
        tmp_path / "router",
        [dicom_destination("bad", bad_port, "PACS", dimse_timeout_seconds=2, connect_timeout_seconds=1),
         dicom_destination("good", scp.port, scp.ae_title)],
        queue={"retry_initial_seconds": 0.3, "retry_max_seconds": 2, "max_attempts": 10, **backend, **queue},
    )


def test_pacs_that_never_answers_holds_up_nothing_but_itself(
    tmp_path: Path, storescp: StoreSCP, backend: dict[str, Any]
) -> None:
    series = make_series(tmp_path / "in", N, rows=16, cols=16)
    with FakePacs(never_respond=True, ae_title="PACS") as hung:
        router = _two_destinations(tmp_path, hung.port, storescp, backend)
        with router:
            started = time.monotonic()
            assert storescu_acknowledged(storescu("127.0.0.1", router.port, [tmp_path / "in"])) == N
            expected = expected_uids(router, series)
            wait_until(lambda: set(storescp.sop_instance_uids()) == expected, 8, 0.1, "the healthy destination")
            assert time.monotonic() - started < 8
            def timed_out() -> bool:  # the worker was freed: attempts ended by the DIMSE timeout
                evs = [e for es in all_job_events(router).values() for e in es if e.from_state == "running"]
                return any("timeout" in e.reason for e in evs)

            wait_until(timed_out, 20, 0.5, "the hung destination's attempts to time out and retry")
            assert router.status()["quarantined"] == 0


@pytest.mark.parametrize("kind", ["permanent", "transient"])
def test_rejected_association_pauses_only_that_destination(
    tmp_path: Path, storescp: StoreSCP, backend: dict[str, Any], kind: str
) -> None:
    series = make_series(tmp_path / "in", N, rows=16, cols=16)
    rejecting = FakePacs(reject=(kind, 1 if kind == "permanent" else 2), ae_title="PACS").start()
    port = rejecting.port
    router = _two_destinations(tmp_path, port, storescp, backend)
    fixed: FakePacs | None = None
    try:
        with router:
            assert storescu_acknowledged(storescu("127.0.0.1", router.port, [tmp_path / "in"])) == N
            expected = expected_uids(router, series)
            wait_until(lambda: set(storescp.sop_instance_uids()) == expected, 15, 0.2, "the other destination")
            wait_until(lambda: router.status()["destinations"].get("bad", {}).get("retrying", 0) == N, 15, 0.3,
                       "the rejecting destination's jobs to wait")
            status = router.status()
            assert status["jobs"]["failed"] == 0 and status["quarantined"] == 0, status
            reasons = {e.reason for evs in all_job_events(router).values() for e in evs if e.from_state == "running"}
            assert any(f"association_rejected_{kind}" in r for r in reasons), reasons
            # the PACS administrator fixes the PACS: same port, now accepting
            rejecting.stop()
            fixed = _fake_on(port)
            status = router.wait_idle(30, expect_done=2 * N)  # retry_max_seconds=2: the slow probe comes soon
            assert status["jobs"]["failed"] == 0 and status["quarantined"] == 0
            assert uids_at(fixed) == {u: 1 for u in expected}
            assert storescp.sop_instance_uids() == {u: 1 for u in expected}
    finally:
        rejecting.stop()
        if fixed is not None:
            fixed.stop()


def test_a700_then_success_and_warnings_not_retried(tmp_path: Path, backend: dict[str, Any]) -> None:
    series = make_series(tmp_path / "in", N, rows=16, cols=16)
    with FakePacs(status=lambda n: 0xA700 if n == 0 else 0xB000, ae_title="PACS") as pacs:
        router = RouterProcess(
            tmp_path / "router", [dicom_destination("pacs", pacs.port, "PACS")],
            queue={"retry_initial_seconds": 0.2, "retry_max_seconds": 1, **backend},
        )
        with router:
            assert storescu_acknowledged(storescu("127.0.0.1", router.port, [tmp_path / "in"])) == N
            status = router.wait_idle(30, expect_done=N)
            assert status["quarantined"] == 0
            counts = uids_at(pacs)
            assert set(counts) == expected_uids(router, series)
            assert sum(counts.values()) == N + 1  # one 0xA700 re-sent once; warnings not re-sent
