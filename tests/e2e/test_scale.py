"""Scale: two nodes sharing one PostgreSQL queue, holding folder and secret; and instances far
larger than the memory a node may use.

What a PACS administrator would check: every instance arrives exactly once, de-identified,
one pseudonym per patient whatever node handled it, and a 2 GB multi-frame goes through a node
whose memory stays flat, pixel data byte for byte.
"""

from __future__ import annotations

import json
import shutil
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import pydicom
import pytest
from sqlalchemy import text

from deid_router.db.engine import make_engine
from deid_router.deid.keys import Keys
from tests.conftest import require_tool
from tests.support.bigdicom import pixel_sha256, write_big_multiframe
from tests.support.corpus import make_series
from tests.support.peers import StoreSCP, storescu, storescu_acknowledged
from tests.support.procmon import RssSampler, cmdline, nice, process_tree
from tests.support.router import RouterProcess, dicom_destination, wait_until

pytestmark = pytest.mark.e2e

PATIENTS = 20
INSTANCES = 2000
RSS_LIMIT_MB = 300.0


def _scp(tmp_path: Path, name: str = "pacs") -> StoreSCP:
    require_tool("storescp")
    require_tool("storescu")
    # --fork: one storescp child per association (several workers deliver at once)
    return StoreSCP(tmp_path / name, ae_title="PACS", extra=["--fork"])


def _log_records(router: RouterProcess) -> list[dict[str, Any]]:
    """Every JSON record of the node's log; records of different processes can share a line
    (the main process and its workers write to one stdout), so decode them one after another."""
    decoder = json.JSONDecoder()
    records = []
    for line in router.log_text().splitlines():
        pos = 0
        while pos < len(line):
            start = line.find("{", pos)
            if start < 0:
                break
            try:
                rec, pos = decoder.raw_decode(line, start)
            except json.JSONDecodeError:
                pos = start + 1
                continue
            records.append(rec)
    return records


def _finished_job_ids(router: RouterProcess) -> list[int]:
    return [int(r["job_id"]) for r in _log_records(router) if r.get("event") == "job_finished" and r.get("state") == "done"]


@pytest.mark.postgres
def test_two_nodes_share_one_queue_deliver_each_instance_exactly_once(tmp_path: Path, pg_url: str) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    parts = []
    for k in range(4):  # 4 folders, 5 patients each (seeds differ: 20 distinct patients)
        folder = tmp_path / "in" / f"part{k}"
        make_series(folder, INSTANCES // 4, patients=PATIENTS // 4, rows=16, cols=16, seed=k)
        parts.append(folder)
    originals: dict[str, str] = {}  # SOPInstanceUID -> PatientID
    for f in (tmp_path / "in").rglob("*.dcm"):
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        originals[str(ds.SOPInstanceUID)] = str(ds.PatientID)
    assert len(originals) == INSTANCES and len(set(originals.values())) == PATIENTS

    scp = _scp(tmp_path)
    common: dict[str, Any] = dict(
        queue={"url": pg_url, "workers": 2},
        storage={"root": str(shared)},
        deid={"secret_file": str(shared / "secret.key")},
        env={"TCP_NODELAY": "1"},
    )
    node_a = RouterProcess(tmp_path / "node-a", [dicom_destination("pacs", scp.port, "PACS")], **common)
    node_b = RouterProcess(tmp_path / "node-b", [dicom_destination("pacs", scp.port, "PACS")], **common)
    try:
        node_a.start()  # first: creates the secret and migrates; the second finds both done
        node_b.start()
        # the listener has the CPU first: de-identification workers run at queue.worker_nice (19)
        assert node_a.proc is not None
        pid = node_a.proc.pid

        def worker_nices() -> list[int]:
            return [nice(p) for p in process_tree(pid) if "spawn_main" in cmdline(p)]

        # two workers, each lowering its priority as soon as it has read the configuration
        wait_until(lambda: worker_nices() == [19, 19], 20, 0.1, "two workers at nice 19")
        assert nice(node_a.proc.pid) == 0
        results: dict[int, Any] = {}

        def send(i: int, port: int) -> None:
            results[i] = storescu("127.0.0.1", port, [parts[i]], timeout=170)

        senders = [
            threading.Thread(target=send, args=(i, node.port))
            for i, node in enumerate((node_a, node_a, node_b, node_b))
        ]
        for t in senders:
            t.start()
        for t in senders:
            t.join()
        for i in range(4):
            assert storescu_acknowledged(results[i]) == INSTANCES // 4, results[i].stdout[-2000:]

        status = node_a.wait_idle(150, expect_done=INSTANCES)
        assert status["jobs"].get("done") == INSTANCES, status
        assert node_b.status()["jobs"] == status["jobs"]  # one queue, seen from both nodes

        keys = Keys.load_or_create(shared / "secret.key")
        expected = {keys.uid(uid) for uid in originals}
        received: Counter[str] = Counter()
        patient_ids: set[str] = set()
        for f in scp.files():
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            received[str(ds.SOPInstanceUID)] += 1
            patient_ids.add(str(ds.PatientID))
        assert set(received) == expected
        assert [uid for uid, n in received.items() if n != 1] == []
        assert sum(received.values()) == INSTANCES
        assert len(patient_ids) == PATIENTS
        assert not patient_ids & set(originals.values())

        engine = make_engine(pg_url)
        try:
            with engine.connect() as conn:
                claims = dict(
                    conn.execute(
                        text(
                            "SELECT j.id, count(e.id) FROM jobs j LEFT JOIN job_events e "
                            "ON e.job_id = j.id AND e.to_state = 'running' GROUP BY j.id"
                        )
                    ).all()
                )
                crosswalk_patients = conn.execute(
                    text("SELECT count(*) FROM crosswalk WHERE kind = 'patient_id'")
                ).scalar_one()
        finally:
            engine.dispose()
        assert len(claims) == INSTANCES
        assert Counter(claims.values()) == Counter({1: INSTANCES}), Counter(claims.values())
        assert crosswalk_patients == PATIENTS

        # each job was processed by exactly one node, and both nodes did work
        done_a, done_b = _finished_job_ids(node_a), _finished_job_ids(node_b)
        assert done_a and done_b, (len(done_a), len(done_b))
        assert not set(done_a) & set(done_b)
        assert sorted(done_a + done_b) == sorted(claims)
        owners = {n: [r["owner"] for r in _log_records(n) if r.get("event") == "worker_started"] for n in (node_a, node_b)}
        assert len(owners[node_a]) == 2 and len(owners[node_b]) == 2
        assert not set(owners[node_a]) & set(owners[node_b])
    finally:
        node_a.stop()
        node_b.stop()
        scp.stop()


def _route_big_instance(tmp_path: Path, frames: int, timeout: float) -> None:
    """storescu -> router (1 worker) -> storescp with a ``frames`` x 1024 x 1024 x 16-bit instance."""
    big = tmp_path / "big"
    big.mkdir()
    src = big / "multiframe.dcm"
    scp = _scp(tmp_path)
    router = RouterProcess(
        tmp_path / "router",
        [dicom_destination("pacs", scp.port, "PACS", dimse_timeout_seconds=timeout)],
        queue={"workers": 1},
        env={"TCP_NODELAY": "1"},
    )
    try:
        sop_uid, want_sha, length = write_big_multiframe(src, frames)
        router.start()
        assert router.proc is not None
        sampler = RssSampler(router.proc.pid, interval=0.1).start()
        try:
            import time

            time.sleep(3.0)  # let the worker start: its import cost is part of the baseline
            baseline = sampler.peak_sum_mb
            res = storescu("127.0.0.1", router.port, [src], timeout=timeout, extra=["-ts", str(int(timeout))])
            assert storescu_acknowledged(res) == 1, res.stdout[-2000:] + res.stderr[-2000:]
            router.wait_idle(timeout, expect_done=1)
        finally:
            sampler.stop()
        files = scp.files()
        assert len(files) == 1
        got = pydicom.dcmread(files[0], stop_before_pixels=True)
        assert str(got.SOPInstanceUID) == Keys.load_or_create(router.secret_path).uid(sop_uid)
        assert str(got.PatientID) != "BIGPID0001"
        assert pixel_sha256(files[0]) == (want_sha, length)
        print(f"\n{length / 2**20:.0f} MiB instance: router peak RSS {sampler.peak_sum_mb:.0f} MB "
              f"(sum over {len(sampler.hwm_kb)} processes, baseline {baseline:.0f} MB, per-process VmHWM sum "
              f"{sampler.hwm_sum_mb:.0f} MB, {sampler.samples} samples)")
        assert sampler.peak_sum_mb < RSS_LIMIT_MB, (sampler.peak_sum_mb, sampler.hwm_kb)
        # the instance itself must not be in memory: growth well below its size
        assert sampler.peak_sum_mb - baseline < min(100.0, length / 2**20 / 4), (baseline, sampler.peak_sum_mb)
    finally:
        router.stop()
        scp.stop()
        shutil.rmtree(big, ignore_errors=True)
        shutil.rmtree(scp.out_dir, ignore_errors=True)
        shutil.rmtree(router.workdir / "var", ignore_errors=True)


@pytest.mark.timeout(1200)
def test_2gb_multiframe_routes_with_flat_memory(tmp_path: Path) -> None:
    # about 40 s here and 8 GB of disk at the peak (source, raw, work file, delivered copy)
    _route_big_instance(tmp_path, frames=1000, timeout=600)  # 2000 MiB of pixel data
