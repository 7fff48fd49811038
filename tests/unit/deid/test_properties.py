"""Property tests: identifiers placed anywhere never leak; tabled placements never raise."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from deid_router.config import DEID_OPTIONS
from deid_router.deid.residual import GENERIC
from deid_router.errors import DeidError
from tests.unit.deid.helpers import make
from tests.unit.deid.synthetic import encode, roundtrip

OPTION_NAMES = [o for o in DEID_OPTIONS if o != "retain_long_full_dates"]


def _engine_text() -> bytes:
    """Everything the engine writes by itself (MODIFIED, YES, method and code meanings...), for
    every option: a generated "identifier" inside these words is not a leak."""
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.10.1.9"
    ds.StudyInstanceUID = ds.SOPInstanceUID + ".1"
    ds.PatientName, ds.PatientID, ds.Modality, ds.BurnedInAnnotation = "Q^Q", "Q1", "CT", "NO"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return b"".join(encode(make((option,)).deidentify(roundtrip(ds))).upper() for option in OPTION_NAMES)


ENGINE_TEXT = _engine_text()
# generic words (YES, FALSE, REMOVED...) are deliberately never treated as identifiers
NAME_PART = st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ", min_size=5, max_size=10).filter(
    lambda s: s not in GENERIC and s not in ("ANONYMIZED", "ANONYMOUS", "REMOVED") and s.encode() not in ENGINE_TEXT)
PID = st.text(alphabet="ABCDEFGHJKLMNPQRSTUVWXYZ0123456789", min_size=6, max_size=12).filter(
    lambda s: any(c.isalpha() for c in s) and s not in GENERIC and s.encode() not in ENGINE_TEXT)
# (keyword, VR) of text attributes: tabled (removed/cleaned by the profile) and untabled (kept)
TABLED = [("ImageComments", "LT"), ("StudyDescription", "LO"), ("SeriesDescription", "LO"),
          ("AdditionalPatientHistory", "LT"), ("PatientComments", "LT"), ("RequestingService", "LO"),
          ("ReasonForStudy", "LO"), ("OperatorsName", "PN"), ("StudyComments", "LT"), ("DerivationDescription", "ST")]
UNTABLED = [("BodyPartExamined", "CS"), ("ProtocolName", "LO"), ("ImageType", "CS"), ("Manufacturer", "LO"),
            ("ConvolutionKernel", "SH"), ("CodeMeaning", "LO")]
SEQS = ["ReferencedImageSequence", "SourceImageSequence", "AnatomicRegionSequence", "ReferencedStudySequence",
        "ReferencedInstanceSequence", "ContentSequence", "InstitutionCodeSequence", "ReferencedSeriesSequence"]
OPTIONS = st.lists(st.sampled_from(OPTION_NAMES), unique=True, max_size=4)


@st.composite
def datasets(draw: st.DrawFn, places: list[tuple[str, str]]) -> tuple[Dataset, list[str]]:
    fam, giv, pid = draw(NAME_PART), draw(NAME_PART), draw(PID)
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.10.1." + str(draw(st.integers(1, 10**9)))
    ds.StudyInstanceUID = ds.SOPInstanceUID + ".1"
    ds.PatientName = f"{fam}^{giv}"
    ds.PatientID = pid
    ds.Modality = "CT"
    ds.BurnedInAnnotation = "NO"
    idents = [fam, giv, pid]

    def fill(target: Dataset, depth: int) -> None:
        for _ in range(draw(st.integers(0, 3))):
            kw, vr = draw(st.sampled_from(places))
            ident = draw(st.sampled_from(idents))
            text = draw(st.sampled_from([ident, f"seen {ident} today", ident.lower(), f"{ident}^X"]))
            if vr == "CS":
                text = ident[:16]
            elif vr == "SH":
                text = text[:16]
            setattr(target, kw, text)
        if depth < 2 and draw(st.booleans()):
            item = Dataset()
            item.ReferencedSOPClassUID = CTImageStorage
            item.ReferencedSOPInstanceUID = ds.SOPInstanceUID + f".{depth}"
            fill(item, depth + 1)
            setattr(target, draw(st.sampled_from(SEQS)), Sequence([item]))

    fill(ds, 0)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return roundtrip(ds), idents


def _check(ds: Dataset, idents: list[str], options: list[str], may_raise: bool) -> None:
    d = make(tuple(options))
    try:
        out = d.deidentify(ds)
    except DeidError as err:
        assert may_raise and err.reason == "residual_phi", err
        return
    blob = encode(out).upper()
    for ident in idents:
        assert ident.upper().encode() not in blob


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=datasets(TABLED + UNTABLED), options=OPTIONS)
def test_identifiers_anywhere_never_leak(data: tuple[Dataset, list[str]], options: list[str]) -> None:
    _check(*data, options, may_raise=True)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=datasets(TABLED), options=OPTIONS)
def test_identifiers_in_tabled_places_never_raise(data: tuple[Dataset, list[str]], options: list[str]) -> None:
    _check(*data, options, may_raise=False)


@pytest.mark.slow
@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=datasets(TABLED + UNTABLED), options=OPTIONS)
def test_identifiers_anywhere_never_leak_long(data: tuple[Dataset, list[str]], options: list[str]) -> None:
    _check(*data, options, may_raise=True)
