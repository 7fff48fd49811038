"""A synthetic identified instance carrying EVERY keyworded attribute of Table E.1-1.

Each attribute gets a distinctive value valid for its VR so that tests can prove exactly
what survives de-identification. Also: private tags, nested sequences, free text naming
the patient.
"""

from __future__ import annotations

import datetime as dt
import io
import warnings
from dataclasses import dataclass, field

from pydicom import dcmread
from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.sequence import Sequence
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from deid_router.deid.profile import table_rows

PATIENT_NAME = "FAMPATXY^GIVPATXY"
PATIENT_ID = "PID12345"
ACCESSION = "ACC98765"
BIRTH_DATE = "19610212"
FREE_TEXT = "Patient Fampatxy Givpatxy id PID12345 born 12.02.1961 acc ACC98765"
IDENTIFIERS = ("FAMPATXY", "GIVPATXY", PATIENT_ID, ACCESSION, BIRTH_DATE, "12.02.1961")
UID_ROOT = "1.2.826.0.1.3680043.10.9999."
SPECIAL = {"PatientName": PATIENT_NAME, "PatientID": PATIENT_ID, "AccessionNumber": ACCESSION,
           "PatientBirthDate": BIRTH_DATE, "SOPClassUID": CTImageStorage}


@dataclass
class Synthetic:
    ds: Dataset
    values: dict[int, object] = field(default_factory=dict)  # tag -> original value (top level)


def value_for(vr: str, i: int) -> object:
    base = dt.date(1930, 1, 1) + dt.timedelta(days=17 * i)
    return {
        "PN": f"PNFAM{i:04d}^PNGIV{i:04d}",
        "LO": f"LOVAL{i:04d}XQ", "SH": f"SH{i:04d}XQ", "ST": f"ST text {i:04d}XQ", "LT": f"LT text {i:04d}XQ",
        "UT": f"UT text {i:04d}XQ", "UC": f"UC{i:04d}XQ", "CS": f"CS{i:04d}XQ", "AE": f"AE{i:04d}XQ",
        "DA": base.strftime("%Y%m%d"), "DT": base.strftime("%Y%m%d") + "101112",
        "TM": f"{(i // 60) % 24:02d}{i % 60:02d}07", "AS": f"{i % 80 + 1:03d}Y", "IS": str(70000 + i),
        "DS": f"{70000 + i}.5", "UI": f"{UID_ROOT}{i}", "US": 7, "SS": 7, "UL": 7, "SL": 7, "FL": 7.0,
        "FD": 7.0, "UR": f"http://example.org/{i}XQ", "OB": b"OBXQ", "OW": b"OWXQ", "UN": b"UNXQ",
    }.get(vr)  # type: ignore[return-value]


def _item(i: int) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = CTImageStorage
    item.ReferencedSOPInstanceUID = f"{UID_ROOT}9{i}"
    item.CodeMeaning = "code meaning"
    inner = Dataset()
    inner.PersonName = PATIENT_NAME
    inner.InstitutionName = f"INNERINST{i}"
    inner.StudyInstanceUID = f"{UID_ROOT}8{i}"
    item.ContentSequence = Sequence([inner])
    return item


def build() -> Synthetic:
    ds = Dataset()
    values: dict[int, object] = {}
    for i, row in enumerate(table_rows()):
        tag_text = str(row["tag"])
        if "x" in tag_text or "g" in tag_text:
            continue
        tag = int(tag_text[1:5] + tag_text[6:10], 16)
        if tag >> 16 in (0x0000, 0x0002, 0xFFFA, 0xFFFC, 0x7FE0):
            continue
        try:
            vr = dictionary_VR(tag).split(" or ")[0]
        except KeyError:
            continue
        kw = str(row["keyword"])
        if vr == "SQ":
            ds.add_new(tag, "SQ", Sequence([_item(i)]))
            continue
        value = SPECIAL.get(kw, value_for(vr, i))
        if value is None:
            continue
        ds.add_new(tag, vr, value)
        values[tag] = value
    ds.SOPClassUID = CTImageStorage
    ds.ImageComments = FREE_TEXT
    ds.StudyDescription = "CT chest for Fampatxy"
    # attributes not in the table: kept, except non-registered UIDs
    ds.Manufacturer = "ACME"
    ds.Modality = "CT"
    ds.FrameOfReferenceUID = f"{UID_ROOT}777"
    ds.BurnedInAnnotation = "NO"
    # private tags: a safe one (GEMS_PARM_01 0043,xx39 is in Table E.3.10-1? use ELSCINT1 00E1,xx21) and an unsafe one
    ds.add_new(0x00E10010, "LO", "ELSCINT1")
    ds.add_new(0x00E11021, "DS", "12.5")
    ds.add_new(0x00E11099, "LO", "private " + PATIENT_ID)
    ds.add_new(0x00090010, "LO", "ACME PRIVATE")
    ds.add_new(0x00091001, "LO", PATIENT_NAME)
    # overlay and curve
    ds.add_new(0x60000010, "US", 2)
    ds.add_new(0x60000011, "US", 2)
    ds.add_new(0x60000040, "CS", "G")
    ds.add_new(0x60000050, "SS", [1, 1])
    ds.add_new(0x60000100, "US", 1)
    ds.add_new(0x60000102, "US", 0)
    ds.add_new(0x60003000, "OW", b"\x00\x00")
    ds.add_new(0x50000005, "US", 1)
    ds.add_new(0x50003000, "OW", b"\x01\x00")
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = str(ds.SOPInstanceUID)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.SourceApplicationEntityTitle = "SENDERAE"
    return Synthetic(ds=ds, values=values)


def roundtrip(ds: Dataset) -> Dataset:
    """Encode and decode, as the router would see it."""
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcmwrite(buf, ds, enforce_file_format=True)
        buf.seek(0)
        return dcmread(buf)


def encode(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()
