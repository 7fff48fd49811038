"""Operator workflow on a PACS that permanently refuses: quarantine at once with the status
code, fix the PACS, release one entry (twice: idempotent), retry the rest, and read every
step back from ``quarantine show`` and ``status --json``. And what an administrator sees when
the node cannot start (its port taken).
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.support.corpus import make_series
from tests.support.fake_pacs import FakePacs
from tests.support.fault_harness import (
    FAST_QUEUE,
    assert_delivered,
    assert_no_stray_files,
    backend,  # noqa: F401  (fixture)
    held_raw_files,
)
from tests.support.peers import storescu, storescu_acknowledged
from tests.support.router import RouterProcess, dicom_destination, wait_until

pytestmark = pytest.mark.e2e

N = 4


def _entries(router: RouterProcess) -> list[dict[str, str]]:
    out = router.cli("quarantine", "list").stdout
    return [dict(re.findall(r"(\w+)=(\S+)", line)) for line in out.splitlines() if line.startswith("id=")]


def _history(show_output: str) -> list[dict[str, str]]:
    """The event lines of ``quarantine show`` (indented), as dicts."""
    return [dict(re.findall(r"(\w+)=(\S+)", line)) for line in show_output.splitlines() if line.startswith("  ")]


def _jobs(status: dict[str, Any]) -> dict[str, int]:
    return {k: v for k, v in status["jobs"].items() if v}


def test_permanent_refusal_is_quarantined_at_once_then_released_and_retried(
    tmp_path: Path, backend: dict[str, Any]
) -> None:
    series = make_series(tmp_path / "in", N, rows=16, cols=16)
    with FakePacs(status=0xA900, ae_title="PACS") as pacs:
        router = RouterProcess(
            tmp_path / "router", [dicom_destination("pacs", pacs.port, "PACS")],
            queue={**FAST_QUEUE, "max_attempts": 10, **backend},
        )
        with router:
            assert storescu_acknowledged(storescu("127.0.0.1", router.port, [tmp_path / "in"])) == N
            wait_until(lambda: router.status()["jobs"]["failed"] == N, 90, 0.3, "jobs to fail")

            # stage 1: failed and quarantined on the first attempt (0xA900 is permanent)
            status = router.status()
            assert _jobs(status) == {"failed": N}, status
            assert status["destinations"]["pacs"]["failed"] == N
            assert status["quarantined"] == N
            entries = _entries(router)
            assert len(entries) == N
            assert all(e["destination"] == "pacs" and "0xA900" in e["reason"] for e in entries), entries
            first = entries[0]["id"]
            show = router.cli("quarantine", "show", first).stdout
            steps = _history(show)
            assert [(s.get("from_state"), s["to_state"]) for s in steps] == [
                ("None", "queued"), ("queued", "running"), ("running", "failed")
            ], show
            assert steps[-1]["status_code"] == "0xA900" and steps[-1]["attempt"] == "1", show
            refused = len(pacs.received)
            assert refused == N  # one attempt each, no retry storm against a PACS that said no

            # the PACS is fixed; release one entry, twice
            pacs.status = 0x0000
            r1 = router.cli("quarantine", "release", first).stdout
            r2 = router.cli("quarantine", "release", first).stdout
            assert "released, job re-queued" in r1, r1
            assert "already released" in r2, r2
            wait_until(lambda: router.status()["jobs"]["done"] == 1, 90, 0.3, "the released job to be delivered")
            status = router.status()
            assert _jobs(status) == {"done": 1, "failed": N - 1}, status
            assert status["quarantined"] == N - 1
            assert first not in {e["id"] for e in _entries(router)}

            # stage 3: retry every failed job; again: nothing left to do
            assert f"{N - 1} failed jobs re-queued" in router.cli("retry", "--failed").stdout
            router.wait_idle(120, expect_done=N)
            assert "0 failed jobs re-queued" in router.cli("retry", "--failed").stdout
            status = router.status()
            assert _jobs(status) == {"done": N}, status
            assert status["destinations"]["pacs"] == {**{s: 0 for s in status["jobs"]}, "done": N}
            assert status["quarantined"] == 0
            assert _entries(router) == []

            # a single-job retry of a delivered job changes nothing and says so
            again = router.cli("retry", entries[0]["job_id"]).stdout
            assert "nothing to do" in again, again

            # each step, with its status code, in the released entry's history
            steps = _history(router.cli("quarantine", "show", first).stdout)
            transitions = [(s.get("from_state"), s["to_state"], s.get("reason", ""), s.get("status_code")) for s in steps]
            assert transitions[2][3] == "0xA900"
            assert ("failed", "queued") == transitions[3][:2] and transitions[3][2] == "quarantine_release"
            assert transitions[-1][:2] == ("running", "done") and transitions[-1][3] == "0x0000", transitions
            other = entries[1]["id"]
            steps = _history(router.cli("quarantine", "show", other).stdout)
            assert any(s.get("reason") == "operator_retry" for s in steps)
            assert steps[-1]["to_state"] == "done"

            delivered = Counter(uid for uid, _ts, _t in pacs.received[refused:])
            assert_delivered(router, delivered, series)
            assert_no_stray_files(router)
            audit = router.log_text()
        assert "child_died" not in audit


def test_raw_file_deleted_from_holding_is_quarantined_at_once_with_reason(tmp_path: Path) -> None:
    # Someone cleaned the holding area by hand: the job cannot succeed, and must say why at
    # once instead of being retried max_attempts times as a work-file write failure.
    from tests.support.peers import StoreSCP
    from tests.support.router import free_port

    make_series(tmp_path / "in", 1, rows=16, cols=16)
    pacs_port = free_port()
    router = RouterProcess(
        tmp_path / "router", [dicom_destination("pacs", pacs_port, "PACS", connect_timeout_seconds=1)],
        queue={**FAST_QUEUE, "max_attempts": 10},
    )
    with router:
        assert storescu_acknowledged(storescu("127.0.0.1", router.port, [tmp_path / "in"])) == 1
        raw = held_raw_files(router.workdir / "var")
        assert len(raw) == 1
        raw[0].unlink()
        with StoreSCP(tmp_path / "pacs", ae_title="PACS", port=pacs_port) as pacs:
            wait_until(lambda: router.status()["jobs"]["failed"] == 1, 90, 0.3, "the job to fail")
            entries = _entries(router)
            assert len(entries) == 1 and entries[0]["reason"] == "raw_file_missing", entries
            steps = _history(router.cli("quarantine", "show", entries[0]["id"]).stdout)
            assert steps[-1]["to_state"] == "failed" and int(steps[-1]["attempt"]) <= 2, steps
            assert pacs.sop_instance_uids() == Counter()


def test_a_port_already_in_use_is_a_clear_error_and_leaves_no_process(tmp_path: Path) -> None:
    """Another DICOM node (or a second router by mistake) on the port: one line that says so."""
    router = RouterProcess(tmp_path / "router", [{"name": "outbox", "type": "folder", "path": "var/outbox"}])
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", router.port))
        taken.listen()
        done = subprocess.run(
            [sys.executable, "-m", "deid_router", "serve", "--config", str(router.config_path)],
            cwd=router.workdir, capture_output=True, text=True, timeout=60,
        )
    assert done.returncode == 1
    assert f"cannot listen on 127.0.0.1:{router.port}: address already in use" in done.stderr
    assert "Traceback" not in done.stderr + done.stdout
