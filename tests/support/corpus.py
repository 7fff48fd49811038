"""Test DICOM data: a curated mix of pydicom's bundled test files, and synthetic CT series.

Everything here is synthetic or public test data; never real patient data.

Curated pydicom files (all local to pydicom 3.0.2, never downloaded; each a Part-10 file with
a SOPInstanceUID of a storage SOP class; their SOPInstanceUIDs are distinct, so a count by UID
at the far end is a count of instances):

    CT_small.dcm                 CT, explicit VR little endian
    rtplan.dcm                   RT Plan, implicit VR LE (meta and dataset SOPInstanceUID differ)
    rtdose.dcm                   RT Dose, implicit VR LE, 15 frames (meta/dataset UID differ)
    test-SR.dcm                  Comprehensive SR
    waveform_ecg.dcm             12-lead ECG waveform
    liver_1frame.dcm             Segmentation
    SC_rgb_jpeg_dcmtk.dcm        secondary capture, JPEG baseline
    examples_ybr_color.dcm       US multi-frame (30 frames), JPEG baseline
    JPEG-lossy.dcm               JPEG extended (process 2 and 4)
    MR_small_jpeg_ls_lossless.dcm  MR, JPEG-LS lossless
    JPEG2000.dcm                 JPEG 2000
    SC_rgb_rle.dcm               RLE lossless
    ExplVR_BigEnd.dcm            US, explicit VR big endian (retired syntax)
    image_dfl.dcm                deflated explicit VR little endian

Left out on purpose: ``rtstruct.dcm`` has no file meta (not Part 10); ``SC_rgb.dcm`` and
``emri_small.dcm`` are not bundled with pydicom 3.0.2 (download only); ``MR_small.dcm`` and its
other variants (RLE, big endian, JPEG 2000) share one SOPInstanceUID, so only the JPEG-LS one is
kept; ``JPEGLSNearLossless_*.dcm`` and ``SC_rgb_jls_*.dcm`` lack Study/Series Instance UIDs
(Orthanc refuses them with 0xA700). Every curated file has PatientID (except
ExplVR_BigEnd.dcm), StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID and SOPClassUID.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from pathlib import Path

from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid

CORPUS_FILES: tuple[str, ...] = (
    "CT_small.dcm",
    "rtplan.dcm",
    "rtdose.dcm",
    "test-SR.dcm",
    "waveform_ecg.dcm",
    "liver_1frame.dcm",
    "SC_rgb_jpeg_dcmtk.dcm",
    "examples_ybr_color.dcm",
    "JPEG-lossy.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
    "JPEG2000.dcm",
    "SC_rgb_rle.dcm",
    "ExplVR_BigEnd.dcm",
    "image_dfl.dcm",
)

#: A role for each curated file, for tests that need "a JPEG 2000 file" rather than a name.
CORPUS_ROLES: dict[str, str] = {
    "ct": "CT_small.dcm",
    "rtplan": "rtplan.dcm",
    "rtdose": "rtdose.dcm",
    "sr": "test-SR.dcm",
    "ecg": "waveform_ecg.dcm",
    "seg": "liver_1frame.dcm",
    "jpeg_baseline": "SC_rgb_jpeg_dcmtk.dcm",
    "multiframe": "examples_ybr_color.dcm",
    "jpeg_extended": "JPEG-lossy.dcm",
    "jpeg_ls": "MR_small_jpeg_ls_lossless.dcm",
    "jpeg2000": "JPEG2000.dcm",
    "rle": "SC_rgb_rle.dcm",
    "big_endian": "ExplVR_BigEnd.dcm",
    "deflated": "image_dfl.dcm",
}


def pydicom_test_files() -> dict[str, Path]:
    """File name -> path of the curated pydicom test files (see module docstring).

    Raises FileNotFoundError naming the missing file: pydicom's bundled data is expected.
    """
    out: dict[str, Path] = {}
    for name in CORPUS_FILES:
        found = get_testdata_file(name, download=False)
        if not isinstance(found, str):
            raise FileNotFoundError(f"pydicom test file {name} is missing; reinstall pydicom 3.0.x")
        out[name] = Path(found)
    return out


def corpus_sop_instance_uids(files: dict[str, Path] | None = None) -> dict[str, str]:
    """File name -> SOPInstanceUID as stored in the data set (what a PACS indexes)."""
    files = files if files is not None else pydicom_test_files()
    return {
        name: str(dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID)
        for name, path in files.items()
    }


# --------------------------------------------------------------------------- synthetic CT

_FAMILY = ("TESTPERSON", "SAMPLEWOOD", "FICTIVA", "DUMMYSON", "MOCKLEY", "PLACEHOLDT")
_GIVEN = ("ALEX", "JORDAN", "CASEY", "ROBIN", "SAM", "MORGAN")
PRIVATE_CREATOR = "ACME DEID TEST 1.0"


def synthetic_patient(index: int, seed: int = 0) -> tuple[str, str]:
    """A made-up (PatientID, PatientName) pair, stable for a given index and seed."""
    rng = random.Random(seed * 1_000_003 + index)
    name = f"{rng.choice(_FAMILY)}{index}^{rng.choice(_GIVEN)}^Q"
    return f"PID{seed:03d}{index:06d}", name


def build_ct(
    patient_id: str,
    patient_name: str,
    study_uid: str,
    series_uid: str,
    sop_uid: str,
    rows: int = 512,
    cols: int = 512,
    instance_number: int = 1,
    pixel_data: bytes | None = None,
    private_tags: bool = True,
) -> FileDataset:
    """A synthetic CT image data set with a realistic, fully identified header.

    The identifying values (names, IDs, dates, institution, physicians, accession, station,
    serial numbers, referenced UIDs, a private tag carrying the patient name) are exactly what
    de-identification has to remove; tests can look for them in the output.
    """
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = FileDataset("", Dataset(), file_meta=meta, preamble=b"\0" * 128)

    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = "20240312"
    ds.SeriesDate = "20240312"
    ds.AcquisitionDate = "20240312"
    ds.ContentDate = "20240312"
    ds.StudyTime = "101530.123456"
    ds.SeriesTime = "101612"
    ds.AcquisitionTime = "101613.5"
    ds.ContentTime = "101614"
    ds.AccessionNumber = f"ACC{patient_id[-6:]}"
    ds.Modality = "CT"
    ds.Manufacturer = "ACME Medical"
    ds.InstitutionName = "Example General Hospital"
    ds.InstitutionAddress = "1 Example Street, Sampletown"
    ds.ReferringPhysicianName = "REFERRER^ROBIN^DR"
    ds.StationName = "CTSCAN01"
    ds.StudyDescription = f"CT CHEST {patient_name.split('^')[0]}"
    ds.SeriesDescription = "AXIAL 1.0 SOFT"
    ds.BodyPartExamined = "CHEST"
    ds.InstitutionalDepartmentName = "Radiology"
    ds.PhysiciansOfRecord = "RECORD^KIM"
    ds.PerformingPhysicianName = "PERFORMER^LEE"
    ds.OperatorsName = "TECH^PAT"
    ds.ManufacturerModelName = "Scanomatic 64"
    ds.ReferencedPerformedProcedureStepSequence = Sequence([_ref("1.2.840.10008.3.1.2.3.3", generate_uid())])
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.IssuerOfPatientID = "EXAMPLE-GH"
    ds.PatientBirthDate = "19610523"
    ds.PatientSex = "F"
    ds.PatientAge = "062Y"
    ds.PatientSize = "1.68"
    ds.PatientWeight = "64"
    ds.PatientAddress = "22 Sample Road, Sampletown"
    other = Dataset()
    other.PatientID = f"MRN-{patient_id}"
    other.IssuerOfPatientID = "EXAMPLE-CLINIC"
    other.TypeOfPatientID = "TEXT"
    ds.OtherPatientIDsSequence = Sequence([other])
    ds.PatientComments = f"Synthetic test patient {patient_name}"
    ds.SliceThickness = "1.0"
    ds.KVP = "120"
    ds.DeviceSerialNumber = "SN-0042-7781"
    ds.SoftwareVersions = "1.2.3"
    ds.ProtocolName = "CHEST ROUTINE"
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = f"S{patient_id[-4:]}"
    ds.SeriesNumber = 3
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = instance_number
    ds.ImagePositionPatient = [-250.0, -250.0, float(-instance_number)]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.FrameOfReferenceUID = study_uid + ".1" if len(study_uid) <= 62 else generate_uid()
    ds.PositionReferenceIndicator = ""
    ds.SliceLocation = float(-instance_number)
    ds.RequestAttributesSequence = Sequence([_request(ds.AccessionNumber, patient_id)])
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = cols
    ds.PixelSpacing = [0.7, 0.7]
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.WindowCenter = "40"
    ds.WindowWidth = "400"
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    if private_tags:
        block = ds.private_block(0x0009, PRIVATE_CREATOR, create=True)
        block.add_new(0x10, "LO", patient_name)  # vendors do put PHI in private tags
        block.add_new(0x11, "UI", study_uid)
    ds.PixelData = pixel_data if pixel_data is not None else os.urandom(rows * cols * 2)
    ds["PixelData"].VR = "OW"
    return ds


def _ref(sop_class: str, sop_instance: str) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class
    item.ReferencedSOPInstanceUID = sop_instance
    return item


def _request(accession: str, patient_id: str) -> Dataset:
    item = Dataset()
    item.AccessionNumber = accession
    item.RequestedProcedureID = f"RP{patient_id[-5:]}"
    item.ScheduledProcedureStepID = f"SPS{patient_id[-5:]}"
    item.StudyInstanceUID = generate_uid()
    return item


def make_ct(
    path: str | os.PathLike[str],
    patient_id: str,
    patient_name: str,
    study_uid: str,
    series_uid: str,
    sop_uid: str,
    rows: int = 512,
    cols: int = 512,
    instance_number: int = 1,
    private_tags: bool = True,
) -> Path:
    """Write one synthetic, identified CT (random 16-bit pixels) as a Part-10 file."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    ds = build_ct(
        patient_id, patient_name, study_uid, series_uid, sop_uid,
        rows=rows, cols=cols, instance_number=instance_number, private_tags=private_tags,
    )
    ds.save_as(out, enforce_file_format=True)
    return out


def make_series(
    directory: str | os.PathLike[str],
    n: int,
    patients: int = 1,
    rows: int = 512,
    cols: int = 512,
    seed: int = 0,
    private_tags: bool = True,
) -> list[Path]:
    """Write ``n`` synthetic CT instances (unique UIDs) spread over ``patients`` patients.

    Each patient has one study with one series. The data set is built once per patient and
    only UIDs and instance numbers change per file, so thousands of files take seconds. The
    same seed gives the same patients (names and IDs), new UIDs every call.
    Files are named ``<patient>/<instance>.dcm`` (never from UIDs).
    """
    if n < 0 or patients < 1:
        raise ValueError("make_series: n must be >= 0 and patients >= 1")
    root = Path(directory)
    pixels = os.urandom(rows * cols * 2)
    written: list[Path] = []
    for p, count in enumerate(_split(n, patients)):
        if count == 0:
            continue
        patient_id, patient_name = synthetic_patient(p, seed)
        study_uid, series_uid = generate_uid(), generate_uid()
        ds = build_ct(
            patient_id, patient_name, study_uid, series_uid, generate_uid(),
            rows=rows, cols=cols, pixel_data=pixels, private_tags=private_tags,
        )
        folder = root / f"p{p:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(1, count + 1):
            sop_uid = generate_uid()
            ds.SOPInstanceUID = sop_uid
            ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
            ds.InstanceNumber = i
            ds.ImagePositionPatient = [-250.0, -250.0, float(-i)]
            ds.SliceLocation = float(-i)
            path = folder / f"{i:06d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            written.append(path)
    return written


def _split(n: int, parts: int) -> Iterator[int]:
    base, extra = divmod(n, parts)
    for i in range(parts):
        yield base + (1 if i < extra else 0)


def synthetic_dates() -> dict[str, str]:
    """The dates :func:`build_ct` writes, for tests asserting they were shifted."""
    return {"StudyDate": "20240312", "PatientBirthDate": "19610523"}
