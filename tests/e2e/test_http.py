"""The HTTP side of a real node: /metrics counters move as instances flow, /readyz follows the
queue database, and no page or endpoint ever shows a value from an instance."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.corpus import make_series
from tests.support.peers import StoreSCP, echoscu, storescu, storescu_acknowledged
from tests.support.router import RouterProcess, dicom_destination, free_port, wait_until
from tests.support.tcp_proxy import proxy_for_url

pytestmark = pytest.mark.e2e

ADMIN = ("admin", "admin-password")
VIEWER = ("viewer", "viewer-password")


def _router(tmp_path: Path, scp: StoreSCP, queue: dict[str, Any] | None = None) -> RouterProcess:
    router = RouterProcess(
        tmp_path / "router", [dicom_destination("pacs", scp.port, scp.ae_title)], http={"port": free_port()},
        queue=queue or {},
    )
    router.add_user(ADMIN[0], "admin", ADMIN[1])
    router.add_user(VIEWER[0], "viewer", VIEWER[1])
    return router


def _metrics(router: RouterProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    res = httpx.get(router.http_url + "/metrics", timeout=10)
    assert res.status_code == 200
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(res.text)
        for s in fam.samples
    }


def test_metrics_counters_move_as_instances_flow(tmp_path: Path, storescp: StoreSCP) -> None:
    make_series(tmp_path / "in", 4, rows=16, cols=16)
    router = _router(tmp_path, storescp)
    pacs = (("destination", "pacs"),)
    wrong_aet = ("deid_router_associations_rejected_total", (("reason", "called_aet_not_recognized"),))
    with router:
        before = _metrics(router)
        assert before[("deid_router_instances_received_total", ())] == 0
        assert before[("deid_router_deidentify_seconds_count", ())] == 0
        assert before[("deid_router_forward_seconds_count", pacs)] == 0
        assert wrong_aet not in before
        assert before[("deid_router_instances_delivered_total", pacs)] == 0
        assert before[("deid_router_destination_paused", pacs)] == 0
        assert before[("deid_router_holding_free_bytes", ())] > 0
        assert storescu_acknowledged(storescu("127.0.0.1", router.port, [tmp_path / "in"])) == 4
        router.wait_idle_api(VIEWER, 60, expect_done=4)
        after = _metrics(router)
        assert after[("deid_router_instances_received_total", ())] == 4
        assert after[("deid_router_instances_delivered_total", pacs)] == 4
        assert after[("deid_router_jobs", (("destination", "pacs"), ("state", "done")))] == 4
        assert after[("deid_router_jobs", (("destination", "pacs"), ("state", "queued")))] == 0
        assert after[("deid_router_oldest_job_age_seconds", pacs)] == 0
        assert after[("deid_router_quarantined", ())] == 0
        assert after[("deid_router_build_info", (("version", "0.1.0"),))] == 1
        # the latency histograms, observed in the worker processes: one run per instance, one
        # send per batch (the four may go in one batch or several)
        assert after[("deid_router_deidentify_seconds_count", ())] == 4
        assert after[("deid_router_deidentify_seconds_bucket", (("le", "+Inf"),))] == 4
        assert 0 < after[("deid_router_deidentify_seconds_sum", ())] < 40
        assert 1 <= after[("deid_router_forward_seconds_count", pacs)] <= 4
        assert after[("deid_router_forward_seconds_sum", pacs)] > 0

        # A modality configured with the wrong called AE title is refused, and counted by reason.
        assert not echoscu("127.0.0.1", router.port, called_aet="WRONG")
        assert _metrics(router)[wrong_aet] == 1

        echo = httpx.post(router.http_url + "/api/v1/destinations/pacs/echo", auth=ADMIN, json={}, timeout=30)
        assert echo.json() == {"destination": "pacs", "ok": True, "status": 0, "detail": "echo answered"}
        assert httpx.post(router.http_url + "/api/v1/destinations/pacs/echo", auth=VIEWER, json={}).status_code == 403

        # An admin pauses the PACS: new instances wait (and age), nothing more is delivered.
        res = httpx.post(router.http_url + "/api/v1/destinations/pacs/pause", auth=ADMIN, json={"reason": "test"})
        assert res.status_code == 200
        make_series(tmp_path / "more", 2, rows=16, cols=16)
        assert storescu_acknowledged(storescu("127.0.0.1", router.port, [tmp_path / "more"])) == 2
        wait_until(lambda: _metrics(router)[("deid_router_oldest_job_age_seconds", pacs)] >= 2, 30, what="aging")
        paused = _metrics(router)
        assert paused[("deid_router_destination_paused", pacs)] == 1
        assert paused[("deid_router_instances_received_total", ())] == 6
        assert paused[("deid_router_instances_delivered_total", pacs)] == 4
        assert len(storescp.sop_instance_uids()) == 4
        assert router.api_status(VIEWER)["paused"] == ["pacs"]
        assert router.status() == router.api_status(VIEWER)  # the same object as status --json
        httpx.post(router.http_url + "/api/v1/destinations/pacs/resume", auth=ADMIN, json={})
        router.wait_idle_api(VIEWER, 60, expect_done=6)
        assert _metrics(router)[("deid_router_instances_delivered_total", pacs)] == 6
        assert router.terminate() == 0


@pytest.mark.postgres
def test_readyz_is_503_while_the_queue_database_is_unreachable(tmp_path: Path, pg_url: str, storescp: StoreSCP) -> None:
    proxy = proxy_for_url(pg_url)
    try:
        router = _router(tmp_path, storescp, queue={"url": proxy.url_for(pg_url)})
        with router:
            ready = httpx.get(router.http_url + "/readyz", timeout=10)
            assert ready.status_code == 200 and ready.json() == {"ready": True}
            proxy.cut()
            down = httpx.get(router.http_url + "/readyz", timeout=30)
            assert down.status_code == 503
            assert down.json() == {"ready": False, "reasons": ["queue database is unreachable"]}
            assert httpx.get(router.http_url + "/healthz", timeout=10).status_code == 200  # alive, not ready
            assert _metrics(router)[("deid_router_queue_database_up", ())] == 0
            proxy.restore()
            wait_until(lambda: httpx.get(router.http_url + "/readyz", timeout=10).status_code == 200, 30,
                       what="readiness after the database came back")
            assert router.terminate() == 0
    finally:
        proxy.stop()


PLANTED = {
    "PatientName": "Sentinelname^Plantedgiven",
    "PatientID": "PLANTEDPID4711",
    "AccessionNumber": "PLANTEDACC0815",
    "InstitutionName": "Planted Memorial Hospital",
    "ReferringPhysicianName": "Plantedreferrer^Doc",
    "StudyDescription": "PLANTED STUDY DESCRIPTION",
    "PatientBirthDate": "19010203",
}


def _planted_corpus(tmp_path: Path, corpus: dict[str, Path]) -> tuple[Path, list[str]]:
    """The suite's corpus and a synthetic CT, each with the planted values; the CT twice
    (one with burned-in annotation YES: quarantined). Returns the folder and every UID."""
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("CT_small.dcm", "rtplan.dcm", "test-SR.dcm", "MR_small_jpeg_ls_lossless.dcm"):
        shutil.copyfile(corpus[name], folder / name)
    for p in make_series(folder / "ct", 2, rows=16, cols=16):
        shutil.move(p, folder / p.name)
    uids: list[str] = []
    for i, path in enumerate(sorted(folder.glob("*.dcm"))):
        ds = pydicom.dcmread(path)
        for kw, value in PLANTED.items():
            setattr(ds, kw, value)
        if i == 0:
            ds.BurnedInAnnotation = "YES"
        ds.save_as(path)
        uids += [str(ds.SOPInstanceUID), str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)]
    return folder, uids


def _console(router: RouterProcess, user: tuple[str, str]) -> httpx.Client:
    c = httpx.Client(base_url=router.http_url, timeout=20, follow_redirects=True)
    token = re.search(r'name="csrf" value="([^"]+)"', c.get("/login").text)
    assert token is not None
    res = c.post("/login", data={"csrf": token.group(1), "username": user[0], "password": user[1], "next": "/"})
    assert res.status_code == 200 and "Dashboard" in res.text
    return c


def test_no_page_endpoint_or_metric_shows_a_planted_value(
    tmp_path: Path, storescp: StoreSCP, corpus: dict[str, Path]
) -> None:
    folder, uids = _planted_corpus(tmp_path, corpus)
    router = _router(tmp_path, storescp)
    with router:
        res = storescu("127.0.0.1", router.port, [folder])
        assert storescu_acknowledged(res) == 6, res.stdout[-2000:]
        status = router.wait_idle_api(VIEWER, 90)
        assert status["quarantined"] >= 1 and status["jobs"]["done"] >= 4
        api = httpx.Client(base_url=router.http_url, timeout=20)
        entries = api.get("/api/v1/quarantine", auth=VIEWER).json()["entries"]
        jobs = api.get("/api/v1/jobs?limit=1000", auth=VIEWER).json()["jobs"]
        assert entries and len(jobs) == 6
        qids = [e["id"] for e in entries]
        job_ids = [j["id"] for j in jobs]
        pages = ["/", "/jobs", "/jobs?state=done", "/jobs?state=failed&destination=pacs", "/quarantine",
                 "/quarantine?all=1", "/destinations", "/audit", "/config",
                 *(f"/quarantine/{q}" for q in qids), *(f"/quarantine/{q}/release" for q in qids),
                 *(f"/quarantine/{q}/purge" for q in qids), *(f"/jobs/{j}" for j in job_ids)]
        endpoints = ["/api/v1/status", "/api/v1/quarantine", "/api/v1/quarantine?all=1", "/api/v1/jobs",
                     "/api/v1/destinations", "/api/v1/audit", *(f"/api/v1/quarantine/{q}" for q in qids),
                     *(f"/api/v1/jobs/{j}" for j in job_ids)]
        bodies: dict[str, str] = {}
        for user in (VIEWER, ADMIN):
            console = _console(router, user)
            admin_pages = ["/dryrun", "/quarantine/bulk?action=release&" + "&".join(f"id={q}" for q in qids)]
            for path in pages + (admin_pages if user == ADMIN else []):
                page = console.get(path)
                assert page.status_code == 200, (user[0], path, page.status_code)
                bodies[f"{user[0]} {path}"] = page.text
            for path in endpoints:
                got = api.get(path, auth=user)
                assert got.status_code == 200, (user[0], path)
                bodies[f"{user[0]} {path}"] = got.text
        for path in ("/healthz", "/readyz", "/metrics", "/login"):
            bodies[path] = api.get(path).text
        bodies["log"] = router.log_text()
    # the pages do show what an operator needs (so the scan below looked at real content)
    assert entries[0]["reason"] in bodies["viewer /quarantine"] and "MODALITY" in bodies["viewer /quarantine"]
    assert "pacs" in bodies["admin /"] and '"done"' in bodies["viewer /api/v1/jobs"]
    needles = [*PLANTED.values(), "Sentinelname", "Plantedgiven", "Plantedreferrer", "PLANTED", *uids]
    leaks = [(where, n) for where, body in bodies.items() for n in needles if n in body]
    assert leaks == []


def test_a_taken_http_port_stops_the_node_with_a_clear_error(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        router = RouterProcess(tmp_path / "router", [{"name": "outbox", "type": "folder", "path": "var/outbox"}],
                               http={"port": port})
        with pytest.raises(AssertionError, match="router exited with 1"):
            router.start()
    assert f"cannot listen for HTTP on 127.0.0.1:{port}" in router.log_text()
    assert "Traceback" not in router.log_text()
