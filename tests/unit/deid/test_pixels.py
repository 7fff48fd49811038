"""burned_in_annotation = "clean": regions blacked out in every frame of every encoding, nothing else changed."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)

from deid_router.cli import main
from deid_router.deid.pixel_rules import RULE_KEYS, parse_rules, shipped_rules
from deid_router.errors import DeidError
from tests.support import pixeldata as px
from tests.unit.deid.helpers import make

KINDS = {  # name: (SOP class, colour, frames, BurnedInAnnotation)
    "us_rgb": (px.US_IMAGE, True, 1, "YES"),
    "us_mono": (px.US_IMAGE, False, 1, "YES"),
    "sc": (px.SC_IMAGE, True, 1, None),  # absent on a secondary capture: may carry text
    "us_cine": (px.US_MULTIFRAME, True, 4, "YES"),
}
_DCMTK = {  # output syntax -> the dcmtk tool that must decode it
    ExplicitVRLittleEndian: ["dcmj2pnm", "+Fa", "+on"],
    RLELossless: ["dcmdrle"],
    JPEGLSLossless: ["dcmdjpls"],
}


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is missing (scripts/run-tests installs it)")
        pytest.skip(f"{name} not installed")
    return path


def _dciodvfy_errors(path: Path) -> list[str]:
    out = subprocess.run([_tool("dciodvfy"), str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


@pytest.fixture()
def rules(tmp_path: Path) -> Path:
    p = tmp_path / "pixel-rules.toml"
    p.write_text(px.RULE_TOML, encoding="utf-8")
    return p


def _clean(src: Path, dst: Path, rules: Path, **kw: object) -> None:
    d = make(burned_in_annotation="clean", pixel_rules_file=rules, **kw)
    with open(dst, "wb") as fh:
        d.deidentify_file(src, fh)


def _band_mask(shape: tuple[int, ...]) -> np.ndarray:
    x0, y0, x1, y1 = px.BAND
    mask = np.zeros(shape, dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


@pytest.mark.parametrize("syntax", list(px.SYNTAXES))
@pytest.mark.parametrize("kind", list(KINDS))
def test_regions_black_in_every_frame_and_nothing_else_changes(
    kind: str, syntax: str, tmp_path: Path, rules: Path,
) -> None:
    sop, colour, frames, burned = KINDS[kind]
    images = [px.render(colour=colour, frame=i) for i in range(frames)]
    src = px.write(px.encode(px.dataset(images, sop_class=sop, burned_in=burned), syntax), tmp_path / "in.dcm")
    dst = tmp_path / "out.dcm"
    _clean(src, dst, rules)

    before, after = px.decoded(src), px.decoded(dst)
    assert after.shape == before.shape
    mask = _band_mask(before.shape[1:3])
    assert (after[:, mask] == 0).all(), "a pixel of the region is not black"
    assert np.array_equal(after[:, ~mask], before[:, ~mask]), "a pixel outside the region changed"
    assert (before[:, mask] != 0).any()  # the text was there to remove

    out = dcmread(dst)
    assert out.BurnedInAnnotation == "NO"
    codes = [(c.CodeValue, c.CodingSchemeDesignator, c.CodeMeaning) for c in out.DeidentificationMethodCodeSequence]
    assert ("113101", "DCM", "Clean Pixel Data Option") in codes
    assert any("Clean Pixel Data" in str(m) for m in
               (out.DeidentificationMethod if out["DeidentificationMethod"].VM > 1 else [out.DeidentificationMethod]))
    ts = out.file_meta.TransferSyntaxUID
    assert not ts.is_compressed or ts in (RLELossless, JPEGLSLossless, JPEG2000Lossless), "re-encoded lossily"
    if syntax == "jpeg":  # lossy input: re-encoded losslessly, its history kept
        assert ts == JPEGLSLossless
        assert out.LossyImageCompression == "01" and out.LossyImageCompressionMethod == "ISO_10918_1"
        if colour:
            assert out.PhotometricInterpretation == "RGB"  # what the decoder made of YBR_FULL_422
    else:
        assert ts == px.SYNTAXES[syntax]
    assert "PatientName" not in out or str(out.PatientName) != px.NAME

    tool = _DCMTK.get(ts)
    if tool is not None:  # dcmtk has no JPEG 2000 decoder; pydicom decoded it above
        res = subprocess.run([_tool(tool[0]), *tool[1:], str(dst), str(tmp_path / "dcmtk.out")],
                             capture_output=True, text=True, timeout=60, env={**os.environ, "TCP_NODELAY": "1"})
        assert res.returncode == 0, res.stderr
    assert len(_dciodvfy_errors(dst)) <= len(_dciodvfy_errors(src)), _dciodvfy_errors(dst)


@pytest.mark.parametrize("syntax", ["native", "jpeg"])
def test_no_matching_rule_quarantines(syntax: str, tmp_path: Path, rules: Path) -> None:
    ds = px.encode(px.dataset([px.render()], model="OTHER9"), syntax)
    src = px.write(ds, tmp_path / "in.dcm")
    with pytest.raises(DeidError) as err:
        _clean(src, tmp_path / "out.dcm", rules)
    assert err.value.reason == "burned_in_no_rule"


def test_shipped_rules_alone_quarantine_an_unknown_device(tmp_path: Path) -> None:
    src = px.write(px.dataset([px.render()]), tmp_path / "in.dcm")
    d = make(burned_in_annotation="clean")
    with pytest.raises(DeidError) as err, open(tmp_path / "out.dcm", "wb") as fh:
        d.deidentify_file(src, fh)
    assert err.value.reason == "burned_in_no_rule"


def test_shipped_rule_matches_its_device(tmp_path: Path) -> None:
    """The starter set cleans a Philips iU22 640x480 image (CTP's region [0,0,640,47])."""
    img = px.render(rows=480, cols=640)
    src = px.write(px.dataset([img], manufacturer="Philips Medical Systems", model="iU22"), tmp_path / "in.dcm")
    d = make(burned_in_annotation="clean")
    with open(tmp_path / "out.dcm", "wb") as fh:
        d.deidentify_file(src, fh)
    after = px.decoded(tmp_path / "out.dcm")[0]
    assert (after[:47] == 0).all() and np.array_equal(after[47:], img[47:])


def test_image_marked_clean_is_not_touched(tmp_path: Path, rules: Path) -> None:
    """BurnedInAnnotation NO: the header-only path, pixel bytes copied as they were."""
    src = px.write(px.dataset([px.render()], burned_in="NO"), tmp_path / "in.dcm")
    _clean(src, tmp_path / "out.dcm", rules)
    out = dcmread(tmp_path / "out.dcm")
    assert out.PixelData == dcmread(src).PixelData
    assert "113101" not in [c.CodeValue for c in out.DeidentificationMethodCodeSequence]


def test_quarantine_mode_is_unchanged(tmp_path: Path) -> None:
    src = px.write(px.dataset([px.render()]), tmp_path / "in.dcm")
    with pytest.raises(DeidError) as err, open(tmp_path / "out.dcm", "wb") as fh:
        make().deidentify_file(src, fh)
    assert err.value.reason == "burned_in_annotation"


def _native(arr: np.ndarray, photometric: str, planar: int = 0, signed: bool = False, bits: int = 8,
            ts: str = ExplicitVRLittleEndian) -> Dataset:
    ds = px.dataset([px.render()])
    frames = arr  # (frames, rows, columns[, samples])
    ds.NumberOfFrames = frames.shape[0]
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = px.US_MULTIFRAME
    ds.SamplesPerPixel = 3 if frames.ndim == 4 else 1
    ds.PhotometricInterpretation = photometric
    if ds.SamplesPerPixel == 1 and "PlanarConfiguration" in ds:
        del ds.PlanarConfiguration
    if ds.SamplesPerPixel == 3:
        ds.PlanarConfiguration = planar
    ds.BitsAllocated = arr.dtype.itemsize * 8
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = int(signed)
    if planar:
        ds.PixelData = frames.transpose(0, 3, 1, 2).tobytes()
    else:
        ds.PixelData = frames.astype(frames.dtype.newbyteorder(">" if ts == ExplicitVRBigEndian else "<")).tobytes()
    ds.file_meta.TransferSyntaxUID = ts
    return ds


def _variants() -> dict[str, tuple[Dataset, tuple[int, ...]]]:
    rgb = np.stack([px.render(frame=i) for i in range(2)])
    mono = np.stack([px.render(colour=False, frame=i) for i in range(2)])
    m16 = (mono.astype(np.int16) * 16 - 2000).astype(np.int16)
    out: dict[str, tuple[Dataset, tuple[int, ...]]] = {
        "rgb_planar1": (_native(rgb, "RGB", planar=1), (0, 0, 0)),
        "ybr_full": (_native(rgb, "YBR_FULL"), (0, 128, 128)),
        "mono16_signed_12bit": (_native(m16, "MONOCHROME2", signed=True, bits=12), (-2048,)),
        "mono1": (_native(mono, "MONOCHROME1"), (255,)),
        "mono16_big_endian": (_native(mono.astype(np.uint16) * 200, "MONOCHROME2", bits=16, ts=ExplicitVRBigEndian), (0,)),
        "mono_implicit": (_native(mono, "MONOCHROME2", ts=ImplicitVRLittleEndian), (0,)),
    }
    pal = _native(mono, "PALETTE COLOR")
    lut = np.arange(256, dtype=np.uint16) * 257
    for c in ("Red", "Green", "Blue"):
        setattr(pal, f"{c}PaletteColorLookupTableDescriptor", [256, 0, 16])
        setattr(pal, f"{c}PaletteColorLookupTableData", lut.tobytes())
    out["palette"] = (pal, (0,))
    return out


@pytest.mark.parametrize("variant", list(_variants()))
def test_native_variants_cleaned_in_their_stored_bytes(variant: str, tmp_path: Path, rules: Path) -> None:
    ds, black = _variants()[variant]
    src = tmp_path / "in.dcm"
    ts = ds.file_meta.TransferSyntaxUID
    ds.set_original_encoding(ts.is_implicit_VR, ts.is_little_endian, ds.original_character_set)
    ds.save_as(src, enforce_file_format=True)
    dst = tmp_path / "out.dcm"
    _clean(src, dst, rules)
    before = dcmread(src)
    after = dcmread(dst)
    assert after.file_meta.TransferSyntaxUID == before.file_meta.TransferSyntaxUID
    assert len(after.PixelData) == len(before.PixelData)
    b = before.pixel_array
    a = after.pixel_array
    raw = {"raw": True} if variant == "ybr_full" else {}
    if raw:
        from pydicom.pixels import pixel_array

        b, a = pixel_array(src, **raw), pixel_array(dst, **raw)
    mask = _band_mask(b.shape[1:3])
    assert (a[:, mask] == np.array(black, dtype=a.dtype)).all()
    assert np.array_equal(a[:, ~mask], b[:, ~mask])


def test_dataset_in_memory_and_deflated_file_are_cleaned(tmp_path: Path, rules: Path) -> None:
    img = px.render()
    ds = px.dataset([img])
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    src = tmp_path / "in.dcm"
    ds.save_as(src, enforce_file_format=True)
    dst = tmp_path / "out.dcm"
    _clean(src, dst, rules)
    a = dcmread(dst).pixel_array
    assert (a[:40] == 0).all() and np.array_equal(a[40:], img[40:])
    out = make(burned_in_annotation="clean", pixel_rules_file=rules).deidentify(dcmread(src))
    assert out.BurnedInAnnotation == "NO" and (out.pixel_array[:40] == 0).all()


def test_crop_keeps_only_the_box(tmp_path: Path) -> None:
    rules = tmp_path / "crop.toml"
    rules.write_text(px.RULE_TOML.replace("regions = [[0, 0, 320, 40]]", "regions = [[0, 0, 320, 40]]\ncrop = [10, 40, 310, 230]"))
    for syntax in ("native", "jpegls"):
        img = px.render()
        ds = px.dataset([img])
        region = Dataset()
        region.RegionLocationMinX0, region.RegionLocationMinY0 = 0, 30
        region.RegionLocationMaxX1, region.RegionLocationMaxY1 = 319, 239
        ds.SequenceOfUltrasoundRegions = [region]
        src = px.write(px.encode(ds, syntax), tmp_path / f"{syntax}.dcm")
        dst = tmp_path / f"{syntax}-out.dcm"
        _clean(src, dst, rules)
        out = dcmread(dst)
        assert (out.Rows, out.Columns) == (190, 300)
        assert np.array_equal(out.pixel_array, img[40:230, 10:310])
        r = out.SequenceOfUltrasoundRegions[0]  # the calibration region follows the crop
        assert (r.RegionLocationMinX0, r.RegionLocationMinY0, r.RegionLocationMaxX1, r.RegionLocationMaxY1) == (0, 0, 299, 189)


def test_rules_file_validation_names_each_problem() -> None:
    bad = {"rules": [
        {"name": "a", "regions": [[0, 0, 700, 10]], "rows": 480, "columns": 640, "colour": "x"},
        {"regions": [[5, 5, 1, 1]]},
        {"name": "c", "regions": [[0, 0, 10, 10]], "verify": "maybe"},
        {"name": "d"},
    ]}
    _, problems = parse_rules(bad, "f.toml")
    text = "\n".join(f"{k}: {r}" for _, k, r in problems)
    assert "rules[0].colour: unknown key" in text
    assert "rules[0].regions[0]: x1 700 is outside the image (columns = 640)" in text
    assert "rules[1].name: is required" in text and "rules[1].regions[0]" in text
    assert "rules[2].verify" in text and "rules[3].regions: a rule needs at least one region" in text


def test_shipped_rules_are_valid_and_record_their_source() -> None:
    rules = shipped_rules()
    assert len(rules) >= 10
    assert all(r.source.startswith("CTP DicomPixelAnonymizer.script") for r in rules)
    assert {"name", "regions", "crop", "verify"} <= set(RULE_KEYS)


CONFIG = """
[storage]
root = "var"
[deid]
secret_file = "var/secret.key"
burned_in_annotation = "clean"
pixel_rules_file = "rules.toml"
[[destinations]]
name = "outbox"
type = "folder"
path = "var/outbox"
[[routes]]
name = "default"
destinations = ["outbox"]
"""


def test_check_config_validates_the_rules_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "router.toml"
    cfg.write_text(CONFIG)
    (tmp_path / "rules.toml").write_text(px.RULE_TOML)
    assert main(["check-config", "--config", str(cfg)]) == 0
    (tmp_path / "rules.toml").write_text(px.RULE_TOML.replace("[[0, 0, 320, 40]]", "[[0, 0, 320, 400]]") + "\nbogus = 1\n")
    assert main(["check-config", "--config", str(cfg)]) == 2
    out = capsys.readouterr()
    text = out.out + out.err
    assert "deid.pixel_rules_file rules[0].regions[0]" in text and "outside the image (rows = 240)" in text
    cfg.write_text(CONFIG.replace('burned_in_annotation = "clean"', 'burned_in_annotation = "clean"\npixel_no_rule = "ocr_clear"'))
    (tmp_path / "rules.toml").write_text(px.RULE_TOML)
    assert main(["check-config", "--config", str(cfg)]) == 2
    assert "needs deid.pixel_ocr = true" in "".join(capsys.readouterr())


def test_dry_run_preview_writes_before_and_after_pngs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from PIL import Image

    cfg = tmp_path / "router.toml"
    cfg.write_text(CONFIG)
    (tmp_path / "rules.toml").write_text(px.RULE_TOML)
    inp = tmp_path / "in"
    inp.mkdir()
    px.write(px.encode(px.dataset([px.render()]), "jpeg"), inp / "us.dcm")
    px.write(px.dataset([px.render()], model="OTHER9"), inp / "unknown.dcm")
    prev = tmp_path / "preview"
    code = main(["deidentify", "--config", str(cfg), str(inp), "--out", str(tmp_path / "out"),
                 "--dry-run", "--preview", str(prev)])
    text = capsys.readouterr().out
    assert code == 0, text
    assert not (tmp_path / "out").exists()
    assert "rule 'ACME SONO1 header band': before/after written" in text
    assert "burned_in_no_rule: before image only" in text
    us = sorted(prev.glob("*-us.*.png"))
    assert [p.name.split(".", 1)[1] for p in us] == ["after.png", "before.png"]
    assert not list(prev.glob("*-unknown.after.png")) and list(prev.glob("*-unknown.before.png"))
    for p in prev.iterdir():
        assert p.stat().st_mode & 0o777 == 0o600
    before = np.asarray(Image.open(next(prev.glob("*-us.before.png"))))
    after = np.asarray(Image.open(next(prev.glob("*-us.after.png"))))
    assert (before[39, 5:300] == [255, 0, 0]).all()  # the region's outline, in red
    assert (after[2:38, 2:318] == 0).all()  # inside the outline: black
    assert (before[2:38, 2:318] > 200).any()  # the text, before
    assert main(["deidentify", "--config", str(cfg), str(inp), "--out", str(tmp_path / "out"),
                 "--preview", str(prev)]) == 2


_OTHER = {  # input made by: (tool args or "pydicom:<uid>", expected output syntax, lossy input)
    "jpeg_lossless_sv1": (["dcmcjpeg", "+e1"], ExplicitVRLittleEndian, False),
    "jpeg_lossless": (["dcmcjpeg", "+el"], ExplicitVRLittleEndian, False),
    "jpeg_baseline_dcmtk": (["dcmcjpeg", "+eb"], JPEGLSLossless, True),
    "jpeg_extended_dcmtk": (["dcmcjpeg", "+ee"], JPEGLSLossless, True),
    "jpegls_near_lossless": (["dcmcjpls", "+en"], JPEGLSLossless, True),
    "j2k_lossy": (["pydicom:1.2.840.10008.1.2.4.91"], JPEG2000Lossless, True),
}


@pytest.mark.parametrize("colour", [True, False], ids=["rgb", "mono"])
@pytest.mark.parametrize("kind", list(_OTHER))
def test_other_encodings_cleaned_without_further_loss(kind: str, colour: bool, tmp_path: Path, rules: Path) -> None:
    make_with, want_ts, lossy = _OTHER[kind]
    native = px.write(px.dataset([px.render(colour=colour, frame=i) for i in range(2)], sop_class=px.US_MULTIFRAME),
                      tmp_path / "native.dcm")
    src = tmp_path / "in.dcm"
    if make_with[0].startswith("pydicom:"):
        ds = dcmread(native)
        ds.compress(make_with[0].split(":", 1)[1], j2k_cr=[20])
        ds.save_as(src, enforce_file_format=True)
    else:
        res = subprocess.run([_tool(make_with[0]), *make_with[1:], str(native), str(src)], capture_output=True,
                             text=True, timeout=60)
        assert res.returncode == 0, res.stderr
    dst = tmp_path / "out.dcm"
    _clean(src, dst, rules)
    before, after = px.decoded(src), px.decoded(dst)
    mask = _band_mask(before.shape[1:3])
    assert (after[:, mask] == 0).all()
    assert np.array_equal(after[:, ~mask], before[:, ~mask])
    out = dcmread(dst)
    assert out.file_meta.TransferSyntaxUID == want_ts
    if lossy:
        assert out.LossyImageCompression == "01"
    assert len(_dciodvfy_errors(dst)) <= len(_dciodvfy_errors(src)), _dciodvfy_errors(dst)


@pytest.mark.parametrize("syntax", ["rle", "jpegls", "j2k"])
def test_signed_16_bit_compressed(syntax: str, tmp_path: Path, rules: Path) -> None:
    ds, black = _variants()["mono16_signed_12bit"]
    ds.compress(px.SYNTAXES[syntax])
    src = tmp_path / "in.dcm"
    ds.save_as(src, enforce_file_format=True)
    dst = tmp_path / "out.dcm"
    _clean(src, dst, rules)
    before, after = px.decoded(src), px.decoded(dst)
    mask = _band_mask(before.shape[1:3])
    assert (after[:, mask] == black[0]).all()
    assert np.array_equal(after[:, ~mask], before[:, ~mask])
    assert dcmread(dst).file_meta.TransferSyntaxUID == px.SYNTAXES[syntax]


def test_native_ybr_full_422_written_as_ybr_full(tmp_path: Path, rules: Path) -> None:
    from pydicom.pixels import convert_color_space, pixel_array

    rgb = px.render()
    ybr = convert_color_space(rgb, "RGB", "YBR_FULL")
    y, cb, cr = ybr[..., 0], ybr[..., 1], ybr[..., 2]
    packed = np.empty((240, 160, 4), dtype=np.uint8)  # Y0 Y1 Cb Cr per pair of pixels
    packed[..., 0], packed[..., 1] = y[:, 0::2], y[:, 1::2]
    packed[..., 2], packed[..., 3] = cb[:, 0::2], cr[:, 0::2]
    ds = px.dataset([rgb])
    ds.PhotometricInterpretation = "YBR_FULL_422"
    ds.PixelData = packed.tobytes()
    src = px.write(ds, tmp_path / "in.dcm")
    dst = tmp_path / "out.dcm"
    _clean(src, dst, rules)
    out = dcmread(dst)
    assert out.PhotometricInterpretation == "YBR_FULL" and out.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    before, after = pixel_array(src, raw=True), pixel_array(dst, raw=True)
    mask = _band_mask(before.shape[:2])
    assert (after[mask] == [0, 128, 128]).all()
    assert np.array_equal(after[~mask], before[~mask])


def test_configured_fill_value(tmp_path: Path) -> None:
    rules = tmp_path / "fill.toml"
    rules.write_text(px.RULE_TOML + "fill = 77\n")
    img = px.render(colour=False)
    src = px.write(px.dataset([img]), tmp_path / "in.dcm")
    _clean(src, tmp_path / "out.dcm", rules)
    out = px.decoded(tmp_path / "out.dcm")[0]
    assert (out[:40] == 77).all() and np.array_equal(out[40:], img[40:])


def test_corrupt_compressed_pixels_quarantine(tmp_path: Path, rules: Path) -> None:
    from pydicom.encaps import encapsulate

    ds = px.encode(px.dataset([px.render()]), "jpeg")
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xdb" + b"\x00" * 500])  # a JPEG that stops after a marker
    src = px.write(ds, tmp_path / "in.dcm")
    with pytest.raises(DeidError) as err:
        _clean(src, tmp_path / "out.dcm", rules)
    assert err.value.reason == "pixel_decode_failed"


def test_video_cine_is_quarantined_not_forwarded(tmp_path: Path, rules: Path) -> None:
    """MPEG-4/H.264 cines cannot be decoded frame by frame here: quarantined, never sent as they are."""
    from pydicom.encaps import encapsulate
    from pydicom.uid import MPEG4HP41

    ds = px.dataset([px.render()])
    ds.PixelData = encapsulate([b"\x00\x00\x01\xb3" + b"\x00" * 100])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = MPEG4HP41
    src = px.write(ds, tmp_path / "in.dcm")
    with pytest.raises(DeidError) as err:
        _clean(src, tmp_path / "out.dcm", rules)
    assert err.value.reason == "pixel_unsupported"
