"""The de-identification engine: PS3.15 Annex E Table E.1-1, options, rules, keyed remapping.

One pass over the dataset (recursing into sequences) applies the pre-resolved action of each
tag; a residual-PHI scan of the output follows. Any doubt raises DeidError, never a partial
result: the caller quarantines the instance.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import pydicom
from pydicom.datadict import keyword_dict
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag
from pydicom._uid_dict import UID_dictionary

from deid_router.config import DeidConfig
from deid_router.deid import actions as act
from deid_router.deid import dates
from deid_router.deid.crosswalk import Crosswalk, NullCrosswalk, load_patient_mapping
from deid_router.deid.keys import Keys
from deid_router.deid.pixel_rules import OCR_CLEAR, PixelRule, find_rule, load_rules
from deid_router.deid.profile import CURVE, EDITION, OVERLAY_COMMENTS, OVERLAY_DATA, PRIVATE, Profile
from deid_router.deid.raw import Element, Reader
from deid_router.deid.residual import NAME_KEYWORDS, PATIENT_KEYWORDS, TEXT_VRS as WEAK_VRS, VALUE_KEYWORDS
from deid_router.deid.residual import Identifiers, scan
from deid_router.deid.writer import _ui_text, element_bytes
from deid_router.errors import DeidError, QueueError, StorageError

log = logging.getLogger(__name__)

METHOD = f"deid-router 0.1 PS3.15 E.1-1 {EDITION}"

_T_PATIENT_NAME = 0x00100010
_T_PATIENT_ID = 0x00100020
_T_ISSUER = 0x00100021
_T_BIRTH_DATE = 0x00100030
_T_ACCESSION = 0x00080050
_T_STUDY_ID = 0x00200010
_T_OTHER_IDS_SEQ = 0x00101002
_T_BURNED_IN = 0x00280301
_T_SOP_INSTANCE = 0x00080018
_T_SOP_CLASS = 0x00080016
_T_IDENTITY_REMOVED = 0x00120062
_T_METHOD = 0x00120063
_T_METHOD_CODES = 0x00120064
_T_LONGITUDINAL = 0x00280303
_PSEUDO_TAGS = frozenset({_T_PATIENT_NAME, _T_PATIENT_ID, _T_ACCESSION, _T_STUDY_ID})
_OWN_TAGS = frozenset({_T_IDENTITY_REMOVED, _T_METHOD, _T_METHOD_CODES, _T_LONGITUDINAL,
                       _T_PATIENT_ID, _T_PATIENT_NAME})
# UIDs that name classes, syntaxes and coding schemes are never instance-identifying.
_CLASS_UID_TAGS = frozenset(
    int(tag) for kw, tag in keyword_dict.items()
    if kw.endswith(("ClassUID", "TransferSyntaxUID", "CodingSchemeUID", "MappingResourceUID"))
    or kw in ("PrivateInformationCreatorUID", "ContextGroupExtensionCreatorUID", "TemplateExtensionCreatorUID")
)
# File meta elements that may carry a sender's identity.
_META_DROP = (0x00020016, 0x00020017, 0x00020018, 0x00020100, 0x00020102)

OPTION_CODES: dict[str, tuple[str, str]] = {
    "basic": ("113100", "Basic Application Confidentiality Profile"),
    "clean_graphics": ("113103", "Clean Graphics Option"),
    "clean_structured_content": ("113104", "Clean Structured Content Option"),
    "clean_descriptors": ("113105", "Clean Descriptors Option"),
    "retain_long_full_dates": ("113106", "Retain Longitudinal Temporal Information Full Dates Option"),
    "retain_long_modified_dates": ("113107", "Retain Longitudinal Temporal Information Modified Dates Option"),
    "retain_patient_characteristics": ("113108", "Retain Patient Characteristics Option"),
    "retain_device_identity": ("113109", "Retain Device Identity Option"),
    "retain_uids": ("113110", "Retain UIDs Option"),
    "retain_safe_private": ("113111", "Retain Safe Private Option"),
    "retain_institution_identity": ("113112", "Retain Institution Identity Option"),
}
PIXEL_CODE = ("113101", "Clean Pixel Data Option")  # CID 7050
_SC_US_PREFIXES = ("1.2.840.10008.5.1.4.1.1.7.", "1.2.840.10008.5.1.4.1.1.6.")
_SC_US_EXACT = frozenset({"1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.3.1"})
_DATE_VRS = frozenset({"DA", "DT"})
_UNCHANGED = object()
# Remapped UIDs kept for reuse; HMAC is cheap, so the cache only has to stay small.
_UID_CACHE_MAX = 50_000


@dataclass(frozen=True)
class DeidResult:
    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    modality: str


class _State:
    """Per-instance working state of one de-identification."""

    __slots__ = ("ids", "offset", "patient_key", "patient_id_out", "patient_name_out", "pending")

    def __init__(self) -> None:
        self.ids = Identifiers()
        self.offset = 0
        self.patient_key = ""
        self.patient_id_out = ""
        self.patient_name_out = ""
        self.pending: list[tuple[str, str, str]] = []

    def add_kept(self, rd: Reader, ds: Dataset, tag: BaseTag, elem: Element, vr: str) -> None:
        self.ids.add_kept_element(rd, ds, elem, vr)


def _first(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, MultiValue)):
        return str(value[0]) if len(value) else ""
    return str(value)


def _path_name(tag: int) -> str:
    elem_kw = pydicom.datadict.keyword_for_tag(tag) if not (tag >> 16) & 1 else ""
    return elem_kw or f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def _single(elem: pydicom.DataElement) -> Dataset:
    one = Dataset()
    one.add(elem)
    return one


def _get(ds: Dataset, rd: Reader, tag: int) -> object:
    """The value of ``tag`` in ``ds`` read without converting the element; None if absent."""
    key = BaseTag(tag)
    elem = ds._dict.get(key)
    if elem is None:
        return None
    vr = rd.vr(ds, key, elem)
    return rd.value(ds, key, ds._dict[key], vr)


class Deidentifier:
    """De-identifies datasets and files according to one DeidConfig and one secret."""

    def __init__(self, config: DeidConfig, keys: Keys, crosswalk: Crosswalk | None = None) -> None:
        self.config = config
        self.keys = keys
        self.crosswalk: Crosswalk = crosswalk if crosswalk is not None else NullCrosswalk()
        self.profile = Profile.build(config)
        self._actions = self.profile.actions
        self._patterns = self.profile.patterns
        self._mapping: dict[str, str] | None = (
            load_patient_mapping(config.patient_mapping_csv) if config.patient_mapping_csv else None
        )
        self._uid_cache: dict[str, str] = {}
        self._constants: dict[tuple[bool, bool], dict[int, RawDataElement]] = {}
        self._generic = tuple(p for p in config.patient_name_pattern.replace("{pseudonym}", "^").split("^") if p)
        codes = [OPTION_CODES["basic"]] + [OPTION_CODES[o] for o in config.options if o in OPTION_CODES]
        self._method_codes = tuple(codes)
        self._strong_name_tags = tuple(
            (int(keyword_dict[k]), k in PATIENT_KEYWORDS) for k in NAME_KEYWORDS
            if k in keyword_dict and self._actions.get(int(keyword_dict[k]), "K") != "K"
        )
        self._strong_value_tags = tuple(
            (int(keyword_dict[k]), k in PATIENT_KEYWORDS) for k in VALUE_KEYWORDS
            if k in keyword_dict and self._actions.get(int(keyword_dict[k]), "K") != "K"
        )
        self.pixel_rules = load_rules(config.pixel_rules_file) if config.burned_in_annotation == "clean" else ()
        if self.profile.full_dates:
            self._longitudinal = "UNMODIFIED"
        elif self.profile.shift_dates:
            self._longitudinal = "MODIFIED"
        else:
            self._longitudinal = "REMOVED"

    # ------------------------------------------------------------------ public API
    def deidentify(self, ds: Dataset) -> Dataset:
        """De-identify ``ds`` (including file_meta) in place and return it."""
        try:
            return self._deidentify(ds)
        except (DeidError, QueueError, StorageError):
            raise  # infrastructure trouble is retried by the caller, never quarantined
        except Exception as exc:
            # The dataset is in memory: an OSError here is pydicom failing to parse a value
            # (a malformed sequence reads "No tag to read at file position ..."), not the
            # disk; retrying it would only fail again. The crosswalk's database errors arrive
            # as QueueError.  # every surprise quarantines: never forward a half-done dataset
            raise DeidError("invalid_dataset", f"unexpected {type(exc).__name__}") from exc

    def deidentify_file(self, src: Path, dst: BinaryIO) -> DeidResult:
        """Header-only de-identification of a Part-10 file; pixel data bytes are copied raw."""
        from deid_router.deid.file_io import deidentify_file

        return deidentify_file(self, src, dst)

    def result_of(self, ds: Dataset) -> DeidResult:
        meta = getattr(ds, "file_meta", None)
        ts = str(getattr(meta, "TransferSyntaxUID", "") or "") if meta is not None else ""
        rd = Reader.of(ds)

        def text(tag: int) -> str:
            value = _get(ds, rd, tag)
            if isinstance(value, list):
                value = ds[tag].value
            return str(value or "")

        return DeidResult(
            sop_class_uid=text(_T_SOP_CLASS),
            sop_instance_uid=text(_T_SOP_INSTANCE),
            study_instance_uid=text(0x0020000D),
            series_instance_uid=text(0x0020000E),
            transfer_syntax_uid=ts,
            modality=text(0x00080060),
        )

    # ------------------------------------------------------------------ top level
    def _deidentify(self, ds: Dataset) -> Dataset:
        rd = Reader.of(ds)
        if not _first(_get(ds, rd, _T_SOP_INSTANCE)).strip():
            raise DeidError("invalid_dataset", "SOPInstanceUID is missing", "SOPInstanceUID")
        self._check_burned_in(ds, rd)
        pixel_rule = self.pixel_decision(ds)
        st = _State()
        self._prepare(ds, st, rd)
        self._walk(ds, st, "", top=True, parent=rd)
        self._finish(ds, st)
        if pixel_rule is not None and pixel_rule is not OCR_CLEAR:
            self._pixels_cleaned(ds, pixel_rule, st.ids.strong | st.ids.context)
        for kind, original, pseudonym in st.pending:
            self.crosswalk.record(kind, original, pseudonym)
        return ds

    def _check_burned_in(self, ds: Dataset, rd: Reader) -> None:
        if self.config.burned_in_annotation != "quarantine":
            return
        value = _first(_get(ds, rd, _T_BURNED_IN)).strip().upper()
        if value == "YES":
            raise DeidError("burned_in_annotation", "BurnedInAnnotation is YES", "BurnedInAnnotation")
        if not value:
            sop = _first(_get(ds, rd, _T_SOP_CLASS)).strip()
            if sop in _SC_US_EXACT or sop.startswith(_SC_US_PREFIXES):
                raise DeidError(
                    "burned_in_annotation", "BurnedInAnnotation absent on a secondary-capture/ultrasound class",
                    "BurnedInAnnotation",
                )

    # ------------------------------------------------------------------ pixels
    def pixel_decision(self, ds: Dataset) -> PixelRule | None:
        """With ``burned_in_annotation = "clean"``: the pixel rule an image that may carry
        burned-in text is cleaned by (or OCR_CLEAR); None when its pixels need no cleaning.
        Raises DeidError('burned_in_no_rule') when no rule matches. Read from the original header."""
        if self.config.burned_in_annotation != "clean":
            return None
        rd = Reader.of(ds)
        value = _first(_get(ds, rd, _T_BURNED_IN)).strip().upper()
        sop = _first(_get(ds, rd, _T_SOP_CLASS)).strip()
        if value != "YES" and (value or not (sop in _SC_US_EXACT or sop.startswith(_SC_US_PREFIXES))):
            return None
        rows, columns = _first(_get(ds, rd, 0x00280010)).strip(), _first(_get(ds, rd, 0x00280011)).strip()
        if not rows.isdigit() or not columns.isdigit():
            return None  # not an image: there are no pixels to clean
        software = _get(ds, rd, 0x00181020)
        attrs = {
            "manufacturer": _first(_get(ds, rd, 0x00080070)).strip(),
            "model": _first(_get(ds, rd, 0x00081090)).strip(),
            "software_version": "\\".join(str(v) for v in software) if isinstance(software, (list, MultiValue))
            else _first(software).strip(),
            "modality": _first(_get(ds, rd, 0x00080060)).strip(),
            "sop_class_uid": sop,
            "photometric_interpretation": _first(_get(ds, rd, 0x00280004)).strip(),
        }
        rule = find_rule(self.pixel_rules, attrs, int(rows), int(columns))
        if rule is not None:
            return rule
        if self.config.pixel_no_rule == "ocr_clear":
            return OCR_CLEAR
        raise DeidError("burned_in_no_rule", "no pixel rule matches this device and image", "BurnedInAnnotation")

    def strong_identifiers(self, ds: Dataset) -> set[str]:
        """The strong identifiers of an original header (what OCR must not read in the pixels)."""
        st = _State()
        rd = Reader.of(ds)
        store = ds._dict
        for tags, add in ((self._strong_name_tags, st.ids.add_name), (self._strong_value_tags, st.ids.add_value)):
            for t, patient in tags:
                key = BaseTag(t)
                if key in store and rd.vr(ds, key, store[key]) != "SQ":
                    value = _get(ds, rd, t)
                    for v in ([value] if not isinstance(value, (list, MultiValue)) else list(value)) if value else ():
                        add(str(v), patient)
        if self._actions.get(_T_BIRTH_DATE, "K") != "K":
            bd = _get(ds, rd, _T_BIRTH_DATE)
            if bd:
                st.ids.add_birth_date(_first(bd))
        return st.ids.strong | st.ids.context

    def _pixels_cleaned(self, ds: Dataset, rule: PixelRule, strong: set[str]) -> None:
        """Record the Clean Pixel Data Option; a dataset that holds its pixels is cleaned here."""
        from deid_router.deid import pixels

        if BaseTag(0x7FE00010) in ds._dict:
            ts = str(ds.file_meta.get("TransferSyntaxUID", "") or "")
            plan = pixels.make_plan(ds, ts, rule, ocr_frames=3 if self.config.pixel_ocr else 0)
            sampler = pixels.FrameSampler(plan, ds) if self.config.pixel_ocr else None
            pixels.clean_dataset(plan, ds, sampler)
            if sampler is not None:
                sampler.verify(strong)
        ds.BurnedInAnnotation = "NO"
        seq = ds.DeidentificationMethodCodeSequence
        if not any(str(it.get("CodeValue", "")) == PIXEL_CODE[0] for it in seq):
            seq.append(_method_code_item(*PIXEL_CODE))
        old = ds.DeidentificationMethod
        methods = [str(v) for v in (old if isinstance(old, (list, MultiValue)) else [old]) if v]
        text = f"Clean Pixel Data: rule {rule.name}"[:64]
        if text not in methods:
            methods.append(text)
        ds.DeidentificationMethod = methods if len(methods) > 1 else methods[0]

    def _prepare(self, ds: Dataset, st: _State, rd: Reader) -> None:
        """Collect the strong identifiers and derive the patient's pseudonyms and date offset."""
        ids = st.ids
        store = ds._dict
        for t, patient in self._strong_name_tags:
            if BaseTag(t) in store:
                value = _get(ds, rd, t)
                if value:
                    for v in ([value] if not isinstance(value, (list, MultiValue)) else list(value)):
                        ids.add_name(str(v), patient)
        for t, patient in self._strong_value_tags:
            key = BaseTag(t)
            if key in store and rd.vr(ds, key, store[key]) != "SQ":
                value = _get(ds, rd, t)
                if value:
                    for v in ([value] if not isinstance(value, (list, MultiValue)) else list(value)):
                        ids.add_value(str(v), patient)
        if BaseTag(_T_OTHER_IDS_SEQ) in store:
            other = ds[_T_OTHER_IDS_SEQ]
            if other.VR == "SQ":
                for item in other.value or ():
                    pid_v = _get(item, Reader.of(item, rd), _T_PATIENT_ID)
                    if pid_v:
                        ids.add_value(str(pid_v))
        if self._actions.get(_T_BIRTH_DATE, "K") != "K":
            bd = _get(ds, rd, _T_BIRTH_DATE)
            if bd:
                ids.add_birth_date(_first(bd))
        pid = _first(_get(ds, rd, _T_PATIENT_ID) or "").strip()
        issuer = _first(_get(ds, rd, _T_ISSUER) or "").strip()
        st.patient_key = issuer + "\0" + pid
        cfg = self.config
        subject = None
        if self._mapping is not None:
            subject = self._mapping.get(pid)
            if subject is None:
                subject = self.crosswalk.preassigned(pid)
            if subject is None:
                raise DeidError("unmapped_patient", "PatientID not in the patient mapping", "PatientID")
        else:
            subject = self.crosswalk.preassigned(pid)
        if subject is not None:
            st.patient_id_out = subject
            core = subject
        else:
            core = self.keys.pseudonym("patient_id", st.patient_key, cfg.pseudonym_length)
            st.patient_id_out = cfg.pseudonym_prefix + core
        st.patient_name_out = cfg.patient_name_pattern.format(pseudonym=core)
        st.pending.append(("patient_id", st.patient_key, st.patient_id_out))
        st.offset = self.keys.day_offset(st.patient_key, cfg.date_shift_min_days, cfg.date_shift_max_days)

    # ------------------------------------------------------------------ the walk
    def _remap(self, value: str, st: _State) -> str:
        v = value.strip().rstrip("\0")
        if not v:
            return ""
        out = self._uid_cache.get(v)
        if out is None:
            out = self.keys.uid(v)
            if len(self._uid_cache) >= _UID_CACHE_MAX:  # bounded: a worker runs for days
                self._uid_cache.clear()
            self._uid_cache[v] = out
        st.ids.orig_uids.add(v)
        return out

    def _remap_value(self, value: object, st: _State, force: bool) -> object:
        """Remap one or many UIDs; registered UIDs stay unless ``force``."""
        if isinstance(value, (list, MultiValue)):
            return [self._remap_one(str(v), st, force) for v in value]
        if value is None:
            return value
        return self._remap_one(str(value), st, force)

    def _remap_one(self, v: str, st: _State, force: bool) -> str:
        s = v.strip().rstrip("\0")
        if not s:
            return ""
        if not force and s in UID_dictionary:
            return s
        return self._remap(s, st)

    def _shift(self, vr: str, value: object, st: _State) -> object:
        fn = dates.shift_da if vr == "DA" else dates.shift_dt
        if isinstance(value, (list, MultiValue)):
            out = [fn(str(v), st.offset) for v in value]
            return [o for o in out if o] or ""
        if value is None or value == "":
            return value
        return fn(str(value), st.offset)

    def _walk(self, ds: Dataset, st: _State, path: str, top: bool = False, parent: Reader | None = None) -> None:
        actions = self._actions
        patterns = self._patterns
        ids = st.ids
        profile = self.profile
        rd = Reader.of(ds, parent)
        creators: list[BaseTag] = []
        kept_blocks: set[int] = set()
        overlay_x = patterns[OVERLAY_DATA] == "X"
        private_action = patterns[PRIVATE]
        store = ds._dict
        for tag, elem in list(store.items()):
            t = int(tag)
            group = t >> 16
            a = actions.get(t)
            if a is None:
                if group & 1:
                    lo = t & 0xFFFF
                    if lo < 0x10:
                        del store[tag]
                        continue
                    if lo <= 0xFF:
                        creators.append(tag)
                        continue
                    creator_tag = (t & 0xFFFF0000) | (lo >> 8)
                    if private_action == "C":
                        c = store.get(BaseTag(creator_tag))
                        cval = ""
                        if c is not None:
                            cval = _first(rd.value(ds, BaseTag(creator_tag), c, rd.vr(ds, BaseTag(creator_tag), c)))
                            cval = cval.strip().upper()
                        if cval and (cval, group, lo & 0xFF) in profile.safe_private:
                            kept_blocks.add(creator_tag)
                            vr = rd.vr(ds, tag, elem)
                            if vr == "SQ":
                                for i, item in enumerate(ds[tag].value or ()):
                                    self._walk(item, st, f"{path}{_path_name(t)}[{i}].", parent=rd)
                            else:
                                st.add_kept(rd, ds, tag, store[tag], vr)
                            continue
                    del store[tag]
                    continue
                if (group & 0xFF00) == 0x5000:
                    a = patterns[CURVE]
                elif (group & 0xFF01) == 0x6000 and group <= 0x601E:
                    lo = t & 0xFFFF
                    if lo == 0x3000:
                        a = patterns[OVERLAY_DATA]
                    elif lo == 0x4000:
                        a = patterns[OVERLAY_COMMENTS]
                    else:
                        a = "X" if overlay_x else ""
                    if overlay_x:
                        a = "X"
                elif group == 0x0002:
                    continue
                else:
                    a = ""
            elif group & 1:
                # an explicit rule on a private tag: its block's creator stays if it is kept
                if a != "X":
                    kept_blocks.add((t & 0xFFFF0000) | ((t & 0xFFFF) >> 8))
            vr = rd.vr(ds, tag, elem)
            elem = store[tag]  # rd.vr may have converted it
            if a == "X":
                if vr == "SQ":
                    self._collect_removed(ds[tag].value, st, rd)
                elif vr in WEAK_VRS:
                    ids.add_weak(vr, rd.value(ds, tag, elem, vr))
                del store[tag]
                continue
            if vr == "SQ":
                seq = ds[tag]
                if a == "Z":
                    self._collect_removed(seq.value, st, rd)
                    seq.value = Sequence()
                else:
                    name = _path_name(t)
                    for i, item in enumerate(seq.value or ()):
                        self._walk(item, st, f"{path}{name}[{i}].", parent=rd)
                continue
            if a == "" or a == "K":
                if vr == "UI":
                    value = rd.value(ds, tag, elem, vr)
                    if a == "" and not profile.retain_uids and t not in _CLASS_UID_TAGS:
                        rd.set(ds, tag, elem, vr, self._remap_value(value, st, force=False))
                    else:
                        ids.kept_uids.update(str(v) for v in (value if isinstance(value, (list, MultiValue)) else [value]) if v)
                elif vr in _DATE_VRS and profile.shift_dates:
                    value = rd.value(ds, tag, elem, vr)
                    ids.add_weak(vr, value)
                    rd.set(ds, tag, elem, vr, self._shift(vr, value, st))
                elif vr == "AS" and a == "K":
                    value = rd.value(ds, tag, elem, vr)
                    if value:
                        rd.set(ds, tag, elem, vr, dates.clamp_age(_first(value)))
                    else:
                        st.add_kept(rd, ds, tag, elem, vr)
                else:
                    st.add_kept(rd, ds, tag, elem, vr)
                continue
            if t in _PSEUDO_TAGS and a in "ZDCUSH":
                pseudo = self._pseudonymize(rd.value(ds, tag, elem, vr), vr, t, st, top)
                if pseudo is not None:
                    rd.set(ds, tag, elem, vr, pseudo)
                    continue
            value = rd.value(ds, tag, elem, vr)
            new: object = _UNCHANGED
            if a == "Z":
                ids.add_weak(vr, value)
                new = act.empty(vr)
            elif a == "D":
                ids.add_weak(vr, value)
                if vr == "UI":
                    new = self._remap_value(value, st, force=True)
                elif vr in _DATE_VRS and profile.shift_dates:
                    new = self._shift(vr, value, st)
                else:
                    new = act.dummy(vr)
            elif a == "U":
                if vr == "UI":
                    new = self._remap_value(value, st, force=False)
                else:
                    ids.add_weak(vr, value)
                    new = act.dummy(vr)
            elif a == "C":
                if vr in _DATE_VRS:
                    ids.add_weak(vr, value)
                    new = self._shift(vr, value, st) if profile.shift_dates else act.empty(vr)
                elif vr == "AS":
                    new = dates.clamp_age(_first(value)) if value else value
                elif vr == "UI":
                    new = self._remap_value(value, st, force=False)
                elif vr in act.TEXT_VRS and value:
                    ids.add_kept(value)
                    if isinstance(value, (list, MultiValue)):
                        new = [ids.clean(str(v)) for v in value]
                    else:
                        new = ids.clean(str(value))
                else:
                    ids.add_kept(value)
            elif a == "S":
                if vr in _DATE_VRS:
                    ids.add_weak(vr, value)
                    new = self._shift(vr, value, st)
                elif vr != "TM":  # a timestamp that cannot be shifted is emptied, never kept
                    ids.add_weak(vr, value)
                    new = act.empty(vr)
            elif a == "H":
                ids.add_weak(vr, value)
                if vr == "UI":
                    new = self._remap_value(value, st, force=True)
                elif vr in act.TEXT_VRS and value:
                    new = act.fit(vr, self.keys.token(f"rule:{t:08X}", str(value)))
                else:
                    new = act.dummy(vr)
            elif a == "R":
                ids.add_weak(vr, value)
                new = self.profile.replace_values.get(t, "")
            if new is not _UNCHANGED:
                rd.set(ds, tag, elem, vr, new)
        for creator in creators:
            if int(creator) not in kept_blocks:
                del store[creator]

    def _pseudonymize(self, value: object, vr: str, t: int, st: _State, top: bool) -> str | None:
        """PatientID, PatientName, AccessionNumber, StudyID -> keyed pseudonyms. None: not handled."""
        if t == _T_PATIENT_ID:
            return st.patient_id_out if top else None
        if t == _T_PATIENT_NAME:
            return st.patient_name_out if top else None
        original = _first(value).strip()
        if not original:
            return ""
        kind = "accession_number" if t == _T_ACCESSION else "study_id"
        st.ids.add_weak(vr, original)
        pseudo = self.keys.pseudonym(kind, original, 16)
        st.pending.append((kind, original, pseudo))
        return pseudo

    def _collect_removed(self, items: object, st: _State, parent: Reader) -> None:
        """Record the identifying values inside a removed or emptied sequence."""
        actions = self._actions
        for item in items or ():  # type: ignore[attr-defined]
            rd = Reader.of(item, parent)
            for tag, elem in list(item._dict.items()):
                vr = rd.vr(item, tag, elem)
                if vr == "SQ":
                    self._collect_removed(item[tag].value, st, rd)
                    continue
                a = actions.get(int(tag), "K")
                if a not in ("K", "C") and vr in WEAK_VRS:
                    st.ids.add_weak(vr, rd.value(item, tag, item._dict[tag], vr))

    # ------------------------------------------------------------------ finishing
    def _constant_elements(self, implicit: bool, little: bool) -> dict[int, RawDataElement]:
        """The elements _finish adds to an instance without earlier de-identification, encoded once."""
        key = (implicit, little)
        found = self._constants.get(key)
        if found is not None:
            return found
        template = Dataset()
        template.PatientIdentityRemoved = "YES"
        template.DeidentificationMethod = METHOD
        seq = Sequence()
        for value, meaning in self._method_codes:
            seq.append(_method_code_item(value, meaning))
        template.DeidentificationMethodCodeSequence = seq
        template.LongitudinalTemporalInformationModified = self._longitudinal
        out: dict[int, RawDataElement] = {}
        for elem in template:
            body = element_bytes(_single(elem), implicit, little)
            skip = 8 if implicit or elem.VR not in ("SQ", "UT", "UC", "UR") else 12
            data = body[skip:]
            out[int(elem.tag)] = RawDataElement(
                BaseTag(elem.tag), elem.VR, len(data), data, 0, implicit, little)
        self._constants[key] = out
        return out

    def _finish(self, ds: Dataset, st: _State) -> None:
        implicit, little = ds.original_encoding
        if (implicit is not None and little is not None
                and BaseTag(_T_METHOD) not in ds._dict and BaseTag(_T_METHOD_CODES) not in ds._dict):
            for t, raw in self._constant_elements(implicit, little).items():
                ds._dict[BaseTag(t)] = raw
        else:
            self._finish_slow(ds)
        meta = getattr(ds, "file_meta", None)
        if isinstance(meta, (FileMetaDataset, Dataset)) and len(meta):
            for t in _META_DROP:
                if t in meta:
                    del meta[t]
            if "MediaStorageSOPInstanceUID" in meta:
                # a raw SOPInstanceUID whose bytes are its canonical encoding stays raw
                sop = ds._dict.get(BaseTag(_T_SOP_INSTANCE))
                text = _ui_text(sop) if type(sop) is RawDataElement else None
                key = BaseTag(0x00020003)
                if text and text.isascii() and getattr(meta._dict.get(key), "VR", None) == "UI":
                    meta._dict[key] = DataElement(key, "UI", text)
                else:
                    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        if hasattr(ds, "preamble"):
            ds.preamble = b"\0" * 128
        scan(ds, st.ids, _OWN_TAGS, _CLASS_UID_TAGS, self._generic, self.profile.shift_dates)

    def _finish_slow(self, ds: Dataset) -> None:
        ds.PatientIdentityRemoved = "YES"
        methods: list[str] = []
        if _T_METHOD in ds:
            old = ds[_T_METHOD].value
            methods = [str(v) for v in (old if isinstance(old, (list, MultiValue)) else [old]) if v]
        if METHOD not in methods:
            methods.append(METHOD)
        ds.DeidentificationMethod = methods if len(methods) > 1 else methods[0]
        seq = ds.DeidentificationMethodCodeSequence if _T_METHOD_CODES in ds else Sequence()
        present = {str(it.get("CodeValue", "")) for it in seq}
        for value, meaning in self._method_codes:
            if value not in present:
                seq.append(_method_code_item(value, meaning))
        ds.DeidentificationMethodCodeSequence = seq
        ds.LongitudinalTemporalInformationModified = self._longitudinal


def _method_code_item(value: str, meaning: str) -> Dataset:
    """One CID 7050 item of DeidentificationMethodCodeSequence (DCM scheme)."""
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = "DCM"
    item.CodeMeaning = meaning
    return item
