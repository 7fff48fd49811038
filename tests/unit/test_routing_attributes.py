"""Routes on any attribute: the match keys, what the intake's header walk captures, and the globs.

The values a route matches on come from the one walk of the element headers the listener runs
before it acknowledges: these tests tie the configured keys to exactly what that walk reads,
and its values to pydicom's reading of the same files.
"""

from __future__ import annotations

import dataclasses
import io
import warnings
from pathlib import Path

import pydicom.data
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import CTImageStorage, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from deid_router.config import MATCH_KEYS, RouteConfig
from deid_router.routing import V1_KEYS, Router, RoutingFacts, attribute_tag
from deid_router.scp.integrity import Malformed
from deid_router.scp.listener import read_header

TEST_FILES = sorted(Path(pydicom.data.__file__).parent.joinpath("test_files").rglob("*.dcm"))
ROUTED = ("StudyDescription", "BodyPartExamined", "(0008,0008)", "Rows", "PatientID", "SeriesDescription")


def test_config_match_keys_are_the_routing_facts() -> None:
    assert set(MATCH_KEYS) == set(V1_KEYS)
    fields = {f.name for f in dataclasses.fields(RoutingFacts)}
    assert fields == set(MATCH_KEYS) | {"attributes"}


def test_the_walk_captures_exactly_the_attributes_routes_name(tmp_path: Path) -> None:
    router = Router((
        RouteConfig("a", ("x",), {"StudyDescription": "*chest*", "modality": "CT"}),
        RouteConfig("b", ("y",), {"(0018,0015)": "HEAD"}),
    ))
    assert router.captured_tags() == {0x00081030, 0x00180015}
    path = tmp_path / "in.dcm"
    path.write_bytes(_file(StudyDescription="CHEST", BodyPartExamined="HEAD", SeriesDescription="secret"))
    header = read_header(path, router.captured_tags())
    assert header.attributes == {0x00081030: ("CHEST",), 0x00180015: ("HEAD",)}  # not SeriesDescription
    assert read_header(path).attributes == {}  # no route on attributes: nothing read


@pytest.mark.parametrize("path", TEST_FILES, ids=lambda p: p.name)
def test_walk_values_are_pydicoms_on_its_test_files(path: Path) -> None:
    """Each of pydicom's test files: the walk's values of the routed attributes are pydicom's,
    or the file is reported as skipped with the reason (never passed over in silence)."""
    tags = frozenset(attribute_tag(k) for k in ROUTED)
    if path.read_bytes()[128:132] != b"DICM":
        pytest.skip("no Part 10 prefix: not a file a C-STORE receive could produce")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ds = dcmread(path, stop_before_pixels=True)
        except Exception:
            pytest.skip("pydicom cannot read it either")
    try:
        header = read_header(path, tags)
    except Malformed:
        pytest.skip("refused as incomplete (the truncation and fuzz tests check refusals)")
    compared = 0
    for tag in tags:
        elem = ds.get(tag)
        if elem is None or elem.VR in ("SQ", "UN") or elem.value is None or elem.value == "":
            assert tag not in header.attributes or elem is not None, hex(tag)
            continue
        values = elem.value if elem.VM > 1 else [elem.value]
        assert header.attributes.get(tag) == tuple(str(v).strip() for v in values), hex(tag)
        compared += 1
    if compared == 0:
        pytest.skip("none of the routed attributes has a value in this file")


@pytest.mark.parametrize("ts", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian])
def test_globs_are_case_insensitive_and_any_value_of_a_multi_valued_attribute_matches(
    tmp_path: Path, ts: str
) -> None:
    router = Router((
        RouteConfig("chest", ("research",), {"StudyDescription": "*chest*"}, profile="trial"),
        RouteConfig("derived", ("teaching",), {"ImageType": "DERIVED"}),
        RouteConfig("small", ("small",), {"Rows": "4"}),
    ))
    path = tmp_path / "in.dcm"
    path.write_bytes(_file(ts, StudyDescription="Thorax CHEST Study", ImageType=["ORIGINAL", "derived", "AXIAL"]))
    h = read_header(path, router.captured_tags())
    facts = RoutingFacts("MOD", "DEID", h.modality, h.sop_class_uid, h.attributes)
    assert router.targets_for(facts) == [("research", "trial"), ("teaching", ""), ("small", "")]
    path.write_bytes(_file(ts, StudyDescription="HEAD", ImageType=["ORIGINAL", "PRIMARY"]))
    h = read_header(path, router.captured_tags())
    assert router.targets_for(RoutingFacts("MOD", "DEID", h.modality, h.sop_class_uid, h.attributes)) == [
        ("small", "")
    ]


def test_text_is_decoded_in_the_data_sets_character_set(tmp_path: Path) -> None:
    router = Router((RouteConfig("r", ("x",), {"StudyDescription": "*thorax*"}),))
    path = tmp_path / "in.dcm"
    path.write_bytes(_file(SpecificCharacterSet="ISO_IR 192", StudyDescription="Röntgen THORAX"))
    h = read_header(path, router.captured_tags())
    assert h.attributes[0x00081030] == ("Röntgen THORAX",)


def test_an_absent_attribute_matches_only_a_glob_that_matches_nothing() -> None:
    router = Router((RouteConfig("any", ("a",), {"StudyDescription": "*"}), RouteConfig("x", ("b",), {"StudyDescription": "?*"})))
    assert router.destinations_for(RoutingFacts("M", "D", "CT", "1.2")) == ["a"]


@pytest.mark.parametrize(
    ("key", "reason"),
    [("StudyDescripton", "neither"), ("ReferencedImageSequence", "VR SQ"), ("PixelData", "VR"),
     ("(0002,0010)", "file meta"), ("(0008,0000)", "group lengths")],
)
def test_keys_that_cannot_route_are_refused(key: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        attribute_tag(key)


def _file(ts: str = ExplicitVRLittleEndian, **attrs: object) -> bytes:
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = "1.2.3.4.5"
    ds.Modality = "CT"
    for k, v in attrs.items():
        setattr(ds, k, v)
    ds.Rows = 4
    ds.Columns = 4
    ds.BitsAllocated = 16
    ds.PixelData = b"\0" * 32
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ts
    ds.file_meta = meta
    buf = io.BytesIO()
    dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()
