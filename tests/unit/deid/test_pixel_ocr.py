"""deid.pixel_ocr: Tesseract reads the cleaned pixels; what it must not read quarantines."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread

from deid_router.deid import ocr
from deid_router.errors import DeidError
from tests.support import pixeldata as px
from tests.unit.deid.helpers import make

if shutil.which("tesseract") is None:
    if os.environ.get("CI"):
        raise RuntimeError("tesseract is missing (scripts/run-tests installs tesseract-ocr)")
    pytest.skip("tesseract not installed", allow_module_level=True)


def _texts(img: np.ndarray) -> str:
    return " ".join(w.text.upper() for w in ocr.words(img) if w.confidence >= ocr.MIN_CONFIDENCE)


def _rules(tmp_path: Path, verify: str | None = None) -> Path:
    p = tmp_path / "rules.toml"
    p.write_text(px.RULE_TOML + (f'verify = "{verify}"\n' if verify else ""), encoding="utf-8")
    return p


def _run(src: Path, dst: Path, rules: Path | None, **kw: object) -> None:
    d = make(burned_in_annotation="clean", pixel_rules_file=rules, pixel_ocr=True, **kw)
    with open(dst, "wb") as fh:
        d.deidentify_file(src, fh)


@pytest.mark.parametrize("syntax", ["native", "jpeg"])
def test_name_read_before_cleaning_and_not_after(syntax: str, tmp_path: Path) -> None:
    src = px.write(px.encode(px.dataset([px.render()]), syntax), tmp_path / "in.dcm")
    assert "ZEBRAFINCH" in _texts(px.decoded(src)[0])
    dst = tmp_path / "out.dcm"
    _run(src, dst, _rules(tmp_path))  # OCR verified the cleaned pixels: forwarded
    assert "ZEBRAFINCH" not in _texts(px.decoded(dst)[0])
    assert dcmread(dst).BurnedInAnnotation == "NO"


def test_name_outside_the_regions_quarantines(tmp_path: Path) -> None:
    img = px.render(elsewhere="ZEBRAFINCH")
    src = px.write(px.dataset([img]), tmp_path / "in.dcm")
    with pytest.raises(DeidError) as err:
        _run(src, tmp_path / "out.dcm", _rules(tmp_path))
    assert err.value.reason == "burned_in_text_found"


def test_strict_refuses_any_text_outside_the_regions(tmp_path: Path) -> None:
    src = px.write(px.dataset([px.render(elsewhere="LIVER LEFT LOBE")]), tmp_path / "in.dcm")
    _run(src, tmp_path / "ok.dcm", _rules(tmp_path))  # not an identifier: forwarded by default
    with pytest.raises(DeidError) as err:
        _run(src, tmp_path / "out.dcm", _rules(tmp_path, verify="strict"))
    assert err.value.reason == "burned_in_text_found"


def test_no_rule_ocr_clear_forwards_only_an_image_without_text(tmp_path: Path) -> None:
    blank = px.write(px.dataset([px.render(text="")], model="OTHER9"), tmp_path / "blank.dcm")
    out = tmp_path / "blank-out.dcm"
    _run(blank, out, None, pixel_no_rule="ocr_clear")
    assert dcmread(out).PixelData == dcmread(blank).PixelData  # forwarded untouched
    texty = px.write(px.dataset([px.render()], model="OTHER9"), tmp_path / "texty.dcm")
    with pytest.raises(DeidError) as err:
        _run(texty, tmp_path / "texty-out.dcm", None, pixel_no_rule="ocr_clear")
    assert err.value.reason == "burned_in_text_found"
    with pytest.raises(DeidError) as err:  # the default never forwards without a rule
        _run(blank, tmp_path / "x.dcm", None)
    assert err.value.reason == "burned_in_no_rule"
