"""A synthetic corpus for the clean options: SR trees, presentation states with text annotations,
an RT structure set whose ROI labels name staff, free text with dates and IDs in many written
forms, and names in ISO 2022 (Japanese, Korean) and UTF-8.

Every identifier is planted in several written forms; ``FORMS`` lists them all so that a test
can search the output for each one (``leaks``), independently of the engine's own forms.
Everything is generated: no real patient data.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterable
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian

COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
ENHANCED_SR = "1.2.840.10008.5.1.4.1.1.88.22"
GSPS = "1.2.840.10008.5.1.4.1.1.11.1"
RT_STRUCT = "1.2.840.10008.5.1.4.1.1.481.3"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
ROOT = "1.2.826.0.1.3680043.10.4242."

PATIENT = "Quarrington^Elspeth"
PATIENT_ID = "1234567"
ACCESSION = "ACX20240511"
BIRTH = "19470315"
STUDY_DATE = "20240511"
INSTITUTION = "Riverside Mercy Hospital"
REFERRER = "Thistlewood^Gregory"
OPERATOR = "Brackenridge^Anna"
OBSERVER = "Featherstonehaugh^Lisa"
INTERPRETER = "Wolverton^James"

# Every written form of every planted identifier: none may survive in any output.
FORMS = (
    "Quarrington", "Elspeth",
    "1234567", "12-34-567", "123 4567", "123-4567",
    "ACX20240511", "ACX-2024-0511",
    "19470315", "15/03/1947", "15.03.1947", "1947-03-15", "March 15, 1947", "15 Mar 1947", "3/15/1947",
    "20240511", "11/05/2024", "2024-05-11", "May 11, 2024", "11.05.2024", "11 May 2024",
    "Riverside Mercy Hospital", "Riverside", "Mercy",
    "Thistlewood", "Gregory", "Brackenridge", "Featherstonehaugh", "Wolverton",
)
FREE_TEXT = (
    "Elspeth Quarrington, MRN 12-34-567 (also written 123 4567), born 15/03/1947 (15.03.1947, "
    "1947-03-15, March 15, 1947, 15 Mar 1947). Study 2024-05-11, accession ACX-2024-0511. "
    "Referred by Dr. Gregory Thistlewood of Riverside; technologist A. Brackenridge at Mercy. "
    "Stable nodule in the right upper lobe."
)
KEEP_WORDS = ("nodule", "right upper lobe")  # clinical words cleaning must leave

# Japanese (ISO 2022 IR 87) and Korean (ISO 2022 IR 149) and UTF-8 names
JP_NAME = "Yamada^Tarou=山田^太郎=やまだ^たろう"
JP_FORMS = ("Yamada", "Tarou", "山田", "太郎", "やまだ", "たろう", "ヤマダ", "山田太郎")
JP_TEXT = "患者 山田太郎 (やまだ たろう) 1947年3月15日生 ID 12-34-567 経過良好"
KO_NAME = "Hong^Gildong=洪^吉洞=홍^길동"
KO_FORMS = ("Gildong", "홍길동", "길동", "洪吉洞", "吉洞")
KO_TEXT = "환자 홍길동 1947년 3월 15일 생 경과 양호"
UTF8_NAME = "Zoë^Müllerová=王^伟"
UTF8_FORMS = ("Müllerová", "Mullerova", "王伟")
UTF8_TEXT = "Patientin Zoë Müllerová (王伟), geb. 15. März 1947; Befund unauffällig"


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    c = Dataset()
    c.CodeValue, c.CodingSchemeDesignator, c.CodeMeaning = value, scheme, meaning
    return c


def _content(value_type: str, relationship: str, name: Dataset, **values: object) -> Dataset:
    item = Dataset()
    item.RelationshipType = relationship
    item.ValueType = value_type
    item.ConceptNameCodeSequence = Sequence([name])
    for k, v in values.items():
        setattr(item, k, v)
    return item


def _base(sop_class: str, n: int, modality: str, charset: str | list[str] | None = None) -> Dataset:
    ds = Dataset()
    if charset is not None:
        ds.SpecificCharacterSet = charset
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = f"{ROOT}{n}.1"
    ds.StudyInstanceUID = f"{ROOT}7"
    ds.SeriesInstanceUID = f"{ROOT}{n}.2"
    ds.Modality = modality
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = PATIENT, PATIENT_ID, BIRTH, "F"
    ds.AccessionNumber = ACCESSION
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = STUDY_DATE
    ds.StudyTime = ds.ContentTime = "101500"
    ds.ReferringPhysicianName = REFERRER
    ds.OperatorsName = OPERATOR
    ds.InstitutionName = INSTITUTION
    ds.StudyID = "S4711"
    ds.SeriesNumber = ds.InstanceNumber = 1
    ds.Manufacturer = "ACME"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def structured_report(n: int = 1, sop_class: str = COMPREHENSIVE_SR) -> Dataset:
    """An SR whose content tree holds the patient's name, IDs, dates and UIDs in every item type."""
    ds = _base(sop_class, n, "SR")
    ds.ValueType = "CONTAINER"
    ds.ContinuityOfContent = "SEPARATE"
    ds.ConceptNameCodeSequence = Sequence([_code("18748-4", "LN", "Diagnostic Imaging Report")])
    ds.CompletionFlag, ds.VerificationFlag = "COMPLETE", "VERIFIED"
    observer = Dataset()
    observer.VerifyingObserverName = OBSERVER
    observer.VerifyingOrganization = INSTITUTION
    observer.VerificationDateTime = STUDY_DATE + "120000"
    observer.VerifyingObserverIdentificationCodeSequence = Sequence()
    ds.VerifyingObserverSequence = Sequence([observer])
    evidence = Dataset()
    evidence.StudyInstanceUID = ds.StudyInstanceUID
    series = Dataset()
    series.SeriesInstanceUID = f"{ROOT}99"
    sop = Dataset()
    sop.ReferencedSOPClassUID = CT_IMAGE
    sop.ReferencedSOPInstanceUID = f"{ROOT}99.1"
    series.ReferencedSOPSequence = Sequence([sop])
    evidence.ReferencedSeriesSequence = Sequence([series])
    ds.CurrentRequestedProcedureEvidenceSequence = Sequence([evidence])
    ds.PerformedProcedureCodeSequence = Sequence()
    ds.ReferencedPerformedProcedureStepSequence = Sequence()
    image_ref = Dataset()
    image_ref.ReferencedSOPClassUID = CT_IMAGE
    image_ref.ReferencedSOPInstanceUID = f"{ROOT}99.1"
    finding = _content("CONTAINER", "CONTAINS", _code("121070", "DCM", "Findings"), ContinuityOfContent="SEPARATE")
    finding.ContentSequence = Sequence([
        _content("TEXT", "CONTAINS", _code("121071", "DCM", "Finding"), TextValue=FREE_TEXT),
        _content("NUM", "CONTAINS", _code("410668003", "SCT", "Length"), MeasuredValueSequence=Sequence([
            _num("12.5")])),
        _content("IMAGE", "CONTAINS", _code("121112", "DCM", "Source of Measurement"),
                 ReferencedSOPSequence=Sequence([image_ref])),
    ])
    ds.ContentSequence = Sequence([
        _content("PNAME", "HAS OBS CONTEXT", _code("121008", "DCM", "Person Observer Name"), PersonName=OBSERVER),
        _content("TEXT", "HAS OBS CONTEXT", _code("121009", "DCM", "Person Observer's Organization Name"),
                 TextValue=INSTITUTION),
        _content("PNAME", "HAS OBS CONTEXT", _code("121029", "DCM", "Subject Name"), PersonName=PATIENT),
        _content("TEXT", "HAS OBS CONTEXT", _code("121030", "DCM", "Subject ID"), TextValue=PATIENT_ID),
        _content("DATE", "HAS OBS CONTEXT", _code("121031", "DCM", "Subject Birth Date"), Date=BIRTH),
        _content("DATETIME", "HAS OBS CONTEXT", _code("111526", "DCM", "DateTime Started"), DateTime=STUDY_DATE + "101500"),
        _content("TIME", "HAS OBS CONTEXT", _code("111527", "DCM", "Time Started"), Time="101500"),
        _content("UIDREF", "HAS OBS CONTEXT", _code("121018", "DCM", "Procedure Study Instance UID"),
                 UID=ds.StudyInstanceUID),
        _content("CODE", "HAS CONCEPT MOD", _code("121049", "DCM", "Language of Content Item and Descendants"),
                 ConceptCodeSequence=Sequence([_code("en", "RFC5646", "English")])),
        finding,
    ])
    return ds


def _num(value: str) -> Dataset:
    m = Dataset()
    m.NumericValue = value
    m.MeasurementUnitsCodeSequence = Sequence([_code("mm", "UCUM", "millimeter")])
    return m


def presentation_state(n: int = 2) -> Dataset:
    """A GSPS whose text annotations name the patient and staff and write the dates."""
    ds = _base(GSPS, n, "PR")
    ds.ContentLabel = "ANNOTATION"
    ds.ContentDescription = "measurements"
    ds.ContentCreatorName = OPERATOR
    ds.PresentationCreationDate = STUDY_DATE
    ds.PresentationCreationTime = "101500"
    ref_image = Dataset()
    ref_image.ReferencedSOPClassUID = CT_IMAGE
    ref_image.ReferencedSOPInstanceUID = f"{ROOT}99.1"
    ref_series = Dataset()
    ref_series.SeriesInstanceUID = f"{ROOT}99"
    ref_series.ReferencedImageSequence = Sequence([ref_image])
    ds.ReferencedSeriesSequence = Sequence([ref_series])
    layer = Dataset()
    layer.GraphicLayer = "LAYER1"
    layer.GraphicLayerOrder = 1
    ds.GraphicLayerSequence = Sequence([layer])
    text1 = Dataset()
    text1.UnformattedTextValue = "Quarrington E. 1234567 15.03.1947: nodule 12 mm"
    text1.BoundingBoxAnnotationUnits = "PIXEL"
    text1.BoundingBoxTopLeftHandCorner = [10.0, 10.0]
    text1.BoundingBoxBottomRightHandCorner = [200.0, 30.0]
    text1.BoundingBoxTextHorizontalJustification = "LEFT"
    text2 = Dataset()
    text2.UnformattedTextValue = "measured by Brackenridge 2024-05-11, Riverside Mercy Hospital"
    text2.AnchorPointAnnotationUnits = "PIXEL"
    text2.AnchorPoint = [50.0, 60.0]
    text2.AnchorPointVisibility = "Y"
    graphic = Dataset()
    graphic.GraphicAnnotationUnits = "PIXEL"
    graphic.GraphicDimensions = 2
    graphic.NumberOfGraphicPoints = 2
    graphic.GraphicData = [50.0, 60.0, 80.0, 90.0]
    graphic.GraphicType = "POLYLINE"
    graphic.GraphicFilled = "N"
    annotation = Dataset()
    annotation.ReferencedImageSequence = Sequence([ref_image])
    annotation.GraphicLayer = "LAYER1"
    annotation.TextObjectSequence = Sequence([text1, text2])
    annotation.GraphicObjectSequence = Sequence([graphic])
    ds.GraphicAnnotationSequence = Sequence([annotation])
    return ds


def rt_structure_set(n: int = 3) -> Dataset:
    """An RT structure set whose ROI names, descriptions and observation labels name staff."""
    ds = _base(RT_STRUCT, n, "RTSTRUCT")
    ds.StructureSetLabel = "Plan Thistlewood"
    ds.StructureSetDate = STUDY_DATE
    ds.StructureSetTime = "101500"
    ds.FrameOfReferenceUID = f"{ROOT}55"
    ref_for = Dataset()
    ref_for.FrameOfReferenceUID = ds.FrameOfReferenceUID
    ds.ReferencedFrameOfReferenceSequence = Sequence([ref_for])
    rois = []
    observations = []
    labels = [("GTV Dr Thistlewood", "drawn by Wolverton 2024-05-11"), ("PTV_Wolverton", "margin 5 mm"),
              ("SpinalCord", "contoured by J. Wolverton, Riverside")]
    for i, (name, desc) in enumerate(labels, start=1):
        roi = Dataset()
        roi.ROINumber = i
        roi.ReferencedFrameOfReferenceUID = ds.FrameOfReferenceUID
        roi.ROIName = name
        roi.ROIDescription = desc
        roi.ROIGenerationAlgorithm = "MANUAL"
        rois.append(roi)
        obs = Dataset()
        obs.ObservationNumber = i
        obs.ReferencedROINumber = i
        obs.ROIObservationLabel = f"{name[:3]} Wolverton"  # SH: 16 characters at most
        obs.RTROIInterpretedType = "ORGAN" if name == "SpinalCord" else "PTV"
        obs.ROIInterpreter = INTERPRETER
        observations.append(obs)
    ds.StructureSetROISequence = Sequence(rois)
    ds.RTROIObservationsSequence = Sequence(observations)
    return ds


def free_text_image(n: int = 4) -> Dataset:
    """A small CT whose comments and descriptions hold every written form of the identifiers."""
    ds = _base(CT_IMAGE, n, "CT")
    ds.ImageComments = FREE_TEXT
    ds.StudyComments = "Prior study 11/05/2024 for patient 123-4567, see ACX20240511; " + KEEP_WORDS[0]
    ds.StudyDescription = "CT chest Quarrington"
    ds.SeriesDescription = "Thorax 1.0 B70f"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.BurnedInAnnotation = "NO"
    ds.Rows = ds.Columns = 2
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.PixelData = b"\0" * 8
    return ds


def japanese_text(n: int = 5) -> Dataset:
    """A PN in ISO 2022 JIS (kanji, kana, romaji) and free text naming the patient in kanji."""
    ds = free_text_image(n)
    ds.SpecificCharacterSet = ["", "ISO 2022 IR 87"]
    ds.PatientName = JP_NAME
    ds.ImageComments = JP_TEXT
    ds.StudyComments = "ヤマダ タロウ様 (Tarou Yamada) 経過観察"
    ds.StudyDescription = "CT chest"
    return ds


def korean_text(n: int = 6) -> Dataset:
    ds = free_text_image(n)
    ds.SpecificCharacterSet = ["", "ISO 2022 IR 149"]
    ds.PatientName = KO_NAME
    ds.ImageComments = KO_TEXT
    ds.StudyComments = "Gildong Hong follow-up"
    ds.StudyDescription = "CT chest"
    return ds


def utf8_text(n: int = 7) -> Dataset:
    ds = free_text_image(n)
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName = UTF8_NAME
    ds.ImageComments = UTF8_TEXT
    ds.StudyComments = "Kontrolle Frau Mullerova"
    ds.StudyDescription = "CT chest"
    return ds


KINDS = {
    "sr_comprehensive": lambda n: structured_report(n, COMPREHENSIVE_SR),
    "sr_enhanced": lambda n: structured_report(n, ENHANCED_SR),
    "presentation_state": presentation_state,
    "rt_structure_set": rt_structure_set,
    "free_text": free_text_image,
    "japanese_iso2022": japanese_text,
    "korean_iso2022": korean_text,
    "utf8": utf8_text,
}
KIND_FORMS = {"japanese_iso2022": JP_FORMS, "korean_iso2022": KO_FORMS, "utf8": UTF8_FORMS}


def forms_of(kind: str) -> tuple[str, ...]:
    return FORMS + KIND_FORMS.get(kind, ())


def encode(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def decode(data: bytes) -> Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dcmread(io.BytesIO(data))


def write_corpus(folder: Path, per_kind: int = 1) -> dict[str, list[Path]]:
    """Files of every kind under ``folder``; kind -> paths."""
    folder.mkdir(parents=True, exist_ok=True)
    out: dict[str, list[Path]] = {}
    n = 100
    for kind, build in KINDS.items():
        for _ in range(per_kind):
            n += 1
            path = folder / f"{kind}-{n}.dcm"
            path.write_bytes(encode(build(n)))
            out.setdefault(kind, []).append(path)
    return out


def texts(ds: Dataset) -> list[str]:
    """Every value of ``ds`` (file meta, nested items) as decoded text."""
    found: list[str] = []
    meta = getattr(ds, "file_meta", None)
    for elem in [*(meta.iterall() if meta is not None else ()), *ds.iterall()]:
        if elem.VR == "SQ":
            continue
        value = elem.value
        if isinstance(value, bytes):
            found.append(value.decode("latin-1"))
        elif isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
            found.extend(str(v) for v in value)
        else:
            found.append(str(value))
    return found


def _encodings(form: str) -> Iterable[bytes]:
    for codec in ("utf_8", "latin_1", "euc_kr", "gb18030", "shift_jis", "euc_jp"):
        try:
            yield form.encode(codec)
        except UnicodeEncodeError:
            pass
    try:
        jis = form.encode("iso2022_jp")
    except UnicodeEncodeError:
        return
    if not form.isascii():
        yield jis.replace(b"\x1b(B", b"")  # ESC $ B + the 7-bit pairs


def leaks(data: bytes, forms: Iterable[str]) -> list[str]:
    """The forms found in an output file: in its decoded values (case-insensitive) or its bytes."""
    decoded = "\n".join(texts(decode(data))).upper()
    found = []
    for form in forms:
        if form.upper() in decoded:
            found.append(form)
            continue
        encodings = set(_encodings(form)) | (set(_encodings(form.upper())) if form.isascii() else set())
        if any(b in data for b in encodings if len(b) >= 4):
            found.append(f"{form} (bytes)")
    return found
