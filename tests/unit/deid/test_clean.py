"""The clean options really clean: SR trees, presentation-state annotations, RT ROI labels and
free text lose this instance's identifiers in every written form, and are delivered; names in
ISO 2022 and UTF-8 are caught in any encoding."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from pydicom.dataset import Dataset

from deid_router.config import DeidRule
from deid_router.deid.identifiers import Forms, name_parts
from deid_router.deid.keys import Keys
from deid_router.errors import DeidError
from tests.support import clean_corpus as cc
from tests.unit.deid.helpers import SECRET, make

CLEAN_OPTIONS = ("clean_descriptors", "clean_structured_content", "clean_graphics")


def _deid(options: tuple[str, ...], ds: Dataset, **kw: object) -> Dataset:
    return make(options, **kw).deidentify(cc.decode(cc.encode(ds)))


# ------------------------------------------------------------------ the forms themselves
@pytest.mark.parametrize("text", [
    "born 19470315", "born 15/03/1947", "born 15.03.1947", "born 1947-03-15", "born 15.3.47", "born 3/15/1947",
    "born March 15, 1947", "born 15 Mar 1947", "born 15th of March 1947", "born 1947-Mar-15",
    "geb. 15. März 1947", "1947年3月15日生", "1947년 3월 15일", "at 1947-03-15T10:00",
])
def test_a_date_is_found_in_every_written_form(text: str) -> None:
    forms = Forms((), ("19470315",))
    assert forms.search(text)
    assert "1947" not in forms.remove(text) and "47" not in forms.remove(text).replace("1947", "")


@pytest.mark.parametrize("text", ["born 16/03/1947", "in 1947", "dose 15.03 Gy", "19470316", "March 16, 1947"])
def test_other_dates_are_not_this_instance_s(text: str) -> None:
    forms = Forms((), ("19470315",))
    assert not forms.search(text) and forms.remove(text) == text


@pytest.mark.parametrize("text", ["MRN 1234567", "MRN 12-34-567", "MRN 123 4567", "MRN1234567", "id 123.45.67"])
def test_an_id_is_found_with_or_without_separators(text: str) -> None:
    forms = Forms(("1234567",))
    assert forms.search(text)
    assert forms.remove(text).strip() in ("MRN", "id")


def test_other_numbers_are_not_the_id() -> None:
    forms = Forms(("1234567",))
    for text in ("12345678", "1234568", "0.1234567", "ID 123456"):
        assert not forms.search(text), text


def test_name_components_in_each_character_set_representation() -> None:
    parts = name_parts("Yamada^Tarou=山田^太郎=やまだ^たろう")
    forms = Forms(parts)
    for text in ("Tarou Yamada", "YAMADA, Tarou", "山田太郎様", "やまだ たろう", "ヤマダ タロウ"):
        assert forms.search(text), text
        assert not any(p in forms.remove(text) for p in ("Yamada", "Tarou", "山田", "太郎", "やまだ", "ヤマダ"))
    assert not forms.search("Yamamoto")


def test_non_ascii_names_are_found_in_encoded_bytes() -> None:
    forms = Forms(name_parts("Yamada^Tarou=山田^太郎") + name_parts("Hong^Gildong=洪^吉洞=홍^길동"))
    assert forms.search_bytes("患者 山田太郎".encode("utf-8"))
    assert forms.search_bytes("患者 山田太郎".encode("iso2022_jp"))
    assert forms.search_bytes("환자 홍길동".encode("euc_kr"))  # ISO 2022 IR 149 bytes after ESC $ ) C
    assert not forms.search_bytes("経過良好".encode("iso2022_jp"))


@pytest.mark.parametrize("planted", [
    "MRN 12-34-567", "MRN 123 4567", "born March 15, 1947", "born 15.03.1947", "seen 11 May 2024",
    "Ms Elspeth", "ACX-2024-0511",
])
def test_the_residual_scan_checks_the_same_forms_cleaning_removes(planted: str) -> None:
    """A rule that keeps ImageComments lets the text through the walk: the scan, matching the
    patient's identifiers and the removed dates with the same forms as cleaning, quarantines
    it; cleaning the same text delivers it. (Staff and institution names count as kept by
    choice in an attribute a rule keeps, as before.)"""
    ds = cc.free_text_image(4)
    ds.ImageComments = f"note: {planted} ok"
    with pytest.raises(DeidError) as err:
        _deid((), ds, rules=(DeidRule("ImageComments", "keep"),))
    assert err.value.reason == "residual_phi" and err.value.path == "ImageComments"
    out = _deid(("clean_descriptors",), ds)
    assert out.ImageComments.startswith("note:") and out.ImageComments.endswith("ok")
    assert cc.leaks(cc.encode(out), cc.FORMS) == []


# ------------------------------------------------------------------ structured reports
def test_sr_tree_is_cleaned_and_keeps_its_structure(tmp_path: Path) -> None:
    src = cc.structured_report(1)
    out = _deid(("clean_structured_content",), src)
    data = cc.encode(out)
    assert cc.leaks(data, cc.FORMS) == []
    keys = Keys(SECRET)

    def tree(ds: Dataset) -> list[tuple[str, str, str]]:
        found = []
        for item in ds.get("ContentSequence", []):
            code = item.ConceptNameCodeSequence[0]
            found.append((item.ValueType, item.RelationshipType, f"{code.CodeValue}/{code.CodingSchemeDesignator}"))
            found += tree(item)
        return found

    assert tree(out) == tree(src)  # same items, same concepts, same order
    items = {i.ConceptNameCodeSequence[0].CodeMeaning: i for i in out.ContentSequence}
    assert items["Subject Name"].PersonName != cc.PATIENT and items["Person Observer Name"].PersonName
    assert items["Subject Birth Date"].Date != cc.BIRTH
    assert items["Procedure Study Instance UID"].UID == out.StudyInstanceUID == keys.uid(src.StudyInstanceUID)
    assert items["Language of Content Item and Descendants"].ConceptCodeSequence[0].CodeValue == "en"
    finding = items["Findings"].ContentSequence[0].TextValue
    assert all(w in finding for w in cc.KEEP_WORDS)  # the clinical text stays
    image = items["Findings"].ContentSequence[2].ReferencedSOPSequence[0]
    assert image.ReferencedSOPInstanceUID == keys.uid(f"{cc.ROOT}99.1")
    path = tmp_path / "sr.dcm"
    path.write_bytes(data)
    dsrdump = shutil.which("dsrdump")
    if dsrdump is None:
        if os.environ.get("CI"):
            pytest.fail("dsrdump (dcmtk) is required in CI")
        pytest.skip("dcmtk dsrdump not installed")
    res = subprocess.run([dsrdump, str(path)], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "TCP_NODELAY": "1"})
    assert res.returncode == 0, res.stderr
    assert "<contains TEXT:" in res.stdout and "PNAME" in res.stdout and "UIDREF" in res.stdout
    assert not any(f.upper() in res.stdout.upper() for f in cc.FORMS)


def test_sr_without_the_option_is_never_delivered_with_an_identifier() -> None:
    """Without clean_structured_content, ContentSequence gets the basic profile's action."""
    try:
        out = _deid((), cc.structured_report(1))
    except DeidError as err:
        assert err.reason == "residual_phi"
        return
    assert cc.leaks(cc.encode(out), cc.FORMS) == []


# ------------------------------------------------------------------ presentation states, RT
def test_presentation_state_annotations_cleaned_under_clean_graphics() -> None:
    out = _deid(("clean_graphics",), cc.presentation_state(2))
    assert cc.leaks(cc.encode(out), cc.FORMS) == []
    texts = [t.UnformattedTextValue for t in out.GraphicAnnotationSequence[0].TextObjectSequence]
    assert "nodule 12 mm" in texts[0] and texts[1].startswith("measured by")
    graphic = out.GraphicAnnotationSequence[0].GraphicObjectSequence[0]
    assert list(graphic.GraphicData) == [50.0, 60.0, 80.0, 90.0]


def test_rt_roi_labels_naming_staff_are_cleaned_under_clean_descriptors() -> None:
    """Table E.1-1 puts ROIName, ROIDescription and ROIObservationLabel under Clean Descriptors."""
    out = _deid(("clean_descriptors",), cc.rt_structure_set(3))
    assert cc.leaks(cc.encode(out), cc.FORMS) == []
    names = [r.ROIName for r in out.StructureSetROISequence]
    assert names == ["GTV Dr", "PTV_", "SpinalCord"]
    assert [o.ROIObservationLabel for o in out.RTROIObservationsSequence] == ["GTV", "PTV", "Spi"]
    assert out.StructureSetROISequence[1].ROIDescription == "margin 5 mm"


def test_free_text_dates_in_five_formats_and_ids_with_separators() -> None:
    out = _deid(("clean_descriptors",), cc.free_text_image(4))
    assert cc.leaks(cc.encode(out), cc.FORMS) == []
    assert out.ImageComments.endswith("Stable nodule in the right upper lobe.")
    assert out.StudyComments.endswith("nodule") and "ACX" not in out.StudyComments


def test_a_name_met_after_the_text_that_mentions_it_is_still_removed() -> None:
    """ContentCreatorName (0070,0084) comes after GraphicAnnotationSequence (0070,0001) in the
    walk: the annotation is cleaned once every identifier of the instance is known."""
    ds = cc.presentation_state(2)
    ds.ContentCreatorName = "Pemberton^Clive"
    ds.GraphicAnnotationSequence[0].TextObjectSequence[0].UnformattedTextValue = "checked by C. Pemberton"
    out = _deid(("clean_graphics",), ds)
    assert out.GraphicAnnotationSequence[0].TextObjectSequence[0].UnformattedTextValue == "checked by C."


def test_institutions_and_staff_inside_sequences_are_identifiers_too() -> None:
    ds = cc.free_text_image(4)
    del ds.InstitutionName
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "H1", "99LOCAL", "Glenmorrow Infirmary"
    ds.InstitutionCodeSequence = [code]
    step = Dataset()
    step.ScheduledPerformingPhysicianName = "Ashdown^Petra"
    step.ScheduledStationName = "Glenmorrow CT2"
    ds.ScheduledProcedureStepSequence = [step]
    ds.ImageComments = "Read at Glenmorrow by Dr Ashdown: no change"
    out = _deid(("clean_descriptors",), ds)
    assert out.ImageComments == "Read at by Dr : no change"


# ------------------------------------------------------------------ character sets
@pytest.mark.parametrize("kind", ["japanese_iso2022", "korean_iso2022", "utf8"])
def test_names_in_iso2022_and_utf8_are_cleaned(kind: str) -> None:
    out = _deid(("clean_descriptors",), cc.KINDS[kind](5))
    assert cc.leaks(cc.encode(out), cc.forms_of(kind)) == []
    assert out.ImageComments  # the non-identifying rest stays


@pytest.mark.parametrize("kind", ["japanese_iso2022", "korean_iso2022", "utf8"])
def test_names_in_iso2022_and_utf8_are_caught_without_the_option(kind: str) -> None:
    """A rule keeping ImageComments would let the name through: the residual scan quarantines."""
    with pytest.raises(DeidError) as err:
        _deid((), cc.KINDS[kind](5), rules=(DeidRule("ImageComments", "keep"),))
    assert err.value.reason == "residual_phi" and err.value.path == "ImageComments"


def test_a_name_in_bytes_of_another_character_set_is_caught() -> None:
    """UTF-8 kanji inside a value of an ISO 2022 instance: decoded as ISO 2022 they are
    garbage, so only the bytes give the name away; the scan searches those too."""
    ds = cc.japanese_text(5)
    ds.ImageComments = "seen: " + "X" * 12
    data = cc.encode(ds).replace(b"X" * 12, "山田太郎".encode("utf-8"))
    assert "山田" not in str(cc.decode(data).ImageComments)
    with pytest.raises(DeidError) as err:
        make((), rules=(DeidRule("ImageComments", "keep"),)).deidentify(cc.decode(data))
    assert err.value.reason == "residual_phi" and err.value.path == "ImageComments"


# ------------------------------------------------------------------ the whole corpus
def test_corpus_with_the_three_clean_options_is_delivered_without_identifiers() -> None:
    d = make(CLEAN_OPTIONS)
    delivered: dict[str, int] = {}
    for kind, build in cc.KINDS.items():
        out = d.deidentify(cc.decode(cc.encode(build(10))))  # raises (quarantine) on any doubt
        assert cc.leaks(cc.encode(out), cc.forms_of(kind)) == [], kind
        delivered[kind] = delivered.get(kind, 0) + 1
    assert delivered == {kind: 1 for kind in cc.KINDS}
