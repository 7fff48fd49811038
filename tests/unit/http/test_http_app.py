"""The ASGI app in-process (Starlette's TestClient) on a real SQLite queue: logins, roles,
CSRF, the failed-login limit, readiness reasons. The real node and browser are in tests/e2e."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from deid_router.app import build_context
from deid_router.config import load_config
from deid_router.db.operations import UserStore
from deid_router.http.app import build_app
from deid_router.http.auth import FailedLogins, RateLimited, basic_credentials
from deid_router.http.passwords import hash_password, verify_password
from deid_router.http.services import Services, build_services

ADMIN = ("root", "admin-password")
VIEWER = ("watcher", "viewer-password")
HASHES = {name: hash_password(pw) for name, pw in (ADMIN, VIEWER)}  # argon2 once, not per test


def _config(tmp_path: Path, min_free_mb: int = 1) -> Path:
    path = tmp_path / "router.toml"
    path.write_text(
        f"""
[storage]
root = "var"
min_free_mb = {min_free_mb}
[deid]
secret_file = "var/secret.key"
[[destinations]]
name = "outbox"
type = "folder"
path = "var/outbox"
[[routes]]
name = "all"
destinations = ["outbox"]
[http]
port = 1
""",
        encoding="utf-8",
    )
    return path


def _services(tmp_path: Path, listener: dict[str, bool], min_free_mb: int = 1) -> Iterator[Services]:
    ctx = build_context(load_config(_config(tmp_path, min_free_mb)), run_migrations=True)
    users = UserStore(ctx.engine)
    users.add(ADMIN[0], "admin", HASHES[ADMIN[0]])
    users.add(VIEWER[0], "viewer", HASHES[VIEWER[0]])
    try:
        yield build_services(ctx.config, ctx.repo, ctx.holding, ctx.keys, lambda: listener["up"])
    finally:
        ctx.close()


@pytest.fixture
def listener() -> dict[str, bool]:
    return {"up": True}


@pytest.fixture
def svc(tmp_path: Path, listener: dict[str, bool]) -> Iterator[Services]:
    yield from _services(tmp_path, listener)


@pytest.fixture
def client(svc: Services) -> TestClient:
    return TestClient(build_app(svc), base_url="http://127.0.0.1")


def _login(client: TestClient, user: tuple[str, str]) -> str:
    page = client.get("/login")
    token = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert token is not None
    res = client.post("/login", data={"csrf": token.group(1), "username": user[0], "password": user[1], "next": "/"},
                      follow_redirects=False)
    assert res.status_code == 303, res.text
    home = client.get("/")
    found = re.search(r'name="csrf" value="([^"]+)"', home.text)
    assert home.status_code == 200 and found is not None
    return found.group(1)


def test_health_needs_no_login_and_readiness_names_the_listener(client: TestClient, listener: dict[str, bool]) -> None:
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").json() == {"ready": True}
    listener["up"] = False
    res = client.get("/readyz")
    assert res.status_code == 503 and res.json()["reasons"] == ["DICOM listener is not accepting associations"]
    assert "deid_router_jobs{" in client.get("/metrics").text


def test_readiness_fails_when_the_holding_disk_is_below_its_reserve(tmp_path: Path) -> None:
    for svc in _services(tmp_path, {"up": True}, min_free_mb=10**9):
        res = TestClient(build_app(svc)).get("/readyz")
        assert res.status_code == 503
        assert res.json()["reasons"] == ["holding disk is below its reserve (storage.min_free_mb)"]


def test_api_401_without_or_with_wrong_credentials_403_for_a_viewers_write(client: TestClient) -> None:
    res = client.get("/api/v1/status")
    assert res.status_code == 401 and res.headers["www-authenticate"].startswith("Basic")
    assert client.get("/api/v1/status", auth=(ADMIN[0], "wrong-password")).status_code == 401
    status = client.get("/api/v1/status", auth=VIEWER)
    assert status.status_code == 200 and status.json()["paused"] == []
    assert client.post("/api/v1/destinations/outbox/pause", auth=VIEWER, json={}).status_code == 403
    assert client.post("/api/v1/quarantine/1/release", auth=VIEWER, json={}).status_code == 403
    assert client.get("/api/v1/destinations", auth=VIEWER).json()["destinations"][0]["paused"] is False


def test_api_writes_need_json_and_are_audited_with_the_user(client: TestClient) -> None:
    form = client.post("/api/v1/destinations/outbox/pause", auth=ADMIN, data={"reason": "x"})
    assert form.status_code == 415  # what a cross-site form would send
    res = client.post("/api/v1/destinations/outbox/pause", auth=ADMIN, json={"reason": "PACS upgrade"})
    assert res.status_code == 200
    assert client.get("/api/v1/status", auth=VIEWER).json()["paused"] == ["outbox"]
    assert client.post("/api/v1/destinations/nowhere/pause", auth=ADMIN, json={}).status_code == 404
    assert client.post("/api/v1/quarantine/99/release", auth=ADMIN, json={}).status_code == 404
    assert client.post("/api/v1/jobs/99/retry", auth=ADMIN, json={}).status_code == 404
    client.post("/api/v1/destinations/outbox/resume", auth=ADMIN, json={})
    echo = client.post("/api/v1/destinations/outbox/echo", auth=ADMIN, json={}).json()
    assert (echo["ok"], echo["detail"]) == (True, "folder is writable")
    events = client.get("/api/v1/audit", auth=VIEWER).json()["events"]
    assert [(e["action"], e["user"]) for e in events[:3]] == [
        ("destination_echo", "root"), ("destination_resume", "root"), ("destination_pause", "root")
    ]


def test_failed_logins_are_limited_per_client(client: TestClient) -> None:
    for _ in range(5):
        assert client.get("/api/v1/status", auth=(ADMIN[0], "guess")).status_code == 401
    limited = client.get("/api/v1/status", auth=ADMIN)  # even the right password, for a while
    assert limited.status_code == 429 and int(limited.headers["retry-after"]) > 0


def test_console_401_shows_the_login_form_and_login_is_audited(client: TestClient, svc: Services) -> None:
    res = client.get("/quarantine")
    assert res.status_code == 401 and 'action="/login"' in res.text and 'value="/quarantine"' in res.text
    _login(client, VIEWER)
    assert client.get("/quarantine").status_code == 200
    assert ("login", "watcher") in [(a, u) for _, a, u, _ in svc.repo.audit_events()]


def test_console_login_rejects_a_wrong_password_and_a_missing_csrf_token(client: TestClient) -> None:
    client.get("/login")
    assert client.post("/login", data={"username": ADMIN[0], "password": ADMIN[1]}).status_code == 403
    page = client.get("/login")
    token = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert token is not None
    res = client.post("/login", data={"csrf": token.group(1), "username": ADMIN[0], "password": "nope"})
    assert res.status_code == 401 and "Wrong user name or password" in res.text


def test_console_writes_need_the_csrf_token_and_the_admin_role(svc: Services) -> None:
    viewer = TestClient(build_app(svc), base_url="http://127.0.0.1")
    token = _login(viewer, VIEWER)
    assert viewer.post("/destinations/outbox/pause", data={"csrf": token}).status_code == 403
    admin = TestClient(build_app(svc), base_url="http://127.0.0.1")
    token = _login(admin, ADMIN)
    assert admin.post("/destinations/outbox/pause", data={"reason": "x"}).status_code == 403  # no token
    res = admin.post("/destinations/outbox/pause", data={"csrf": token, "reason": "upgrade"}, follow_redirects=False)
    assert res.status_code == 303
    assert svc.states.paused() == ["outbox"]
    assert "paused" in admin.get("/destinations").text


def test_a_removed_user_is_logged_out(client: TestClient, svc: Services) -> None:
    _login(client, VIEWER)
    svc.users.remove(VIEWER[0])
    assert client.get("/").status_code == 401


def test_every_console_page_renders_for_both_roles(svc: Services) -> None:
    for user in (VIEWER, ADMIN):
        c = TestClient(build_app(svc), base_url="http://127.0.0.1")
        _login(c, user)
        for path in ("/", "/jobs", "/jobs?state=failed&destination=outbox", "/quarantine", "/quarantine?all=1",
                     "/destinations", "/audit", "/config"):
            res = c.get(path)
            assert res.status_code == 200, (path, res.text[:500])
            assert res.headers["x-frame-options"] == "DENY"
        assert "secret.key" in c.get("/config").text  # where the secret is, never what it is


def test_passwords_basic_header_and_the_failure_window() -> None:
    h = hash_password("long enough")
    assert h.startswith("$argon2id$") and verify_password(h, "long enough") and not verify_password(h, "other")
    with pytest.raises(ValueError):
        hash_password("short")
    assert basic_credentials("Basic dTpwOnc=") == ("u", "p:w")
    assert basic_credentials("Basic !!!") is None and basic_credentials("Bearer x") is None
    now = [0.0]
    limiter = FailedLogins(allowed=2, window=10, clock=lambda: now[0])
    limiter.failed("a")
    limiter.failed("a")
    with pytest.raises(RateLimited):
        limiter.check("a")
    limiter.check("b")
    now[0] = 10.5
    limiter.check("a")




def test_dry_run_is_admin_only_and_shows_routes_and_the_engines_changes(svc: Services) -> None:
    from pydicom import dcmread
    from pydicom.data import get_testdata_file

    path = get_testdata_file("CT_small.dcm")
    assert path is not None
    original_name = str(dcmread(path).PatientName)
    viewer = TestClient(build_app(svc), base_url="http://127.0.0.1")
    token = _login(viewer, VIEWER)
    assert viewer.get("/dryrun").status_code == 403
    assert viewer.post("/dryrun", data={"csrf": token}, files={"file": b"x"}).status_code == 403
    admin = TestClient(build_app(svc), base_url="http://127.0.0.1")
    token = _login(admin, ADMIN)
    assert admin.get("/dryrun").status_code == 200
    with open(path, "rb") as fh:
        res = admin.post("/dryrun", data={"csrf": token, "calling_aet": "CT1"}, files={"file": ("ct.dcm", fh)})
    assert res.status_code == 200
    assert "Routed to: outbox" in res.text and 'id="diff"' in res.text
    assert original_name in res.text  # the admin sees the original next to what is sent
    bad = admin.post("/dryrun", data={"csrf": token}, files={"file": ("x.dcm", b"not dicom")})
    assert "not a DICOM Part-10 file" in bad.text
    assert ("dry_run", "root") in [(a, u) for _, a, u, _ in svc.repo.audit_events()]


def test_readiness_notices_a_moved_sqlite_database(client: TestClient, svc: Services) -> None:
    db = Path(svc.config.queue.url.removeprefix("sqlite:///"))
    moved = db.with_name("moved.sqlite3")
    db.rename(moved)
    try:
        res = client.get("/readyz")
        assert res.status_code == 503 and res.json()["reasons"] == ["queue database file is missing"]
    finally:
        moved.rename(db)
    assert client.get("/readyz").status_code == 200


def test_an_unexpected_error_is_a_bare_500_logged_by_type_only(
    svc: Services, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import deid_router.deid.plan

    def boom(*_: object) -> None:
        raise RuntimeError("Sentinelname^Plantedgiven in a library message")

    monkeypatch.setattr(deid_router.deid.plan, "dry_run", boom)
    from pydicom.data import get_testdata_file

    path = get_testdata_file("CT_small.dcm")
    assert path is not None
    admin = TestClient(build_app(svc), base_url="http://127.0.0.1")
    token = _login(admin, ADMIN)
    capsys.readouterr()
    with open(path, "rb") as fh:
        res = admin.post("/dryrun", data={"csrf": token}, files={"file": ("ct.dcm", fh)})
    assert res.status_code == 500 and "Sentinelname" not in res.text
    logged = capsys.readouterr()
    assert "http_request_failed" in logged.out + logged.err and "Sentinelname" not in logged.out + logged.err


def _quarantine_three(svc: Services) -> list[int]:
    from deid_router.db.repository import NewInstance, new_instance_id
    from deid_router.jobs.outcome import Outcome, OutcomeKind
    from deid_router.jobs.policy import RetryPolicy, decide
    from deid_router.db.engine import utc_now

    for i in range(3):
        iid = new_instance_id()
        svc.repo.enqueue(NewInstance(iid, f"{i}" * 64, "a" * 64, f"raw/{iid}.dcm", 10, "1.2.840.10008.5.1.4.1.1.2",
                                     "1.2.840.10008.1.2.1", "MODALITY", "DEID_ROUTER", "CT"), ["outbox"])
    policy = RetryPolicy(1, 2, 1, jitter="none")
    for job in svc.repo.claim("w", 60, 10):
        svc.repo.finish(job.job_id, "w", decide(1, Outcome(OutcomeKind.PERMANENT, 0xA900, "refused"), policy, utc_now()))
    return [e.id for e in svc.reports.quarantine()]


def test_bulk_purge_asks_first_and_purges_only_the_chosen(svc: Services, monkeypatch: pytest.MonkeyPatch) -> None:
    ids = _quarantine_three(svc)
    assert len(ids) == 3
    viewer = TestClient(build_app(svc), base_url="http://127.0.0.1")
    _login(viewer, VIEWER)
    assert 'class="pick"' not in viewer.get("/quarantine").text
    assert viewer.get(f"/quarantine/bulk?action=purge&id={ids[0]}").status_code == 403
    admin = TestClient(build_app(svc), base_url="http://127.0.0.1")
    token = _login(admin, ADMIN)
    assert admin.get("/quarantine").text.count('class="pick"') == 3
    confirm = admin.get(f"/quarantine/bulk?action=purge&id={ids[0]}&id={ids[1]}")
    assert "Purge 2 quarantine entries" in confirm.text and "Are you sure" in confirm.text
    assert len(svc.reports.quarantine()) == 3  # asking changed nothing
    res = admin.post("/quarantine/bulk", data={"csrf": token, "action": "purge", "ids": f"{ids[0]},{ids[1]}"},
                     follow_redirects=False)
    assert res.status_code == 303
    assert [e.id for e in svc.reports.quarantine()] == [ids[2]]
    events = [(a, d) for _, a, _, d in svc.repo.audit_events() if a == "quarantine_purge"]
    assert len(events) == 2
    # the jobs list filters by time and pages back
    assert admin.get("/jobs?since=1h").text.count('href="/jobs/') == 3
    api = TestClient(build_app(svc), base_url="http://127.0.0.1")
    assert len(api.get("/api/v1/jobs?since=2000-01-01T00:00:00%2B00:00", auth=VIEWER).json()["jobs"]) == 3
    assert api.get("/api/v1/jobs?since=2999-01-01T00:00:00%2B00:00", auth=VIEWER).json()["jobs"] == []
    assert api.get("/api/v1/jobs?since=yesterday", auth=VIEWER).status_code == 400
    import deid_router.http.console as console

    monkeypatch.setattr(console, "JOBS_PER_PAGE", 2)
    first = admin.get("/jobs")
    assert 'id="older"' in first.text
    older = re.search(r'id="older" href="([^"]+)"', first.text)
    assert older is not None
    second = admin.get(older.group(1).replace("&amp;", "&"))
    assert second.status_code == 200 and second.text.count('href="/jobs/') == 1 and 'id="older"' not in second.text


def test_console_logins_and_logouts_go_to_the_audit_repository(tmp_path: Path) -> None:
    from deid_router.observability.audit_messages import AuditSink, Auditor
    from tests.support.syslog_collector import SyslogCollector

    collector = SyslogCollector("tcp")
    auditor = Auditor(AuditSink(collector.url, "test-node"), "DEID_ROUTER")
    try:
        ctx = build_context(load_config(_config(tmp_path)), run_migrations=True)
        UserStore(ctx.engine).add(ADMIN[0], "admin", HASHES[ADMIN[0]])
        svc = build_services(ctx.config, ctx.repo, ctx.holding, ctx.keys, lambda: True, auditor)
        c = TestClient(build_app(svc), base_url="http://127.0.0.1")
        page = c.get("/login")
        token = re.search(r'name="csrf" value="([^"]+)"', page.text)
        assert token is not None
        c.post("/login", data={"csrf": token.group(1), "username": "typo-secret", "password": "x"})
        c.post("/login", data={"csrf": token.group(1), "username": ADMIN[0], "password": "wrong"})
        home_token = _login(c, ADMIN)
        c.post("/logout", data={"csrf": home_token})
        msgs = collector.wait_for(lambda ms: len(ms) >= 4, 10)
        ctx.close()
    finally:
        auditor.close()
        collector.stop()
    users = []
    for m in msgs:
        root = m.xml()
        event = root.find("EventIdentification")
        assert event is not None and event.find("EventID") is not None
        assert event.find("EventID").get("csd-code") == "110114"  # type: ignore[union-attr]
        users.append((root.findall("ActiveParticipant")[0].get("UserID"), event.get("EventOutcomeIndicator")))
    assert users == [("unknown", "4"), ("root", "4"), ("root", "0"), ("root", "0")]
    assert all(b"typo-secret" not in m.msg for m in msgs)


def _delivered_study(svc: Services, directory: Path, n: int) -> tuple[str, str]:
    """``n`` instances of one study held and delivered to outbox: (study UID, series UID)."""
    import shutil

    import pydicom

    from deid_router.db.engine import utc_now
    from deid_router.db.repository import NewInstance, new_instance_id
    from deid_router.jobs.outcome import Outcome, OutcomeKind
    from deid_router.jobs.policy import RetryPolicy, decide
    from tests.support.corpus import make_series

    files = make_series(directory, n, rows=8, cols=8)
    for i, src in enumerate(files):
        iid = new_instance_id()
        rel = svc.holding.raw_relative(iid)
        path = svc.holding.absolute(rel)
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, path)
        svc.repo.enqueue(NewInstance(iid, f"{i}" * 64, "a" * 64, rel, path.stat().st_size,
                                     "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1", "MODALITY",
                                     "DEID_ROUTER", "CT"), ["outbox"])
    policy = RetryPolicy(1, 2, 1, jitter="none")
    for job in svc.repo.claim("w", 60, 100):
        svc.repo.finish(job.job_id, "w", decide(1, Outcome(OutcomeKind.DELIVERED, 0x0000, ""), policy, utc_now()))
    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)


def test_api_resend_queues_a_delivered_study_again_for_an_admin_only_and_audits_it(
    svc: Services, client: TestClient, tmp_path: Path
) -> None:
    study, series = _delivered_study(svc, tmp_path / "in", 3)
    body = {"destination": "outbox", "study_uid": study}
    assert client.post("/api/v1/resend", json=body).status_code == 401
    assert client.post("/api/v1/resend", auth=VIEWER, json=body).status_code == 403
    assert svc.repo.list_jobs(states=["queued"]) == []

    res = client.post("/api/v1/resend", auth=ADMIN, json=body)
    assert res.status_code == 200, res.text
    done = res.json()
    queued = svc.repo.list_jobs(states=["queued"])
    assert sorted(done["job_ids"]) == sorted(j.id for j in queued) and len(queued) == 3
    assert {j.last_reason for j in queued} == {"operator_resend"}
    assert study not in res.text  # the UID given is not echoed
    events = client.get("/api/v1/audit", auth=VIEWER).json()["events"]
    assert (events[0]["action"], events[0]["user"], events[0]["detail"]) == ("resend", "root", "destination=outbox jobs=3")

    # the series by its de-identified UID (as the PACS shows it): already queued, nothing new
    again = client.post("/api/v1/resend", auth=ADMIN, json={"destination": "outbox", "series_uid": svc.keys.uid(series)})
    assert again.json()["job_ids"] == [] and again.json()["already_queued"] == 3
    assert len(svc.repo.list_jobs(states=["queued"])) == 3
    assert client.post("/api/v1/resend", auth=ADMIN, json={"destination": "nowhere", "study_uid": study}).status_code == 404
    for bad in ({"destination": "outbox"}, {"destination": "outbox", "study_uid": study, "series_uid": series},
                {"destination": "outbox", "study_uid": 5}, {"study_uid": study}):
        assert client.post("/api/v1/resend", auth=ADMIN, json=bad).status_code == 400, bad


def test_console_resend_form_is_for_admins_and_queues_the_study(svc: Services, tmp_path: Path) -> None:
    study, _ = _delivered_study(svc, tmp_path / "in", 2)
    viewer = TestClient(build_app(svc), base_url="http://127.0.0.1")
    token = _login(viewer, VIEWER)
    assert 'id="resend"' not in viewer.get("/destinations").text
    form = {"csrf": token, "destination": "outbox", "level": "study", "uid": study}
    assert viewer.post("/destinations/resend", data=form).status_code == 403
    admin = TestClient(build_app(svc), base_url="http://127.0.0.1")
    token = _login(admin, ADMIN)
    assert 'id="resend"' in admin.get("/destinations").text
    assert admin.post("/destinations/resend", data={**form, "csrf": "forged"}).status_code == 403
    res = admin.post("/destinations/resend", data={**form, "csrf": token})
    assert res.status_code == 200 and "2 instances queued for outbox" in res.text
    assert study not in res.text
    assert len(svc.repo.list_jobs(states=["queued"])) == 2
    assert ("resend", "root") in [(a, u) for _, a, u, _ in svc.repo.audit_events()]
    empty = admin.post("/destinations/resend", data={**form, "csrf": token, "uid": " "})
    assert empty.status_code == 200 and "give exactly one of study_uid or series_uid" in empty.text
