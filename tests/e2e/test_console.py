"""The console in a real headless Chromium (Debian's chromium + chromedriver, driven by selenium)
against a real node that dcmtk's storescu sends a study to.

Screenshots of each step go to ``artifacts/console/`` (git-ignored; CI keeps them).
"""

from __future__ import annotations

import csv
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver

from tests.conftest import missing, require_tool
from tests.support.corpus import make_series, synthetic_patient
from tests.support.peers import StoreSCP, storescu, storescu_acknowledged
from tests.support.router import REPO, RouterProcess, dicom_destination, free_port, wait_until

pytestmark = pytest.mark.e2e

ARTIFACTS = REPO / "artifacts" / "console"
ADMIN = ("admin", "admin-password")
VIEWER = ("viewer", "viewer-password")


@pytest.fixture
def browser() -> Iterator[WebDriver]:
    chromium = require_tool("chromium")
    driver_path = require_tool("chromedriver")
    opts = webdriver.ChromeOptions()
    opts.binary_location = str(Path("/usr/lib/chromium/chromium")) if Path("/usr/lib/chromium/chromium").exists() else str(chromium)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1000", "--no-first-run", "--disable-extensions"):
        opts.add_argument(arg)
    try:
        driver = webdriver.Chrome(service=Service(str(driver_path)), options=opts)
    except Exception as exc:  # selenium's WebDriverException: the browser did not start
        missing(f"headless Chromium did not start: {type(exc).__name__}: {str(exc)[:300]}")
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def _shot(driver: WebDriver, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(ARTIFACTS / f"{name}.png"))


def _text(driver: WebDriver, css: str) -> str:
    return str(driver.find_element(By.CSS_SELECTOR, css).text).strip()


def _until(driver: WebDriver, check: Callable[[], bool], what: str) -> None:
    """Wait for ``check``; a page still loading (stale or missing element) counts as not yet."""

    def safe() -> bool:
        try:
            return check()
        except WebDriverException:
            return False

    wait_until(safe, 20, what=what)


def _mapping(path: Path, patient_ids: list[str]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["PatientID", "SubjectID"])
        for i, pid in enumerate(patient_ids):
            w.writerow([pid, f"SUBJ-{i:03d}"])


def test_console_login_dashboard_release_and_pause(tmp_path: Path, storescp: StoreSCP, browser: WebDriver) -> None:
    # A study of 3 instances of a mapped patient, and one instance of a patient missing from
    # patient_mapping_csv: quarantined (unmapped_patient) for both destinations.
    study = make_series(tmp_path / "in" / "study", 3, rows=16, cols=16, seed=0)
    stray = make_series(tmp_path / "in" / "stray", 1, rows=16, cols=16, seed=1)
    mapped, unmapped = synthetic_patient(0, 0)[0], synthetic_patient(0, 1)[0]
    mapping = tmp_path / "mapping.csv"
    _mapping(mapping, [mapped])
    router = RouterProcess(
        tmp_path / "router",
        [dicom_destination("pacs", storescp.port, storescp.ae_title), {"name": "outbox", "type": "folder", "path": "var/outbox"}],
        deid={"patient_mapping_csv": str(mapping)},
        http={"port": free_port()},
    )
    router.add_user(ADMIN[0], "admin", ADMIN[1])
    router.add_user(VIEWER[0], "viewer", VIEWER[1])
    with router:
        res = storescu("127.0.0.1", router.port, [tmp_path / "in"])
        assert storescu_acknowledged(res) == 4, res.stdout[-2000:]
        router.wait_idle_api(VIEWER, 60, expect_done=6)
        url = router.http_url

        # No login: 401 from the API and the console (the console's 401 is the login form).
        assert httpx.get(url + "/api/v1/status").status_code == 401
        browser.get(url + "/")
        assert browser.find_element(By.ID, "login")  # the login form, answered with 401
        _shot(browser, "01-login")
        browser.find_element(By.ID, "username").send_keys(ADMIN[0])
        browser.find_element(By.ID, "password").send_keys(ADMIN[1])
        browser.find_element(By.ID, "login").click()
        _until(browser, lambda: "Dashboard" in browser.title, "the dashboard")
        for dest in ("pacs", "outbox"):
            assert _text(browser, f"#dest-{dest} .count-done") == "3"
            assert _text(browser, f"#dest-{dest} .count-failed") == "1"
            assert _text(browser, f"#dest-{dest} .pause-state") == "no"
        assert _text(browser, "#quarantined") == "2"
        _shot(browser, "02-dashboard")

        browser.get(url + "/quarantine")
        rows = browser.find_elements(By.CSS_SELECTOR, "#quarantine tr[id^=entry-]")
        assert len(rows) == 2 and all("unmapped_patient" in r.text for r in rows)
        pacs_entry = next(r for r in rows if "pacs" in r.text).get_attribute("id").removeprefix("entry-")
        _shot(browser, "03-quarantine")

        # A viewer may look but not release.
        viewer_release = httpx.post(f"{url}/api/v1/quarantine/{pacs_entry}/release", auth=VIEWER, json={})
        assert viewer_release.status_code == 403

        # The operator fixes the mapping and restarts the node; the browser session survives.
        _mapping(mapping, [mapped, unmapped])
        assert router.terminate() == 0
        router.start()
        browser.get(f"{url}/quarantine/{pacs_entry}")
        browser.find_element(By.ID, "release").click()
        _until(browser, lambda: "Are you sure" in _text(browser, "#confirm-text"), "the confirmation")
        _shot(browser, "04-release-confirm")
        browser.find_element(By.ID, "confirm").click()
        _until(browser, lambda: _text(browser, "#entry-state").startswith("released"), "the release")
        router.wait_idle_api(VIEWER, 60, expect_done=7)
        assert len(storescp.sop_instance_uids()) == 4  # the released instance was delivered
        browser.get(url + "/")
        assert _text(browser, "#dest-pacs .count-done") == "4"
        assert _text(browser, "#dest-outbox .count-done") == "3"
        assert _text(browser, "#quarantined") == "1"
        _shot(browser, "05-dashboard-after-release")

        # Pause and resume the PACS.
        browser.get(url + "/destinations")
        browser.find_element(By.CSS_SELECTOR, "#dest-pacs input[name=reason]").send_keys("PACS upgrade")
        browser.find_element(By.CSS_SELECTOR, "#dest-pacs button.pause").click()
        _until(browser, lambda: "paused" in _text(browser, "#dest-pacs .pause-state"), "the pause")
        assert "PACS upgrade" in _text(browser, "#dest-pacs .pause-state")
        assert router.api_status(VIEWER)["paused"] == ["pacs"]
        browser.get(url + "/")
        assert _text(browser, "#dest-pacs .pause-state").startswith("paused")
        _shot(browser, "06-paused")
        browser.get(url + "/destinations")
        browser.find_element(By.CSS_SELECTOR, "#dest-pacs button.echo").click()
        _until(browser, lambda: _text(browser, "#echo-result") == "pacs: echo answered 0x0000", "the C-ECHO")
        browser.find_element(By.CSS_SELECTOR, "#dest-pacs button.resume").click()
        _until(browser, lambda: _text(browser, "#dest-pacs .pause-state") == "sending", "the resume")
        assert router.api_status(VIEWER)["paused"] == []

        browser.get(url + "/audit")
        audit = _text(browser, "#audit")
        for action in ("login", "quarantine_release", "destination_pause", "destination_resume"):
            assert f"{action} admin" in audit, audit
        _shot(browser, "07-audit")
        # The rule dry-run (admin only): routes and the engine's before/after of a file.
        browser.get(url + "/dryrun")
        browser.find_element(By.ID, "file").send_keys(str(study[0]))
        browser.find_element(By.ID, "run").click()
        _until(browser, lambda: bool(browser.find_elements(By.ID, "diff")), "the dry-run table")
        assert _text(browser, "#routes") == "Routed to: pacs, outbox"
        assert "PatientID" in _text(browser, "#diff")
        _shot(browser, "08-dry-run")
        browser.find_element(By.ID, "logout").click()
        _until(browser, lambda: "Log in" in browser.title, "the logout")
        browser.get(url + "/")
        assert browser.find_elements(By.ID, "login")
        assert router.terminate() == 0
    assert sorted(p.name for p in ARTIFACTS.glob("0*.png"))[:1] == ["01-login.png"]
    shutil.rmtree(tmp_path / "in")
