"""pydicom's bundled files: references resolve, pixels identical, dciodvfy no worse."""

from __future__ import annotations

import os
import shutil
import subprocess
import warnings
from pathlib import Path

import pydicom
import pytest
from pydicom.filewriter import dcmwrite

from deid_router.deid.keys import Keys
from tests.unit.deid.helpers import SECRET, make

FILES = Path(os.path.dirname(pydicom.data.__file__)) / "test_files"
NAMES = ["CT_small.dcm", "MR_small.dcm", "rtplan.dcm", "rtdose.dcm", "JPEG2000.dcm", "SC_rgb_rle.dcm",
         "waveform_ecg.dcm", "test-SR.dcm", "MR_small_bigendian.dcm", "image_dfl.dcm", "emri_small_RLE.dcm",
         "emri_small_jpeg_2k_lossless.dcm"]
PRESENT = [n for n in NAMES if (FILES / n).exists()]


def _options(name: str) -> tuple[str, ...]:
    return ("clean_structured_content",) if "SR" in name else ()


def _errors(path: Path) -> int:
    tool = shutil.which("dciodvfy")
    assert tool is not None
    res = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=60)
    return sum(1 for line in (res.stdout + res.stderr).splitlines() if line.startswith("Error"))


def _read(path: Path) -> pydicom.Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(path, force=True)


@pytest.mark.parametrize("name", PRESENT)
def test_file_fast_path(name: str, tmp_path: Path) -> None:
    d = make(_options(name), burned_in_annotation="forward")
    out_path = tmp_path / name
    with open(out_path, "wb") as fh:
        result = d.deidentify_file(FILES / name, fh)
    src, out = _read(FILES / name), _read(out_path)
    assert out.preamble == b"\0" * 128
    assert out.file_meta.TransferSyntaxUID == src.file_meta.TransferSyntaxUID == result.transfer_syntax_uid
    assert result.sop_instance_uid == out.SOPInstanceUID == Keys(SECRET).uid(src.SOPInstanceUID)
    assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID
    if "PixelData" in src:
        assert out.PixelData == src.PixelData
    assert out.PatientIdentityRemoved == "YES"
    if shutil.which("dciodvfy"):
        assert _errors(out_path) <= _errors(FILES / name)
    elif os.environ.get("CI"):
        pytest.fail("dciodvfy is required in CI")


def test_rt_references_resolve(tmp_path: Path) -> None:
    d = make()
    names = ["rtplan.dcm", "rtdose.dcm", "rtstruct.dcm"]
    srcs = [_read(FILES / n) for n in names]
    plan, dose, struct = srcs
    # the bundled files do not point at each other: make them a consistent set first
    plan.ReferencedStructureSetSequence[0].ReferencedSOPInstanceUID = struct.SOPInstanceUID
    dose.ReferencedRTPlanSequence[0].ReferencedSOPInstanceUID = plan.SOPInstanceUID
    dose.StudyInstanceUID = plan.StudyInstanceUID
    outs = [d.deidentify(_read_copy(s)) for s in srcs]
    o_plan, o_dose, o_struct = outs
    assert o_plan.ReferencedStructureSetSequence[0].ReferencedSOPInstanceUID == o_struct.SOPInstanceUID
    assert o_dose.ReferencedRTPlanSequence[0].ReferencedSOPInstanceUID == o_plan.SOPInstanceUID
    assert o_dose.StudyInstanceUID == o_plan.StudyInstanceUID != plan.StudyInstanceUID
    for_uid = o_struct.ReferencedFrameOfReferenceSequence[0].FrameOfReferenceUID
    assert for_uid == Keys(SECRET).uid(struct.ReferencedFrameOfReferenceSequence[0].FrameOfReferenceUID)
    rois = o_struct.StructureSetROISequence
    assert all(r.ReferencedFrameOfReferenceUID == for_uid for r in rois)
    if shutil.which("dciodvfy"):
        p = tmp_path / "rtstruct.dcm"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcmwrite(p, o_struct, enforce_file_format=True)
        assert _errors(p) <= _errors(FILES / "rtstruct.dcm")


def _read_copy(ds: pydicom.Dataset) -> pydicom.Dataset:
    import copy

    return copy.deepcopy(ds)


def test_trailing_elements_after_pixel_data_are_dropped(tmp_path: Path) -> None:
    src = FILES / "CT_small.dcm"
    data = src.read_bytes()
    # (FFFC,FFFC) DataSetTrailingPadding, OB, carrying the patient name
    trailer = b"\xfc\xff\xfc\xffOB\x00\x00" + (16).to_bytes(4, "little") + b"CompressedSample"
    p = tmp_path / "in.dcm"
    p.write_bytes(data + trailer)
    out_path = tmp_path / "out.dcm"
    with open(out_path, "wb") as fh:
        make().deidentify_file(p, fh)
    blob = out_path.read_bytes()
    assert b"CompressedSample" not in blob and blob.endswith(_read(src).PixelData)


def test_unparseable_file_is_invalid_dataset(tmp_path: Path) -> None:
    from deid_router.errors import DeidError

    p = tmp_path / "junk.dcm"
    p.write_bytes(b"\0" * 128 + b"DICM" + b"\xff" * 20)
    with open(tmp_path / "o", "wb") as fh, pytest.raises(DeidError) as err:
        make().deidentify_file(p, fh)
    assert err.value.reason == "invalid_dataset"
