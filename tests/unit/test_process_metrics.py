"""The latency histograms and refusal counts of ``/metrics``: observed in child processes
(prometheus_client's multiprocess mode, real spawned processes), merged in the rendering
process with its own listener's refusals, in ``/metrics`` and in the node_exporter textfile."""

from __future__ import annotations

import multiprocessing
import os
import shutil
import signal
import socket
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from pydicom.data import get_testdata_file
from pynetdicom import AE

from deid_router.app import build_context, listener_process_main
from deid_router.config import DeidConfig, DestinationConfig, load_config
from deid_router.db.engine import make_engine, migrate
from deid_router.db.repository import JobRepository, NewInstance
from deid_router.deid.engine import Deidentifier
from deid_router.deid.keys import Keys
from deid_router.forward.folder import FolderDestination
from deid_router.forward.lanes import FreeLane
from deid_router.jobs.policy import RetryPolicy
from deid_router.jobs.worker import Worker
from deid_router.observability import process_metrics
from deid_router.observability.metrics import render
from deid_router.observability.process_metrics import NO_METRICS, ProcessCollector
from deid_router.scheduler import Housekeeping
from deid_router.scp.frontdoor import Refusals
from deid_router.store.holding import Holding

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _samples(text: str) -> Samples:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def _registry(collector: ProcessCollector) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry


def _render(collector: ProcessCollector) -> Samples:
    return _samples(render(_registry(collector)).decode())


def _observe_in_child(
    directory: str, deid_seconds: Sequence[float], forward_seconds: float, reasons: Sequence[str]
) -> None:
    """A worker's or an extra listener's part, in a spawned process (exit code 3: not in
    multiprocess mode, so nothing would have been observed)."""
    observer = process_metrics.for_this_process(Path(directory), ["pacs", "archive"])
    if observer is NO_METRICS:
        sys.exit(3)
    for s in deid_seconds:
        observer.deidentified(s)
    observer.forwarded("pacs", forward_seconds)
    for reason in reasons:
        observer.refused(reason)


def _run_child(directory: Path, *args: object) -> int | None:
    proc = multiprocessing.get_context("spawn").Process(target=_observe_in_child, args=(str(directory), *args))
    proc.start()
    proc.join(60)
    process_metrics.mark_dead(directory, proc.pid)
    return proc.exitcode


@pytest.fixture
def directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(process_metrics.ENV_DIRECTORY, "")  # restored after the test: prepare_directory exports it
    d = Holding(tmp_path / "var", "host-104").process_metrics_dir
    d.mkdir(parents=True)
    (d / "counter_4242.db").write_bytes(b"from a node run before")  # wiped at node start
    process_metrics.prepare_directory(d)
    return d


def test_histograms_and_refusals_observed_in_child_processes_show_in_the_rendered_text(directory: Path) -> None:
    assert not (directory / "counter_4242.db").exists()
    assert _run_child(directory, [0.0005, 0.003, 0.2], 0.04, ["called_aet_not_recognized"]) == 0
    assert _run_child(directory, [7.0], 0.5, ["called_aet_not_recognized", "host_not_allowed"]) == 0  # a restart
    local = Refusals()  # the main process's listener
    local.count("called_aet_not_recognized", "10.0.0.9", "MOD")
    local.count("artim_timeout", "10.0.0.9")

    m = _render(ProcessCollector(directory, ["pacs", "archive"], local.snapshot))

    deid = "deid_router_deidentify_seconds"
    assert m[(f"{deid}_count", ())] == 4
    assert m[(f"{deid}_bucket", (("le", "0.001"),))] == 1
    assert m[(f"{deid}_bucket", (("le", "0.005"),))] == 2
    assert m[(f"{deid}_bucket", (("le", "0.25"),))] == 3
    assert m[(f"{deid}_bucket", (("le", "10.0"),))] == 4
    assert m[(f"{deid}_bucket", (("le", "+Inf"),))] == 4
    assert m[(f"{deid}_sum", ())] == pytest.approx(7.2035)
    pacs, archive = (("destination", "pacs"),), (("destination", "archive"),)
    assert m[("deid_router_forward_seconds_count", pacs)] == 2
    assert m[("deid_router_forward_seconds_bucket", (*pacs, ("le", "0.05")))] == 1
    assert m[("deid_router_forward_seconds_sum", pacs)] == pytest.approx(0.54)
    assert m[("deid_router_forward_seconds_count", archive)] == 0  # zeros before its first batch
    rejected = "deid_router_associations_rejected_total"
    assert m[(rejected, (("reason", "called_aet_not_recognized"),))] == 3  # two children + this process
    assert m[(rejected, (("reason", "host_not_allowed"),))] == 1
    assert m[(rejected, (("reason", "artim_timeout"),))] == 1


def test_every_family_is_there_before_any_child_observed(tmp_path: Path) -> None:
    text = render(_registry(ProcessCollector(tmp_path / "absent", ["pacs"]))).decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["deid_router_deidentify_seconds"].type == "histogram"
    assert families["deid_router_forward_seconds"].type == "histogram"
    assert families["deid_router_associations_rejected"].type == "counter"
    m = _render(ProcessCollector(tmp_path / "absent", ["pacs"]))
    assert m[("deid_router_deidentify_seconds_count", ())] == 0
    assert m[("deid_router_forward_seconds_bucket", (("destination", "pacs"), ("le", "+Inf")))] == 0
    assert not [k for k in m if k[0] == "deid_router_associations_rejected_total"]


def test_a_process_not_in_multiprocess_mode_observes_nothing(directory: Path) -> None:
    # This test process imported prometheus_client before the variable was set: counting here
    # would go into memory nobody merges, so it is refused (and logged) instead.
    assert process_metrics.for_this_process(directory) is NO_METRICS
    assert process_metrics.for_this_process(directory.parent / "other") is NO_METRICS


def test_the_textfile_and_metrics_render_the_same_new_families(tmp_path: Path, directory: Path) -> None:
    assert _run_child(directory, [0.002], 0.1, ["calling_aet_not_allowed"]) == 0
    engine = make_engine(f"sqlite:///{tmp_path / 'q.sqlite3'}")
    migrate(engine)
    holding = Holding(tmp_path / "var", "host-104")
    holding.prepare()
    children = ProcessCollector(directory, ["pacs"])
    Housekeeping(JobRepository(engine), holding, 0, RetryPolicy(1, 2, 3), ["pacs"], children=children).report()
    text = _samples(holding.metrics_path.read_text())
    assert text[("deid_router_deidentify_seconds_count", ())] == 1
    assert text[("deid_router_forward_seconds_count", (("destination", "pacs"),))] == 1
    assert text[("deid_router_associations_rejected_total", (("reason", "calling_aet_not_allowed"),))] == 1
    assert text[("deid_router_jobs", (("destination", "pacs"), ("state", "queued")))] == 0  # the queue's, as before
    engine.dispose()


class Recorder:
    """An Observer that keeps what it was told."""

    def __init__(self) -> None:
        self.deid: list[float] = []
        self.sends: list[tuple[str, float]] = []
        self.refusals: list[str] = []

    def deidentified(self, seconds: float) -> None:
        self.deid.append(seconds)

    def forwarded(self, destination: str, seconds: float) -> None:
        self.sends.append((destination, seconds))

    def refused(self, reason: str) -> None:
        self.refusals.append(reason)


def test_the_worker_times_each_instance_it_deidentifies_and_each_batch_it_sends(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'q.db'}")
    migrate(engine)
    repo = JobRepository(engine)
    holding = Holding(tmp_path / "var", "n")
    holding.prepare()
    for _ in range(3):  # the same file three times: one output, three jobs
        instance_id = holding.new_id()
        rel = holding.raw_relative(instance_id)
        holding.absolute(rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(str(get_testdata_file("CT_small.dcm")), holding.absolute(rel))
        repo.enqueue(
            NewInstance(instance_id, instance_id.ljust(64, "k"), "a" * 64, rel, 1, "1.2.840.10008.5.1.4.1.1.2",
                        "1.2.840.10008.1.2.1", "MOD", "DEID", "CT"),
            [("out", "")],
        )
    keys = Keys(bytes(range(32)))
    recorder = Recorder()
    out = FreeLane(FolderDestination(DestinationConfig(name="out", type="folder", path=tmp_path / "out")))
    worker = Worker(
        owner="w", repo=repo, holding=holding,
        deidentifier=Deidentifier(DeidConfig(secret_file=tmp_path / "s.key"), keys),
        destinations={"out": [out]}, policy=RetryPolicy(initial_seconds=1, max_seconds=2, max_attempts=3),
        lease_seconds=30, batch_size=10, metrics=recorder,
    )
    assert worker.run_once("out", out) == (3, 0.0)
    assert worker.stats.delivered == 3
    assert len(recorder.deid) == 3 and all(0 < s < 10 for s in recorder.deid)  # one per instance
    assert [d for d, _ in recorder.sends] == ["out"]  # one per batch
    engine.dispose()


def _listener_config(tmp_path: Path, port: int) -> Path:
    path = tmp_path / "router.toml"
    path.write_text(
        f"""
[listener]
port = {port}
host = "127.0.0.1"
[storage]
root = "var"
min_free_mb = 1
[deid]
secret_file = "var/secret.key"
[[destinations]]
name = "outbox"
type = "folder"
path = "var/outbox"
[[routes]]
name = "all"
destinations = ["outbox"]
""",
        encoding="utf-8",
    )
    return path


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@pytest.fixture
def extra_listener(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[int, ProcessCollector]]:
    """An extra listener process (``listener.processes`` > 1) started as the node starts one."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    config = load_config(_listener_config(tmp_path, port))
    ctx = build_context(config, run_migrations=True)
    monkeypatch.setenv(process_metrics.ENV_DIRECTORY, "")  # restored after the test
    collector = ProcessCollector(ctx.holding.process_metrics_dir, ["outbox"])
    process_metrics.prepare_directory(collector.directory)  # as Node.start: before the child
    proc = multiprocessing.get_context("spawn").Process(
        target=listener_process_main, args=(str(config.path), 1, "WARNING", os.getpid()), daemon=True
    )
    proc.start()
    try:
        deadline = time.monotonic() + 60
        while not _accepts(port):
            assert proc.is_alive() and time.monotonic() < deadline, "the listener process did not start"
            time.sleep(0.1)
        yield port, collector
    finally:
        if proc.pid is not None and proc.is_alive():
            os.kill(proc.pid, signal.SIGTERM)
        proc.join(30)
        ctx.close()


def test_an_association_refused_by_an_extra_listener_process_is_counted_by_reason(
    extra_listener: tuple[int, ProcessCollector],
) -> None:
    port, collector = extra_listener
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", port, ae_title="WRONG")
    assert assoc.is_rejected
    key = ("deid_router_associations_rejected_total", (("reason", "called_aet_not_recognized"),))
    # the listener process counts the refusal beside sending the A-ASSOCIATE-RJ: give it a moment
    deadline = time.monotonic() + 10
    while _render(collector).get(key) != 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _render(collector)[key] == 1
