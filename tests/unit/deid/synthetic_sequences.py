"""A synthetic CT whose every Table E.1-1 sequence (and untabled ones of each kind) carries
identifying items: person names, coded concepts of local schemes naming the institution,
free text, dates, UIDs referencing another instance, private attributes; in one of three
character sets (ISO_IR 192 UTF-8 with kanji, ISO_IR 100 Latin-1, ISO 2022 IR 87 JIS).

Every planted text carries a token ``Q<nnn>`` naming the sequence it was planted in, so a
test can say exactly which sequence's content survived.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import CTImageStorage

from deid_router.deid.profile import table_rows
from tests.unit.deid.synthetic import PATIENT_ID, UID_ROOT, build

FAM, GIV = "FAMPATXY", "GIVPATXY"
REF_UID = UID_ROOT + "5001"  # the SOPInstanceUID of the referenced instance
DATE, DATETIME, TIME = "19990321", "19990321101112", "101112.987654"
# untabled attributes (not in Table E.1-1), one per text-bearing VR
UNTABLED = {"PN": "EvaluatorName", "LO": "ContentDescription", "SH": "MaterialID", "UT": "TextValue",
            "ST": "CodingSchemeExternalID", "LT": "ExtendedCodeMeaning", "UC": "PrivateDataElementName",
            "UR": "RetrieveURL", "DA": "SecondaryReviewDate", "DT": "ItemInventoryDateTime",
            "TM": "SecondaryReviewTime"}
UNTABLED_SEQUENCES = ("ReferencedInstanceSequence", "ReferencedSeriesSequence", "AnatomicRegionSequence",
                      "StructureSetROISequence", "CurrentRequestedProcedureEvidenceSequence")


@dataclass(frozen=True)
class Charset:
    name: str  # SpecificCharacterSet
    codec: str
    staff: str  # OperatorsName: a context identifier, in this character set
    institution: str
    other_name: str  # an untabled PN planted in every item


CHARSETS = {
    "utf8": Charset("ISO_IR 192", "utf-8", "MÜLLERXY^JÜRGENXY", "Klinik Grünwaldxy", "山田^太郎"),
    "latin1": Charset("ISO_IR 100", "latin-1", "ÆRØXY^SØRENXY", "Sygehus Åbenråxy", "Ålandxy^Øysteinxy"),
    "jis": Charset("\\ISO 2022 IR 87", "iso2022_jp", "ヤマダ^タロウ", "山田病院", "佐藤^花子"),
}


@dataclass
class Rich:
    ds: Dataset
    ref: Dataset  # the instance the items reference
    tokens: dict[str, int]  # token -> tag of the top-level sequence it was planted in
    charset: Charset

    def identifiers(self) -> list[str]:
        cs = self.charset
        return [FAM, GIV, PATIENT_ID, *cs.staff.split("^"), cs.institution, *cs.other_name.split("^")]


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def rich_item(token: str, cs: Charset) -> Dataset:
    item = Dataset()
    # the item itself is a coded entry of a local scheme naming the institution
    item.CodeValue = f"{token}CV"
    item.CodingSchemeDesignator = "99LOCAL"
    item.CodeMeaning = f"{cs.institution} {token}CM"
    item.ReferencedSOPClassUID = CTImageStorage
    item.ReferencedSOPInstanceUID = REF_UID
    item.PersonName = cs.staff  # tabled (D)
    item.EvaluatorName = cs.other_name
    item.TextValue = f"{token}TV seen {FAM} {PATIENT_ID} by {cs.staff.split('^')[0]}"
    item.ContentDescription = f"{token}LO {GIV} at {cs.institution}"
    item.MaterialID = f"{token}SH"
    item.CodingSchemeExternalID = f"{token}ST {FAM}"
    item.ExtendedCodeMeaning = f"{token}LT {cs.institution}"
    item.PrivateDataElementName = f"{token}UC {GIV}"
    item.RetrieveURL = f"http://{token.lower()}ur.example/{PATIENT_ID}"
    item.SecondaryReviewDate = DATE
    item.ItemInventoryDateTime = DATETIME
    item.SecondaryReviewTime = TIME
    item.ConceptNameCodeSequence = Sequence([_code(f"{token}L", "L", f"{FAM} {token}CN")])
    item.PurposeOfReferenceCodeSequence = Sequence([_code("121311", "DCM", "Localizer")])
    item.add_new(0x00090010, "LO", "ACME PRIVATE")
    item.add_new(0x00091001, "LO", f"{token}PV {PATIENT_ID}")
    return item


def build_rich(charset: str = "utf8") -> Rich:
    cs = CHARSETS[charset]
    ds = build().ds
    ds.SpecificCharacterSet = cs.name.split("\\") if "\\" in cs.name else cs.name
    ds.OperatorsName = cs.staff
    ds.InstitutionName = cs.institution
    tokens: dict[str, int] = {}
    n = 0
    sequence_tags = []
    for row in table_rows():
        text = str(row["tag"])
        if "x" in text or "g" in text:
            continue
        tag = int(text[1:5] + text[6:10], 16)
        try:
            vr = dictionary_VR(tag)
        except KeyError:
            continue
        if vr == "SQ" and tag >> 16 not in (0xFFFA, 0xFFFC):
            sequence_tags.append(tag)
    for kw in UNTABLED_SEQUENCES:
        sequence_tags.append(_tag(kw))
    for tag in sequence_tags:
        n += 1
        token = f"Q{n:03d}"
        tokens[token] = tag
        ds.add_new(tag, "SQ", Sequence([rich_item(token, cs)]))
    ref = build().ds
    ref.SOPInstanceUID = REF_UID
    ref.file_meta.MediaStorageSOPInstanceUID = REF_UID
    return Rich(ds=ds, ref=ref, tokens=tokens, charset=cs)


def _tag(keyword: str) -> int:
    from pydicom.datadict import tag_for_keyword

    found = tag_for_keyword(keyword)
    assert found is not None, keyword
    return int(found)
