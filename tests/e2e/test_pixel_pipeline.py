"""Pixel cleaning through a real node: storescu -> deid-router (burned_in_annotation = "clean") -> folder."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.pixels import iter_pixels

from tests.support import pixeldata as px
from tests.support.peers import storescu, storescu_acknowledged
from tests.support.procmon import RssSampler
from tests.support.router import RouterProcess

pytestmark = pytest.mark.e2e
RSS_LIMIT_MB = 300.0


def _router(tmp_path: Path, **deid: object) -> RouterProcess:
    work = tmp_path / "router"
    work.mkdir(parents=True)
    (work / "rules.toml").write_text(px.RULE_TOML.replace("rows = 240\ncolumns = 320\n", "").replace("320, 40]]", "640, 40]]"), encoding="utf-8")
    return RouterProcess(
        work, [{"name": "outbox", "type": "folder", "path": "var/outbox"}],
        deid={"burned_in_annotation": "clean", "pixel_rules_file": "rules.toml", **deid},
        queue={"workers": 1}, env={"TCP_NODELAY": "1"},
    )


def _outbox(router: RouterProcess) -> list[Path]:
    return sorted((router.workdir / "var" / "outbox").rglob("*.dcm"))


def test_cleaned_through_a_node_and_unknown_device_quarantined(tmp_path: Path) -> None:
    inp = tmp_path / "in"
    inp.mkdir()
    cases = {
        "us_jpeg": px.encode(px.dataset([px.render()]), "jpeg"),
        "cine_rle": px.encode(px.dataset([px.render(frame=i) for i in range(3)], sop_class=px.US_MULTIFRAME), "rle"),
        "sc_native": px.dataset([px.render(colour=False)], sop_class=px.SC_IMAGE, burned_in=None),
        "unknown": px.dataset([px.render()], model="OTHER9"),
    }
    before = {}
    for name, ds in cases.items():
        px.write(ds, inp / f"{name}.dcm")
        before[str(ds.SOPInstanceUID)] = px.decoded(inp / f"{name}.dcm")
    router = _router(tmp_path)
    with router:
        res = storescu("127.0.0.1", router.port, [inp])
        assert storescu_acknowledged(res) == 4, res.stdout[-2000:]
        status = router.wait_idle(60)
        assert status["jobs"]["done"] == 3 and status["quarantined"] == 1, status
        assert "burned_in_no_rule" in router.cli("quarantine", "list").stdout
    files = _outbox(router)
    assert len(files) == 3
    from deid_router.deid.keys import Keys

    keys = Keys.load_or_create(router.secret_path)
    by_uid = {keys.uid(uid): arr for uid, arr in before.items()}
    for f in files:
        ds = pydicom.dcmread(f)
        assert ds.BurnedInAnnotation == "NO"
        assert "113101" in [c.CodeValue for c in ds.DeidentificationMethodCodeSequence]
        a, b = px.decoded(f), by_uid[str(ds.SOPInstanceUID)]
        assert (a[:, 0:40] == 0).all() and np.array_equal(a[:, 40:], b[:, 40:])
        assert px.NAME.encode() not in f.read_bytes()


def _big_cine_through_node(tmp_path: Path, frames: int, timeout: float) -> None:
    src_dir = tmp_path / "big"
    src_dir.mkdir()
    src = src_dir / "cine.dcm"
    px.write_big_cine(src, frames)
    router = _router(tmp_path)
    try:
        router.start()
        assert router.proc is not None
        sampler = RssSampler(router.proc.pid, interval=0.1).start()
        try:
            time.sleep(3.0)  # the worker's imports are part of the baseline
            baseline = sampler.peak_sum_mb
            res = storescu("127.0.0.1", router.port, [src], timeout=timeout, extra=["-ts", str(int(timeout))])
            assert storescu_acknowledged(res) == 1, res.stdout[-2000:] + res.stderr[-2000:]
            router.wait_idle(timeout, expect_done=1)
        finally:
            sampler.stop()
        files = _outbox(router)
        assert len(files) == 1
        base = px.render(rows=480, cols=640)
        n = 0
        for i, arr in enumerate(iter_pixels(files[0])):  # one frame at a time here too
            want = px.big_cine_frame(base, i)
            assert (arr[:40] == 0).all() and np.array_equal(arr[40:], want[40:]), f"frame {i}"
            n += 1
        assert n == frames
        size_mb = src.stat().st_size / 2**20
        print(f"\n{size_mb:.0f} MiB cine ({frames} frames) cleaned: node peak RSS {sampler.peak_sum_mb:.0f} MB "
              f"(baseline {baseline:.0f} MB)")
        assert sampler.peak_sum_mb < RSS_LIMIT_MB, (sampler.peak_sum_mb, sampler.hwm_kb)
        # frame by frame: the growth is a few frames, not the instance
        assert sampler.peak_sum_mb - baseline < min(100.0, size_mb / 4), (baseline, sampler.peak_sum_mb)
    finally:
        router.stop()
        shutil.rmtree(src_dir, ignore_errors=True)
        shutil.rmtree(router.workdir / "var", ignore_errors=True)


@pytest.mark.timeout(600)
def test_200mb_cine_cleaned_frame_by_frame_under_300mb(tmp_path: Path) -> None:
    _big_cine_through_node(tmp_path, frames=228, timeout=300)  # 200 MiB of 640x480 RGB


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_1gb_cine_cleaned_frame_by_frame_under_300mb(tmp_path: Path) -> None:
    _big_cine_through_node(tmp_path, frames=1166, timeout=1200)  # 1 GiB


def test_ocr_in_the_workers_quarantines_a_name_left_outside_the_regions(tmp_path: Path) -> None:
    inp = tmp_path / "in"
    inp.mkdir()
    px.write(px.dataset([px.render()]), inp / "clean.dcm")
    px.write(px.dataset([px.render(elsewhere="ZEBRAFINCH")]), inp / "leaky.dcm")
    router = _router(tmp_path, pixel_ocr=True)
    with router:
        res = storescu("127.0.0.1", router.port, [inp])
        assert storescu_acknowledged(res) == 2, res.stdout[-2000:]
        status = router.wait_idle(120)
        assert status["jobs"]["done"] == 1 and status["quarantined"] == 1, status
        assert "burned_in_text_found" in router.cli("quarantine", "list").stdout
    files = _outbox(router)
    assert len(files) == 1 and px.NAME.encode() not in files[0].read_bytes()
