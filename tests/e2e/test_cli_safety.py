"""Operator commands that never do harm (issue 13), tried as an administrator would.

The node's state is built the way ``serve`` builds it (``build_context(run_migrations=True)``:
migrations, secret check) with real DICOM raw files in the holding area and jobs moved through
the real repository and retry policy; the commands then run as the real CLI (``main``, or a
subprocess where the exit code and the absence of a traceback are the point).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest

from deid_router.app import Context, build_context
from deid_router.cli import main
from deid_router.config import load_config
from deid_router.db.engine import utc_now
from deid_router.db.repository import EnqueueResult, NewInstance, new_instance_id
from deid_router.errors import ConfigError
from deid_router.jobs.outcome import Outcome, OutcomeKind
from deid_router.jobs.policy import RetryPolicy, decide
from tests.support.corpus import make_series
from tests.support.router import free_port, render_toml

pytestmark = pytest.mark.e2e

POLICY = RetryPolicy(initial_seconds=60, max_seconds=600, max_attempts=5, jitter="none")
REFUSED = Outcome(OutcomeKind.PERMANENT, 0xA900, "refused_0xA900")
BURNED_IN = Outcome(OutcomeKind.QUARANTINE, None, "deid:burned_in_annotation")
BUSY = Outcome(OutcomeKind.RETRY, 0xA700, "out_of_resources_0xA700")
DELIVERED = Outcome(OutcomeKind.DELIVERED, 0x0000, "")


def _write_config(directory: Path, **storage: Any) -> Path:
    doc = {
        "listener": {"ae_title": "DEID_ROUTER", "host": "127.0.0.1", "port": free_port()},
        "storage": {"root": "var", "min_free_mb": 1, **storage},
        "queue": {"workers": 1},
        "deid": {"secret_file": "var/secret.key"},
        "destinations": [
            {"name": "pacs", "type": "dicom", "ae_title": "PACS", "host": "127.0.0.1", "port": free_port()},
            {"name": "outbox", "type": "folder", "path": "var/outbox"},
        ],
        "routes": [{"name": "all", "destinations": ["pacs"]}],
    }
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "router.toml"
    path.write_text(render_toml(doc), encoding="utf-8")
    return path


class Node:
    """A node's database and holding area as ``serve`` leaves them, filled by hand."""

    def __init__(self, directory: Path, **storage: Any) -> None:
        self.config_path = _write_config(directory, **storage)
        self.config = load_config(self.config_path)
        self.ctx: Context = build_context(self.config, run_migrations=True)
        self.repo = self.ctx.repo
        self.keys = self.ctx.keys
        self.root = self.config.storage.root

    def receive(self, src: Path, destinations: tuple[str, ...] = ("pacs",), sop_key: str | None = None,
                sha: str | None = None) -> EnqueueResult:
        ds = pydicom.dcmread(src, stop_before_pixels=True)
        iid = new_instance_id()
        rel = self.ctx.holding.raw_relative(iid)
        path = self.ctx.holding.absolute(rel)
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, path)
        data = path.read_bytes()
        return self.repo.enqueue(NewInstance(
            instance_id=iid, sop_key=sop_key or self.keys.token("sop_instance_uid", str(ds.SOPInstanceUID)),
            content_sha256=sha or hashlib.sha256(data).hexdigest(), raw_path=rel, size=len(data),
            sop_class_uid=str(ds.SOPClassUID), transfer_syntax=str(ds.file_meta.TransferSyntaxUID),
            calling_aet="CT_SCANNER_7", called_aet="DEID_ROUTER", modality="CT",
        ), list(destinations))

    def settle(self, job_ids: list[int], outcome: Outcome) -> None:
        """Claim every queued job and finish those in ``job_ids`` with ``outcome`` (others back)."""
        claimed = self.repo.claim("test", 60, 1000)
        for job in claimed:
            if job.job_id in job_ids:
                assert self.repo.finish(job.job_id, "test", decide(job.attempts, outcome, POLICY, utc_now()))
        self.repo.release("test")

    def raw_files(self) -> list[Path]:
        return [p for p in (self.root / "raw").rglob("*.dcm") if p.stat().st_size]

    def close(self) -> None:
        self.ctx.close()


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    n = Node(tmp_path / "node", keep_raw_hours=1000)
    yield n
    n.close()


@pytest.fixture
def series(tmp_path: Path) -> list[Path]:
    return make_series(tmp_path / "in", 6, rows=8, cols=8)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """The CLI in this process (stdin not a terminal, as in a script)."""
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def run_process(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "deid_router", *argv], capture_output=True, text=True, timeout=120,
        stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})},
    )


def states(node: Node, job_ids: list[int]) -> list[str]:
    return [s for s, _ in (node.repo.job_state(j) or ("?", 0) for j in job_ids)]


# --------------------------------------------------------------------------- 1. wrong --config


@pytest.mark.parametrize("argv", [
    ["status"], ["status", "--json"], ["quarantine", "list"], ["quarantine", "show", "1"],
    ["retry", "--failed"], ["retry", "3"], ["crosswalk", "export"], ["crosswalk", "lookup", "DEID-X"],
    ["jobs", "list"], ["quarantine", "purge", "--yes"], ["user", "list"], ["user", "remove", "bob"],
])
def test_commands_on_a_config_whose_database_does_not_exist_create_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    config = _write_config(tmp_path / "typo")
    code, out, err = run(capsys, *argv, "--config", str(config))
    assert code == 2, (out, err)
    db = tmp_path / "typo" / "var" / "queue.sqlite3"
    assert f"no queue database at {db}" in err, err
    assert sorted(p.name for p in (tmp_path / "typo").iterdir()) == ["router.toml"]  # no var/, no secret


def test_a_missing_database_is_one_clear_line_from_the_real_command(tmp_path: Path) -> None:
    config = _write_config(tmp_path / "typo")
    res = run_process("status", "--config", str(config))
    assert res.returncode == 2
    assert "no queue database at" in res.stderr and "deid-router serve" in res.stderr
    assert "Traceback" not in res.stderr + res.stdout
    assert not (tmp_path / "typo" / "var").exists()


@pytest.mark.postgres
def test_an_empty_or_absent_postgresql_database_is_reported_and_left_alone(
    tmp_path: Path, pg_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from sqlalchemy import create_engine, inspect

    config = _write_config(tmp_path / "pg")
    monkeypatch.setenv("DEID_ROUTER_QUEUE_URL", pg_url)
    code, _, err = run(capsys, "status", "--config", str(config))
    assert code == 2 and "holds no deid-router queue database" in err and pg_url.rsplit("/", 1)[1] in err, err
    engine = create_engine(pg_url)
    try:
        with engine.connect() as conn:
            assert inspect(conn).get_table_names() == []  # not migrated behind the operator's back
    finally:
        engine.dispose()
    monkeypatch.setenv("DEID_ROUTER_QUEUE_URL", pg_url + "_absent")
    code, _, err = run(capsys, "quarantine", "list", "--config", str(config))
    assert code == 1 and "cannot reach the queue database" in err and "_absent" in err, err
    assert not (tmp_path / "pg" / "var").exists()


def test_read_only_commands_change_nothing_on_an_existing_node(
    node: Node, series: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    node.receive(series[0])
    db = node.root / "queue.sqlite3"
    before = sorted(str(p.relative_to(node.root)) for p in node.root.rglob("*") if "-wal" not in p.name
                    and "-shm" not in p.name)
    mtime = db.stat().st_mtime_ns
    for argv in (["status"], ["quarantine", "list"], ["jobs", "list"], ["quarantine", "show", "99"]):
        run(capsys, *argv, "--config", str(node.config_path))
    after = sorted(str(p.relative_to(node.root)) for p in node.root.rglob("*") if "-wal" not in p.name
                   and "-shm" not in p.name)
    assert after == before
    assert db.stat().st_mtime_ns == mtime
    assert node.repo.audit_events() == []


# --------------------------------------------------------------------------- 2. the secret


def test_serve_refuses_another_secret_and_a_lost_one_and_creates_one_only_for_a_new_database(
    tmp_path: Path, series: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    n = Node(tmp_path / "node")  # a new database: the secret is created, its fingerprint stored
    secret = n.config.deid.secret_file
    assert secret.is_file() and stat.S_IMODE(secret.stat().st_mode) == 0o600
    fingerprint = n.repo.secret_fingerprint()
    assert fingerprint == n.keys.fingerprint() and secret.read_text().strip() not in fingerprint
    n.receive(series[0])
    n.close()
    original = secret.read_bytes()

    # another secret (a restored backup of the wrong node, a typo pointing at another file)
    secret.write_text(os.urandom(32).hex() + "\n")
    res = run_process("serve", "--config", str(n.config_path))
    assert res.returncode == 2, res.stderr
    assert f"{secret}: deid.secret_file: is not the secret the queue database" in res.stderr
    assert "Traceback" not in res.stderr
    code, _, err = run(capsys, "crosswalk", "export", "--config", str(n.config_path))
    assert code == 2 and "is not the secret" in err
    code, _, err = run(capsys, "check-config", "--config", str(n.config_path))
    assert code == 2 and "is not the secret" in err

    # the secret lost while the database holds data: no new key, exit 2, and check-config says so
    secret.unlink()
    res = run_process("serve", "--config", str(n.config_path))
    assert res.returncode == 2, res.stderr
    assert f"{secret}: deid.secret_file: does not exist, but the queue database" in res.stderr
    assert not secret.exists()
    code, _, err = run(capsys, "check-config", "--config", str(n.config_path))
    assert code == 2 and f"{secret}: deid.secret_file: does not exist, but the queue database" in err

    # restored from backup: starts again
    secret.write_bytes(original)
    again = build_context(load_config(n.config_path), run_migrations=True)
    assert again.keys.fingerprint() == fingerprint
    again.close()
    code, out, _ = run(capsys, "check-config", "--config", str(n.config_path))
    assert code == 0 and "ok" in out


def test_crosswalk_lookup_with_the_wrong_secret_is_a_clear_error(
    node: Node, capsys: pytest.CaptureFixture[str]
) -> None:
    from sqlalchemy import delete

    from deid_router.db.models import SecretFingerprint

    node.repo.crosswalk_record("patient", "t" * 64, "DEID-AAAA", node.keys.encrypt("\0PAT-1"))
    # a database from before fingerprints (v1): only the decryption can tell
    with node.ctx.engine.begin() as conn:
        conn.execute(delete(SecretFingerprint))
    node.config.deid.secret_file.write_text(os.urandom(32).hex() + "\n")
    res = run_process("crosswalk", "lookup", "DEID-AAAA", "--config", str(node.config_path))
    assert res.returncode == 2, res.stderr
    assert "cannot be decrypted with this secret" in res.stderr
    assert "InvalidTag" not in res.stderr and "Traceback" not in res.stderr
    assert "PAT-1" not in res.stdout + res.stderr
    # and serve does not record the wrong secret as this database's: the crosswalk tells
    with pytest.raises(ConfigError, match="is not the secret"):
        build_context(node.config, run_migrations=True)
    assert node.repo.secret_fingerprint() is None


# --------------------------------------------------------------------------- 4. retry and release


def test_bulk_retry_never_requeues_conflicts_or_burned_in_unless_named(
    node: Node, series: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = str(node.config_path)
    refused = node.receive(series[0]).job_ids + node.receive(series[1]).job_ids
    burned = node.receive(series[2]).job_ids
    node.settle(refused, REFUSED)
    node.settle(burned, BURNED_IN)
    first = node.receive(series[3])
    node.settle(first.job_ids, DELIVERED)
    conflict = node.receive(series[3], sop_key=None, sha="f" * 64).job_ids  # same UID, other content
    assert states(node, conflict) == ["failed"]

    code, out, err = run(capsys, "retry", "--failed", "--config", cfg)  # the v1 form, from a script
    assert code == 0, err
    assert "2 failed jobs re-queued" in out
    assert "2 jobs skipped" in err and "--reason" in err
    assert states(node, refused) == ["queued", "queued"]
    assert states(node, burned + conflict) == ["failed", "failed"]

    # a filter is not the v1 form: without a terminal it needs --yes
    code, out, err = run(capsys, "retry", "--failed", "--reason", "burned_in_annotation", "--config", cfg)
    assert code == 2 and "Pass --yes" in err
    assert states(node, burned) == ["failed"]
    code, out, err = run(capsys, "retry", "--failed", "--reason", "burned_in_annotation", "--yes", "--config", cfg)
    assert code == 0 and "1 failed jobs re-queued" in out
    assert states(node, burned + conflict) == ["queued", "failed"]

    # a job named by id is the operator's choice; v1 messages are kept
    code, out, _ = run(capsys, "retry", str(conflict[0]), "--config", cfg)
    assert code == 0 and f"job {conflict[0]}: re-queued" in out
    code, out, _ = run(capsys, "retry", str(first.job_ids[0]), "--config", cfg)
    assert code == 0 and "nothing to do" in out
    code, _, err = run(capsys, "retry", "424242", "--config", cfg)
    assert code == 1 and "no job 424242" in err


def test_retry_filters_by_destination_and_age_and_asks_at_a_terminal(
    node: Node, series: list[Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = str(node.config_path)
    both = node.receive(series[0], ("pacs", "outbox")).job_ids
    node.settle(both, REFUSED)
    # --older-than: nothing failed a day ago
    code, out, _ = run(capsys, "retry", "--failed", "--older-than", "1d", "--yes", "--config", cfg)
    assert code == 0 and "0 failed jobs re-queued" in out
    code, _, err = run(capsys, "retry", "--failed", "--older-than", "soon", "--config", cfg)
    assert code == 2 and "--older-than" in err
    code, _, err = run(capsys, "retry", "--failed", "--destination", "nope", "--config", cfg)
    assert code == 2 and "no destination 'nope'" in err

    # at a terminal the operator sees the list and is asked; "n" changes nothing
    monkeypatch.setattr("deid_router.cli._interactive", lambda: True)
    monkeypatch.setattr(sys, "stdin", io.StringIO("n\n"))
    code, out, err = run(capsys, "retry", "--failed", "--destination", "outbox", "--config", cfg)
    assert code == 1 and "will re-queue 1 jobs" in out and f"id={both[1]}" in out and "[y/N]" in err
    assert states(node, both) == ["failed", "failed"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n"))
    code, out, _ = run(capsys, "retry", "--failed", "--destination", "outbox", "--config", cfg)
    assert code == 0 and "1 failed jobs re-queued" in out
    assert states(node, both) == ["failed", "queued"]


def test_quarantine_release_by_filter_skips_burned_in_and_needs_yes(
    node: Node, series: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = str(node.config_path)
    refused = node.receive(series[0]).job_ids
    burned = node.receive(series[1]).job_ids
    node.settle(refused, REFUSED)
    node.settle(burned, BURNED_IN)
    code, _, err = run(capsys, "quarantine", "release", "--config", cfg)
    assert code == 2 and "--all" in err
    code, _, err = run(capsys, "quarantine", "release", "--all", "--config", cfg)
    assert code == 2 and "Pass --yes" in err
    code, out, err = run(capsys, "quarantine", "release", "--all", "--yes", "--config", cfg)
    assert code == 0 and out.count("released, job re-queued") == 1 and "1 entries skipped" in err
    assert states(node, refused + burned) == ["queued", "failed"]
    # v1: one entry by id from a script, no question; twice: idempotent
    (entry,) = node.repo.quarantine_list()
    code, out, _ = run(capsys, "quarantine", "release", str(entry.id), "--config", cfg)
    assert code == 0 and "released, job re-queued" in out
    code, out, _ = run(capsys, "quarantine", "release", str(entry.id), "--config", cfg)
    assert code == 0 and "already released" in out


# --------------------------------------------------------------------------- 5. purge


def test_purge_closes_its_jobs_deletes_raw_files_once_and_says_zero_the_second_time(
    node: Node, series: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = str(node.config_path)
    refused = [node.receive(s).job_ids[0] for s in series[:3]]
    node.settle(refused, REFUSED)
    assert len(node.raw_files()) == 3
    code, _, err = run(capsys, "quarantine", "purge", "--config", cfg)
    assert code == 2 and "Pass --yes" in err
    assert node.repo.quarantine_size() == 3 and len(node.raw_files()) == 3

    first = node.repo.quarantine_list()[0]
    code, out, _ = run(capsys, "quarantine", "purge", str(first.id), "--yes", "--config", cfg)
    assert code == 0 and "1 entries purged, 1 jobs closed; 1 raw files deleted" in out
    code, out, _ = run(capsys, "quarantine", "purge", "--yes", "--config", cfg)
    assert code == 0 and "2 entries purged, 2 jobs closed; 2 raw files deleted" in out
    code, out, _ = run(capsys, "quarantine", "purge", "--yes", "--config", cfg)
    assert code == 0 and "0 entries purged, 0 jobs closed; 0 raw files deleted" in out

    assert states(node, refused) == ["purged"] * 3
    assert node.raw_files() == []
    code, out, _ = run(capsys, "status", "--json", "--config", cfg)
    report = json.loads(out)
    assert report["jobs"]["failed"] == 0 and report["quarantined"] == 0, report
    assert "purged" not in report["jobs"]  # closed: not a queue state the v1 shape counts
    code, out, _ = run(capsys, "jobs", "list", "--state", "purged", "--config", cfg)
    assert out.count("state=purged") == 3
    steps = node.repo.job_events(refused[0])
    assert (steps[-1].from_state, steps[-1].to_state, steps[-1].reason) == ("failed", "purged", "quarantine_purge")
    code, out, _ = run(capsys, "retry", str(refused[0]), "--config", cfg)
    assert "nothing to do" in out


def test_purge_keeps_the_raw_file_another_destination_still_needs(
    node: Node, series: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    pacs, outbox = node.receive(series[0], ("pacs", "outbox")).job_ids
    node.settle([pacs, outbox], REFUSED)
    code, out, _ = run(capsys, "quarantine", "purge", "--destination", "pacs", "--yes",
                       "--config", str(node.config_path))
    assert "1 entries purged, 1 jobs closed; 0 raw files deleted" in out
    assert len(node.raw_files()) == 1  # the outbox entry can still be released
    assert states(node, [pacs, outbox]) == ["purged", "failed"]


# --------------------------------------------------------------------------- 6. resend


def test_resend_queues_delivered_instances_of_a_study_again_by_either_uid(
    node: Node, series: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = str(node.config_path)
    other = make_series(series[0].parent.parent / "other", 1, rows=8, cols=8)
    jobs = [node.receive(s).job_ids[0] for s in series[:3]] + node.receive(other[0]).job_ids
    node.settle(jobs, DELIVERED)
    study = str(pydicom.dcmread(series[0]).StudyInstanceUID)
    code, out, err = run(capsys, "resend", "--study", study, "--destination", "pacs", "--config", cfg)
    assert code == 2 and "Pass --yes" in err
    code, out, err = run(capsys, "resend", "--study", study, "--destination", "pacs", "--yes", "--config", cfg)
    assert code == 0, err
    assert "3 instances queued for pacs" in out
    assert study not in out + err  # the UID given is not echoed
    queued = node.repo.list_jobs(states=["queued"])
    assert len(queued) == 3 and {j.last_reason for j in queued} == {"operator_resend"}
    # the de-identified UID, as the PACS shows it, finds the same series; already queued: nothing new
    series_uid = node.keys.uid(str(pydicom.dcmread(series[0]).SeriesInstanceUID))
    code, out, err = run(capsys, "resend", "--series", series_uid, "--destination", "pacs", "--yes", "--config", cfg)
    assert code == 0 and "3 instances of that series are already queued for pacs: nothing to resend" in out
    assert len(node.repo.list_jobs(states=["queued"])) == 3
    code, out, err = run(capsys, "resend", "--series", "1.2.3.4", "--destination", "pacs", "--yes", "--config", cfg)
    assert code == 1 and "no held instance of that series" in err


def test_resend_after_the_raw_files_were_deleted_says_why(
    tmp_path: Path, series: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    from deid_router.scheduler import Housekeeping

    n = Node(tmp_path / "node0", keep_raw_hours=0)
    try:
        jobs = [n.receive(s).job_ids[0] for s in series[:2]]
        n.settle(jobs, DELIVERED)
        assert Housekeeping(n.repo, n.ctx.holding, 0, POLICY).purge_raw() == 2
        study = str(pydicom.dcmread(series[0]).StudyInstanceUID)
        code, _, err = run(capsys, "resend", "--study", study, "--destination", "pacs", "--config", str(n.config_path))
        assert code == 1
        assert "2 instances delivered to pacs no longer have their raw file" in err
        assert "keep_raw_hours = 0" in err
    finally:
        n.close()


# --------------------------------------------------------------------------- 7. what operators see


def test_jobs_list_quarantine_show_status_details_and_version(
    node: Node, series: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = str(node.config_path)
    refused = node.receive(series[0]).job_ids
    busy = node.receive(series[1]).job_ids
    waiting = node.receive(series[2], ("outbox",)).job_ids
    node.settle(refused, REFUSED)
    node.settle(busy, BUSY)

    code, out, _ = run(capsys, "jobs", "list", "--state", "failed", "--config", cfg)
    assert code == 0 and [int(i) for i in re.findall(r"^id=(\d+)", out, re.M)] == refused
    assert "status=0xA900" in out and "reason=refused_0xA900" in out
    code, out, _ = run(capsys, "jobs", "list", "--destination", "outbox", "--json", "--config", cfg)
    assert [j["id"] for j in json.loads(out)] == waiting
    code, out, _ = run(capsys, "jobs", "list", "--limit", "1", "--config", cfg)
    assert len(out.strip().splitlines()) == 1
    code, _, err = run(capsys, "jobs", "list", "--state", "lost", "--config", cfg)
    assert code == 2

    (entry,) = node.repo.quarantine_list()
    code, out, _ = run(capsys, "quarantine", "show", str(entry.id), "--config", cfg)
    assert code == 0
    for expected in ("modality: CT", "sop_class_uid: 1.2.840.10008.5.1.4.1.1.2", "sop_class: CT Image Storage",
                     "calling_aet: CT_SCANNER_7", "received_at: ", "detail: attempt 1", "raw_file: held",
                     "to_state=failed", "status_code=0xA900"):
        assert expected in out, (expected, out)
    ds = pydicom.dcmread(series[0])
    for value in (str(ds.PatientName), str(ds.PatientID), str(ds.SOPInstanceUID), str(ds.StudyInstanceUID)):
        assert value not in out
    code, out, _ = run(capsys, "quarantine", "show", str(entry.id), "--json", "--config", cfg)
    shown = json.loads(out)
    assert shown["calling_aet"] == "CT_SCANNER_7" and shown["events"][-1]["status_code"] == "0xA900"

    code, out, _ = run(capsys, "status", "--json", "--config", cfg)
    report = json.loads(out)
    assert set(report) >= {"jobs", "destinations", "quarantined", "destination_details"}
    pacs = report["destination_details"]["pacs"]
    assert pacs["last_error"]["status"] in ("0xA700", "0xA900") and pacs["next_retry_at"] is not None
    assert pacs["oldest_job_at"] is not None
    code, out, _ = run(capsys, "status", "--config", cfg)
    assert "oldest pending job" in out and "next retry" in out and "last error" in out

    res = run_process("--version")
    assert res.returncode == 0 and re.fullmatch(r"deid-router \d+\.\d+\.\d+\S*\n", res.stdout)


# --------------------------------------------------------------------------- 8. options after the subcommand


def test_options_are_accepted_where_the_readme_writes_them(node: Node, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = str(node.config_path)
    for argv in (["quarantine", "list", "--config", cfg], ["--config", cfg, "quarantine", "list"],
                 ["quarantine", "--config", cfg, "list"], ["status", "--json", "--config", cfg],
                 ["--config", cfg, "status", "--json"], ["jobs", "list", "--config", cfg, "--json"]):
        code, out, err = run(capsys, *argv)
        assert code == 0, (argv, err)
    res = run_process("quarantine", "list", "--config", cfg)
    assert res.returncode == 0 and "quarantine is empty" in res.stdout, res.stderr
    res = run_process("status", "--json", env={"DEID_ROUTER_CONFIG": cfg})
    assert res.returncode == 0 and json.loads(res.stdout)["quarantined"] == 0


# --------------------------------------------------------------------------- 9. identified files


def test_offline_quarantine_copies_and_crosswalk_export_are_private_and_dry_run_warns(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _write_config(tmp_path / "custodian")
    (src,) = make_series(tmp_path / "in", 1, rows=8, cols=8)
    burned = pydicom.dcmread(src)
    burned.BurnedInAnnotation = "YES"
    burned.save_as(src)
    old_umask = os.umask(0o022)
    try:
        res = run_process("deidentify", str(src), "--out", str(tmp_path / "export" / "out"), "--config", str(config))
        assert res.returncode == 1, res.stderr
        copies = list((tmp_path / "export" / "quarantine").iterdir())
        assert len(copies) == 2  # the identified copy and its reason file
        for p in copies:
            assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
        assert stat.S_IMODE((tmp_path / "export" / "quarantine").stat().st_mode) == 0o700

        n = Node(tmp_path / "custodian")
        n.repo.crosswalk_record("patient", "t" * 64, "DEID-AAAA", n.keys.encrypt("\0PAT-1"))
        n.close()
        out = tmp_path / "crosswalk.csv"
        out.write_text("old export\n")
        out.chmod(0o644)
        code, _, err = run(capsys, "crosswalk", "export", "--out", str(out), "--config", str(config))
        assert code == 0, err
        assert stat.S_IMODE(out.stat().st_mode) == 0o600 and "PAT-1" in out.read_text()
    finally:
        os.umask(old_umask)
    (plain,) = make_series(tmp_path / "plain", 1, rows=8, cols=8)
    res = run_process("deidentify", str(plain), "--out", str(tmp_path / "dry"), "--dry-run", "--config", str(config))
    assert res.returncode == 0, res.stderr
    assert "prints the original (identified) values" in res.stderr


# --------------------------------------------------------------------------- 10-11. a real node


def test_a_clean_restart_warns_of_nothing_and_systemd_hears_ready(tmp_path: Path) -> None:
    from tests.support.peers import storescu, storescu_acknowledged
    from tests.support.router import RouterProcess, wait_until

    notify = tmp_path / "notify.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(notify))
    listener.settimeout(60)
    make_series(tmp_path / "in", 3, rows=16, cols=16)
    router = RouterProcess(tmp_path / "router", [{"name": "outbox", "type": "folder", "path": "var/outbox"}],
                           env={"NOTIFY_SOCKET": str(notify)})
    try:
        with router:
            assert listener.recv(256) == b"READY=1"
            assert storescu_acknowledged(storescu("127.0.0.1", router.port, [tmp_path / "in"])) == 3
            router.wait_idle(90, expect_done=3)
        assert listener.recv(256) == b"STOPPING=1"
        router.start()
        wait_until(lambda: "node_started" in router.log_text().split("node_stopped")[-1], 30, 0.2, "second start")
        router.stop()
    finally:
        listener.close()
    log = router.log_text()
    assert log.count("node_started") == 2
    assert "partial_files_removed" not in log
    assert not list((router.workdir / "var" / "work").rglob("*.dcm"))
