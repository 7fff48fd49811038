"""Offline `deidentify --profile`: the same engine, options and scope as a route naming it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pydicom

from deid_router.deid.keys import Keys
from tests.support.corpus import make_series

REPO = Path(__file__).resolve().parents[2]
CONFIG = """
[storage]
root = "var"
[deid]
secret_file = "var/secret.key"
[profiles.trial]
options = ["retain_long_modified_dates"]
scope = "trial"
pseudonym_prefix = "TRIAL-"
[[destinations]]
name = "outbox"
type = "folder"
path = "var/outbox"
[[routes]]
name = "all"
destinations = ["outbox"]
profile = "trial"
"""


def _cli(*args: str, config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "deid_router", *args, "--config", str(config)],
                          capture_output=True, text=True, cwd=REPO, timeout=300, env=dict(os.environ))


def test_offline_deidentify_with_a_profile_uses_its_scope(tmp_path: Path) -> None:
    config = tmp_path / "router.toml"
    config.write_text(CONFIG, encoding="utf-8")
    inputs = make_series(tmp_path / "in", 2, rows=16, cols=16)
    res = _cli("deidentify", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--workers", "1",
               "--profile", "trial", config=config)
    assert res.returncode == 0, res.stderr
    keys = Keys.load_or_create(tmp_path / "var" / "secret.key").for_scope("trial")
    originals = [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in inputs]
    outputs = {p.stem: pydicom.dcmread(p, stop_before_pixels=True) for p in (tmp_path / "out").rglob("*.dcm")}
    assert set(outputs) == {keys.uid(u) for u in originals}
    assert all(str(ds.PatientID).startswith("TRIAL-") and ds.StudyDate for ds in outputs.values())

    bad = _cli("deidentify", str(tmp_path / "in"), "--out", str(tmp_path / "out2"), "--profile", "trail",
               config=config)
    assert bad.returncode == 2 and "--profile" in bad.stderr and not (tmp_path / "out2").exists()
