"""The de-identification engine: PS3.15 Annex E Table E.1-1, options, rules, keyed remapping.

One pass over the dataset (recursing into sequences) applies the pre-resolved action of each
tag; a residual-PHI scan of the output follows. Any doubt raises DeidError, never a partial
result: the caller quarantines the instance.
"""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path
from typing import BinaryIO, Callable

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
from deid_router.deid import clean as cleaning
from deid_router.deid.actions import Action
from deid_router.deid import dates, iod_types
from deid_router.deid.accounting import check_accounted
from deid_router.deid.crosswalk import Crosswalk, NullCrosswalk, load_patient_mapping
from deid_router.deid.file_io import DeidResult, deidentify_file
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
_T_CSD = BaseTag(0x00080102)
_T_CODE_VALUE, _T_LONG_CODE, _T_URN_CODE = BaseTag(0x00080100), BaseTag(0x00080119), BaseTag(0x00080120)
_T_REF_SERIES = 0x00081115  # the Common Instance Reference Module
_T_REF_STUDIES = 0x00081200
_PSEUDO_TAGS = frozenset({_T_PATIENT_NAME, _T_PATIENT_ID, _T_ACCESSION, _T_STUDY_ID})
# the actions under which those four get keyed pseudonyms instead
_PSEUDO_ACTIONS = frozenset({Action.EMPTY, Action.DUMMY, Action.CLEAN, Action.UID, Action.SHIFT, Action.HASH})
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
_DEFERRED = object()  # a C value, cleaned after the walk (clean.Cleaning)
# Remapped UIDs kept for reuse; HMAC is cheap, so the cache only has to stay small.
_UID_CACHE_MAX = 50_000


class _State:
    """Per-instance working state of one de-identification."""

    __slots__ = ("ids", "offset", "patient_key", "patient_id_out", "patient_name_out", "pending",
                 "ciod", "top_actions", "written", "derived", "referencing", "cleaning")

    def __init__(self, ciod: str | None = None, top_actions: dict[int, Action] | None = None,
                 referencing: bool = False) -> None:
        self.ciod = ciod
        self.referencing = referencing
        self.top_actions: dict[int, Action] = top_actions if top_actions is not None else {}
        # every value the engine wrote, and every UID the keyed map derived (the output check)
        self.written: set[str] = set()
        self.derived: set[str] = set()
        self.ids = Identifiers()
        self.offset = 0
        self.patient_key = ""
        self.patient_id_out = ""
        self.patient_name_out = ""
        self.pending: list[tuple[str, str, str]] = []
        self.cleaning = cleaning.Cleaning()

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
            if k in keyword_dict and self._actions.get(int(keyword_dict[k]), Action.KEEP) != Action.KEEP
        )
        self._strong_value_tags = tuple(
            (int(keyword_dict[k]), k in PATIENT_KEYWORDS) for k in VALUE_KEYWORDS
            if k in keyword_dict and self._actions.get(int(keyword_dict[k]), Action.KEEP) != Action.KEEP
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
        ciod = iod_types.ciod_of(_first(_get(ds, rd, _T_SOP_CLASS)).strip().rstrip("\0"))
        referencing = BaseTag(_T_REF_SERIES) in ds._dict or BaseTag(_T_REF_STUDIES) in ds._dict
        st = _State(ciod, self.profile.actions_in(ciod, -1, referencing), referencing)
        self._prepare(ds, st, rd)
        self._walk(ds, st, "", top=True, parent=rd)
        st.cleaning.apply(st.ids, partial(self._put, st))  # C values, now that every identifier is known
        self._finish(ds, st)
        if pixel_rule is not None and pixel_rule is not OCR_CLEAR:
            self._pixels_cleaned(ds, pixel_rule, st.ids.literal_terms())
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
        return st.ids.literal_terms()

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
                        ids.add_value(str(v), patient, split=t in cleaning.INSTITUTION_TAGS)
        if BaseTag(_T_OTHER_IDS_SEQ) in store:
            other = ds[_T_OTHER_IDS_SEQ]
            if other.VR == "SQ":
                for item in other.value or ():
                    pid_v = _get(item, Reader.of(item, rd), _T_PATIENT_ID)
                    if pid_v:
                        ids.add_value(str(pid_v))
        cleaning.collect_context(ds, rd, self._actions, ids)  # names and institutions inside sequences
        if self._actions.get(_T_BIRTH_DATE, Action.KEEP) != Action.KEEP:
            bd = _get(ds, rd, _T_BIRTH_DATE)
            if bd:
                ids.add_birth_date(_first(bd))
        pid = _first(_get(ds, rd, _T_PATIENT_ID) or "").strip()
        issuer = _first(_get(ds, rd, _T_ISSUER) or "").strip()
        st.patient_key = issuer + "\0" + pid
        cfg = self.config
        subject = None
        if self._mapping is not None:  # a clinical trial's subject ids: every patient must be mapped
            subject = self._mapping.get(pid)
            if subject is None:
                raise DeidError("unmapped_patient", "PatientID not in the patient mapping", "PatientID")
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
        st.derived.add(out)
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

    def _put(self, st: _State, rd: Reader, ds: Dataset, tag: BaseTag, elem: Element, vr: str, value: object) -> None:
        """Store a value the engine wrote, and remember it for the output check."""
        written = st.written
        if isinstance(value, (list, tuple, MultiValue)):
            for v in value:
                written.add(str(v).strip(" \0"))
        elif value is not None:
            written.add(str(value).strip(" \0"))
        rd.set(ds, tag, elem, vr, value)

    def _date_policy(self, st: _State, rd: Reader, ds: Dataset, tag: BaseTag, elem: Element, vr: str,
                     kept: bool) -> None:
        """An untabled (or kept) DA/DT: shifted, kept by an option or a K action, else a dummy."""
        value = rd.value(ds, tag, elem, vr)
        if self.profile.shift_dates:
            st.ids.add_weak(vr, value)
            self._put(st, rd, ds, tag, elem, vr, self._shift(vr, value, st))
        elif kept or self.profile.full_dates or not value:
            st.add_kept(rd, ds, tag, elem, vr)
        else:
            st.ids.add_weak(vr, value)
            self._put(st, rd, ds, tag, elem, vr, act.dummy(vr))

    def _code_state(self, ds: Dataset, rd: Reader) -> bool | None:
        """None: ``ds`` is no coded entry; True: its scheme is registered; False: a local scheme."""
        store = ds._dict
        elem = store.get(_T_CSD)
        if elem is None or not (_T_CODE_VALUE in store or _T_LONG_CODE in store or _T_URN_CODE in store):
            return None  # no code (an item of CodingSchemeIdentificationSequence names a scheme)
        value = _first(rd.value(ds, _T_CSD, elem, "SH")).strip()
        return value in act.REGISTERED_SCHEMES

    def _dummy_code(self, ds: Dataset, st: _State) -> None:
        """Replace a coded entry of a local scheme by the dummy code triplet."""
        store = ds._dict
        for t in act.CODE_TAGS:
            key = BaseTag(t)
            if key in store:
                del store[key]
        for t, vr, value in act.DUMMY_CODE:
            key = BaseTag(t)
            store[key] = DataElement(key, vr, value)
            st.written.add(value)

    def _dummy_items(self, items: object, st: _State, parent: Reader) -> None:
        """D on a sequence: the same items, every text-bearing value a dummy of its VR, UIDs
        keyed, coded entries the dummy code triplet; coded strings and numbers stay (structure)."""
        profile = self.profile
        for item in items or ():  # type: ignore[attr-defined]
            rd = Reader.of(item, parent)
            store = item._dict
            coded = self._code_state(item, rd) is not None
            for tag, elem in list(store.items()):
                t = int(tag)
                if t >> 16 & 1:
                    del store[tag]
                    continue
                vr = rd.vr(item, tag, elem)
                elem = store[tag]
                if vr == "SQ":
                    self._dummy_items(item[tag].value, st, rd)
                elif coded and t in act.CODE_TAGS:
                    continue
                elif vr == "UI":
                    if t in _CLASS_UID_TAGS or profile.retain_uids:
                        st.add_kept(rd, item, tag, elem, vr)
                    else:
                        self._put(st, rd, item, tag, elem, vr,
                                  self._remap_value(rd.value(item, tag, elem, vr), st, force=True))
                elif vr in _DATE_VRS:
                    self._date_policy(st, rd, item, tag, elem, vr, kept=False)
                elif vr == "TM" and (profile.shift_dates or profile.full_dates):
                    st.add_kept(rd, item, tag, elem, vr)
                elif vr in act.SWEPT_VRS:
                    st.ids.add_weak(vr, rd.value(item, tag, elem, vr))
                    self._put(st, rd, item, tag, elem, vr, act.dummy(vr))
                elif vr in act.BINARY_VRS:
                    item[tag].value = act.dummy(vr)
                else:
                    st.add_kept(rd, item, tag, elem, vr)
            if coded:
                self._dummy_code(item, st)

    def _walk(self, ds: Dataset, st: _State, path: str, top: bool = False, parent: Reader | None = None,
              seq: int = -1, mode: str = "top") -> None:
        """Apply the resolved action of each element. ``mode`` says what the untabled values
        inside the items of a kept sequence become: ``sweep`` (text, names and dates replaced,
        codes of local schemes replaced by a dummy code), ``clean`` (text cleaned of this
        instance's identifiers) or ``keep`` (as sweep, but every coded entry stays: the
        sequence is one an option or a rule keeps, such as InstitutionCodeSequence)."""
        profile = self.profile
        actions = st.top_actions if top else profile.actions_in(st.ciod, seq, st.referencing)
        patterns = self._patterns
        ids = st.ids
        rd = Reader.of(ds, parent)
        creators: list[BaseTag] = []
        kept_blocks: set[int] = set()
        overlay_x = patterns[OVERLAY_DATA] == Action.REMOVE
        private_action = patterns[PRIVATE]
        store = ds._dict
        swept = mode != "top"
        code_ok = self._code_state(ds, rd) if swept else None
        if code_ok is False and mode == "keep":
            code_ok = True  # the option keeps the codes of this sequence, whatever their scheme
        inner = "clean" if mode == "clean" else "sweep"  # "keep" holds for the kept sequence's own items
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
                    if private_action == Action.CLEAN:
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
                                    self._walk(item, st, f"{path}{_path_name(t)}[{i}].", parent=rd, seq=t,
                                               mode=inner)
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
                        a = Action.REMOVE if overlay_x else Action.UNTABLED
                    if overlay_x:
                        a = Action.REMOVE
                elif group == 0x0002:
                    continue
                else:
                    a = Action.UNTABLED
            elif group & 1:
                # an explicit rule on a private tag: its block's creator stays if it is kept
                if a != Action.REMOVE:
                    kept_blocks.add((t & 0xFFFF0000) | ((t & 0xFFFF) >> 8))
            vr = rd.vr(ds, tag, elem)
            elem = store[tag]  # rd.vr may have converted it
            if mode == "clean":
                a = cleaning.inside_cleaned(a, vr, t)
            if a == Action.REMOVE:
                if vr == "SQ":
                    self._collect_removed(ds[tag].value, st, rd)
                elif vr in WEAK_VRS:
                    ids.add_weak(vr, rd.value(ds, tag, elem, vr))
                del store[tag]
                continue
            if vr == "SQ":
                sq = ds[tag]
                if a == Action.EMPTY:
                    self._collect_removed(sq.value, st, rd)
                    sq.value = Sequence()
                elif a == Action.DUMMY:
                    self._collect_removed(sq.value, st, rd)
                    self._dummy_items(sq.value, st, rd)
                else:
                    if a == Action.CLEAN:
                        child = "clean"
                    elif a == Action.KEEP and t in profile.whole_keep:
                        child = "keep"
                    else:
                        child = inner
                    name = _path_name(t)
                    for i, item in enumerate(sq.value or ()):
                        self._walk(item, st, f"{path}{name}[{i}].", parent=rd, seq=t, mode=child)
                continue
            if a == Action.UNTABLED or a == Action.KEEP:
                if vr == "UI":
                    value = rd.value(ds, tag, elem, vr)
                    if a == Action.UNTABLED and not profile.retain_uids and t not in _CLASS_UID_TAGS:
                        self._put(st, rd, ds, tag, elem, vr, self._remap_value(value, st, force=False))
                    else:
                        ids.kept_uids.update(str(v) for v in (value if isinstance(value, (list, MultiValue)) else [value]) if v)
                elif code_ok is not None and t in act.CODE_TAGS:
                    if code_ok:
                        st.add_kept(rd, ds, tag, elem, vr)
                    # else: a local code, replaced by the dummy triplet below
                elif t == _T_CSD and swept:
                    st.add_kept(rd, ds, tag, elem, vr)  # the designator a scheme identification names
                elif vr in _DATE_VRS:
                    self._date_policy(st, rd, ds, tag, elem, vr, kept=a == Action.KEEP)
                elif vr == "PN" and a == Action.UNTABLED:
                    ids.add_weak(vr, rd.value(ds, tag, elem, vr))
                    self._put(st, rd, ds, tag, elem, vr, act.PN_DUMMY)
                elif vr == "AS" and a == Action.KEEP:
                    value = rd.value(ds, tag, elem, vr)
                    if value:
                        self._put(st, rd, ds, tag, elem, vr, dates.clamp_age(_first(value)))
                    else:
                        st.add_kept(rd, ds, tag, elem, vr)
                elif swept and a == Action.UNTABLED and vr in act.SWEPT_VRS:
                    value = rd.value(ds, tag, elem, vr)
                    if vr == "TM" and (profile.shift_dates or profile.full_dates) or not value:
                        st.add_kept(rd, ds, tag, elem, vr)
                    elif mode == "clean" and vr in act.CLEANABLE_VRS:
                        st.cleaning.defer(ds, tag, rd, vr)  # cleaned once every identifier is known
                    else:
                        ids.add_weak(vr, value)
                        self._put(st, rd, ds, tag, elem, vr, act.dummy(vr))
                elif swept and a == Action.UNTABLED and vr == "UN":
                    ds[tag].value = b""  # an unknown public attribute: nobody can say what it holds
                else:
                    st.add_kept(rd, ds, tag, elem, vr)
                continue
            if t in _PSEUDO_TAGS and a in _PSEUDO_ACTIONS:
                pseudo = self._pseudonymize(rd.value(ds, tag, elem, vr), vr, t, st, top)
                if pseudo is not None:
                    self._put(st, rd, ds, tag, elem, vr, pseudo)
                    continue
            handler = _VALUE_ACTIONS.get(a)
            if handler is not None:
                new = handler(self, t, vr, rd.value(ds, tag, elem, vr), st)
                if new is _DEFERRED:
                    st.cleaning.defer(ds, tag, rd, vr)  # cleaned once every identifier is known
                elif new is not _UNCHANGED:
                    self._put(st, rd, ds, tag, elem, vr, new)
        for creator in creators:
            if int(creator) not in kept_blocks:
                del store[creator]
        if code_ok is False:
            self._dummy_code(ds, st)

    # ------------------------------------------------------------------ value actions
    # One handler per action that computes a new value (the walk only traverses): they take
    # (tag, VR, value, state) and return the value to write, or _UNCHANGED.
    def _act_empty(self, t: int, vr: str, value: object, st: _State) -> object:
        st.ids.add_weak(vr, value)
        return act.empty(vr)

    def _act_dummy(self, t: int, vr: str, value: object, st: _State) -> object:
        st.ids.add_weak(vr, value)
        if vr == "UI":
            return self._remap_value(value, st, force=True)
        if vr in _DATE_VRS and self.profile.shift_dates:
            return self._shift(vr, value, st)
        return act.dummy(vr)

    def _act_uid(self, t: int, vr: str, value: object, st: _State) -> object:
        if vr == "UI":
            return self._remap_value(value, st, force=False)
        st.ids.add_weak(vr, value)
        return act.dummy(vr)

    def _act_clean(self, t: int, vr: str, value: object, st: _State) -> object:
        ids = st.ids
        if vr in _DATE_VRS:
            ids.add_weak(vr, value)
            return self._shift(vr, value, st) if self.profile.shift_dates else act.empty(vr)
        if vr == "AS":
            return dates.clamp_age(_first(value)) if value else value
        if vr == "UI":
            return self._remap_value(value, st, force=False)
        if vr in act.TEXT_VRS and value:
            return _DEFERRED
        ids.add_kept(value)
        return _UNCHANGED

    def _act_shift(self, t: int, vr: str, value: object, st: _State) -> object:
        if vr in _DATE_VRS:
            st.ids.add_weak(vr, value)
            return self._shift(vr, value, st)
        if vr != "TM":  # a timestamp that cannot be shifted is emptied, never kept
            st.ids.add_weak(vr, value)
            return act.empty(vr)
        return _UNCHANGED

    def _act_hash(self, t: int, vr: str, value: object, st: _State) -> object:
        st.ids.add_weak(vr, value)
        if vr == "UI":
            return self._remap_value(value, st, force=True)
        if vr in act.TEXT_VRS and value:
            return act.fit(vr, self.keys.token(f"rule:{t:08X}", str(value)))
        return act.dummy(vr)

    def _act_replace(self, t: int, vr: str, value: object, st: _State) -> object:
        st.ids.add_weak(vr, value)
        return self.profile.replace_values.get(t, "")


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
                a = actions.get(int(tag), Action.KEEP)
                if a not in (Action.KEEP, Action.CLEAN) and vr in WEAK_VRS:
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
        check_accounted(ds, st.written, st.derived, self.profile, _OWN_TAGS, _CLASS_UID_TAGS)

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


_ValueAction = Callable[[Deidentifier, int, str, object, _State], object]
# The handler table of the element actions (pynetdicom's fsm.ACTIONS is the model); X, K and
# untabled elements, and every action on a sequence, are decided by the walk itself.
_VALUE_ACTIONS: dict[str, _ValueAction] = {
    Action.EMPTY: Deidentifier._act_empty,
    Action.DUMMY: Deidentifier._act_dummy,
    Action.UID: Deidentifier._act_uid,
    Action.CLEAN: Deidentifier._act_clean,
    Action.SHIFT: Deidentifier._act_shift,
    Action.HASH: Deidentifier._act_hash,
    Action.REPLACE: Deidentifier._act_replace,
}


def _method_code_item(value: str, meaning: str) -> Dataset:
    """One CID 7050 item of DeidentificationMethodCodeSequence (DCM scheme)."""
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = "DCM"
    item.CodeMeaning = meaning
    return item
