"""The one element walker (deid_router/elements.py) every reader of DICOM bytes uses: the
elements it finds are pydicom's, its stop condition reads nothing past the stop, hostile
nesting is refused, and walking a large encapsulated image reads little more than headers."""

from __future__ import annotations

import io
import struct
import warnings
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.filereader import data_element_generator
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ImplicitVRLittleEndian

from deid_router import wire
from deid_router.elements import PIXEL_DATA_TAGS, Malformed, Window, elements
from deid_router.scp.integrity import read_meta

FILES = sorted(Path(pydicom.data.__file__).parent.joinpath("test_files").rglob("*.dcm"))


def _walk(data: bytes, implicit: bool = False, **kw: Any) -> list[tuple[int, int, bytes, int, int, int]]:
    return list(elements(Window.of_bytes(data), 0, len(data), implicit, **kw))


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_top_level_elements_are_pydicoms(path: Path) -> None:
    data = path.read_bytes()
    if data[128:132] != b"DICM":
        pytest.skip("no Part 10 prefix")
    with open(path, "rb") as fp:
        try:
            ts, start = read_meta(fp, len(data))
        except Malformed:
            pytest.skip("file meta refused as malformed (tests/unit/scp checks refusals)")
    if ts == DeflatedExplicitVRLittleEndian:
        pytest.skip("deflated: the data set is compressed, not walked")
    implicit, little = ts == ImplicitVRLittleEndian, ts != ExplicitVRBigEndian
    if start + 6 <= len(data):  # as pydicom, trust the first element over the syntax
        implicit = not (65 <= data[start + 4] <= 90 and 65 <= data[start + 5] <= 90)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fp = io.BytesIO(data)
        fp.seek(start)
        try:
            theirs = [(int(e.tag), getattr(e, "value_tell", None)) for e in data_element_generator(fp, implicit, little)]
        except Exception:  # noqa: BLE001
            pytest.skip("pydicom cannot walk it either")
    try:
        ours = list(elements(Window(io.BytesIO(data), len(data)), start, len(data), implicit, little))
    except Malformed:
        pytest.skip("refused as malformed (pydicom reads truncated files; the receive tests check refusals)")
    assert [t for _, t, *_ in ours] == [t for t, _ in theirs]
    for (_, tag, _, _, value, _), (_, tell) in zip(ours, theirs):
        if tell is not None:  # a raw element; sequences pydicom parsed have no value position
            assert value == tell, hex(tag)
    assert ours[-1][5] == len(data)


def test_most_of_pydicoms_files_are_compared() -> None:
    compared = 0
    for path in FILES:
        try:
            test_top_level_elements_are_pydicoms(path)
        except pytest.skip.Exception:
            continue
        compared += 1
    assert compared >= 60, compared


def _explicit(tag: int, vr: bytes, value: bytes) -> bytes:
    group, elem = tag >> 16, tag & 0xFFFF
    if vr in (b"OB", b"OW", b"SQ", b"UN", b"UT"):
        return struct.pack("<HH2sHL", group, elem, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", group, elem, vr, len(value)) + value


def _nested(levels: int) -> bytes:
    """``levels`` undefined-length sequences, each in an undefined-length item of the last."""
    inner = _explicit(0x00100010, b"PN", b"DOE^JOHN")
    for _ in range(levels):
        item = struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF) + inner + struct.pack("<HHL", 0xFFFE, 0xE00D, 0)
        inner = (struct.pack("<HH2sHL", 0x0040, 0xA730, b"SQ", 0, 0xFFFFFFFF) + item
                 + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0))
    return inner


def test_nesting_is_walked_to_its_end_and_hostile_depth_refused() -> None:
    data = _nested(16)
    ((pos, tag, vr, length, _value, end),) = _walk(data)
    assert (pos, tag, vr, length, end) == (0, 0x0040A730, b"SQ", 0xFFFFFFFF, len(data))
    with pytest.raises(Malformed, match="nested too deep"):
        _walk(_nested(40))


@pytest.mark.parametrize("cut", [1, 7, 9, 20])
def test_truncated_structure_is_malformed(cut: int) -> None:
    data = _nested(2) + _explicit(0x00100020, b"LO", b"ID-1234 ")
    with pytest.raises(Malformed):
        _walk(data[:-cut])


def test_the_stop_condition_reads_nothing_past_the_stop() -> None:
    header = _explicit(0x00100010, b"PN", b"DOE^JOHN") + _explicit(0x00280010, b"US", b"\x00\x02")
    pixels = struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OW", 0, 1 << 30)  # claims 1 GiB, holds nothing
    data = header + pixels
    found = _walk(data, stop=PIXEL_DATA_TAGS.__contains__)
    assert [t for _, t, *_ in found] == [0x00100010, 0x00280010] and found[-1][5] == len(header)
    with pytest.raises(Malformed, match="runs past the end"):
        _walk(data)


class _Counting(io.BytesIO):
    read_bytes = 0

    def read(self, n: int | None = -1) -> bytes:
        out = super().read(n)
        self.read_bytes += len(out)
        return out


def test_a_large_encapsulated_image_is_walked_reading_little_more_than_its_headers() -> None:
    fragment = b"\xff" * (64 * 1024)
    items = b"".join(struct.pack("<HHL", 0xFFFE, 0xE000, len(fragment)) + fragment for _ in range(200))
    data = (_explicit(0x00280010, b"US", b"\x00\x02") + struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OB", 0, 0xFFFFFFFF)
            + struct.pack("<HHL", 0xFFFE, 0xE000, 0) + items + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0))
    fp = _Counting(data)
    found = list(elements(Window(fp, len(data)), 0, len(data), False))
    assert found[-1][1] == 0x7FE00010 and found[-1][5] == len(data)
    assert fp.read_bytes < len(data) // 5, (fp.read_bytes, len(data))  # 8 KiB a fragment, not the 12.8 MB


@pytest.mark.parametrize("command", [
    struct.pack("<HHL", 0x0000, 0x0100, 2) + b"\x01",  # a value cut short
    struct.pack("<HHL", 0x0008, 0x0100, 2) + b"\x01\x00",  # not group 0000
    struct.pack("<HHL", 0x0000, 0x0100, 0xFFFFFFFF),  # undefined length
])
def test_a_malformed_command_set_is_a_protocol_error(command: bytes) -> None:
    with pytest.raises(wire.ProtocolError, match="malformed command set"):
        wire.decode_command(command)
