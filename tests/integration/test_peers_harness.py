"""The e2e harness itself: the real peers receive what dcmtk storescu sends, in its own syntax.

If these fail, every router e2e test would fail for reasons unrelated to the router.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import pydicom
import pytest

from tests.conftest import require_tool
from tests.support.corpus import CORPUS_FILES, corpus_sop_instance_uids, make_ct, make_series
from tests.support.peers import (
    Orthanc,
    PeerError,
    StoreSCP,
    find_tool,
    free_port,
    port_open,
    storescu,
    storescu_acknowledged,
    storescu_failed,
    wait_for_port,
)

pytestmark = pytest.mark.e2e


def _output(result: object) -> str:
    return f"{getattr(result, 'stdout', '')}\n{getattr(result, 'stderr', '')}"[-4000:]


def test_find_tool_skips_python_console_scripts() -> None:
    # pynetdicom installs Python scripts named storescu/storescp into the venv.
    path = require_tool("storescu")
    assert not path.read_bytes()[:200].startswith(b"#!"), path
    assert find_tool("no-such-tool-deid-router") is None


def test_wait_for_port_times_out_with_a_clear_message() -> None:
    port = free_port()
    with pytest.raises(PeerError, match=f"127.0.0.1:{port}"):
        wait_for_port("127.0.0.1", port, timeout=0.3)


def test_whole_corpus_arrives_at_storescp_in_its_own_transfer_syntax(
    storescp: StoreSCP, corpus: dict[str, Path]
) -> None:
    result = storescu(storescp.host, storescp.port, list(corpus.values()), called_aet=storescp.ae_title)
    assert result.returncode == 0, _output(result)
    assert storescu_acknowledged(result) == len(CORPUS_FILES), _output(result)
    assert storescu_failed(result) == 0

    expected = Counter(corpus_sop_instance_uids(corpus).values())
    assert storescp.sop_instance_uids() == expected
    sent = {pydicom.dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID for p in corpus.values()}
    received = {pydicom.dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID for p in storescp.files()}
    assert received == sent  # JPEG 2000, deflate and big endian were not transcoded


def test_directories_are_scanned_recursively_and_duplicates_counted(storescp: StoreSCP, tmp_path: Path) -> None:
    files = make_series(tmp_path / "in", 12, patients=3, rows=64, cols=64)
    result = storescu(storescp.host, storescp.port, [tmp_path / "in", files[0]], called_aet=storescp.ae_title)
    assert storescu_acknowledged(result) == 13, _output(result)
    got = storescp.wait_for_instances(13, timeout=10)
    assert len(got) == 12 and got.most_common(1)[0][1] == 2  # the re-sent instance is there twice


def test_synthetic_ct_carries_identifiers_to_remove(tmp_path: Path) -> None:
    path = make_ct(tmp_path / "ct.dcm", "PID-77", "SYNTH^PAT", "1.2.3", "1.2.3.4", "1.2.3.4.5", rows=32, cols=32)
    ds = pydicom.dcmread(path)
    assert ds.PatientName == "SYNTH^PAT" and ds.PatientID == "PID-77" and ds.SOPInstanceUID == "1.2.3.4.5"
    for keyword in ("PatientBirthDate", "InstitutionName", "ReferringPhysicianName", "AccessionNumber", "StudyDate"):
        assert ds.get(keyword), keyword
    assert ds.pixel_array.shape == (32, 32)


def test_whole_corpus_arrives_at_orthanc(orthanc: Orthanc, corpus: dict[str, Path]) -> None:
    require_tool("storescu")
    result = storescu(orthanc.host, orthanc.dicom_port, list(corpus.values()), called_aet=orthanc.ae_title)
    assert storescu_acknowledged(result) == len(CORPUS_FILES), _output(result) + orthanc.log()

    expected = Counter(corpus_sop_instance_uids(corpus).values())
    assert orthanc.sop_instance_uids() == expected
    some_id = orthanc.instances()[0]
    assert orthanc.file(some_id)[128:132] == b"DICM"


def test_storescp_pause_refuses_and_resume_accepts_on_the_same_port(storescp: StoreSCP, tmp_path: Path) -> None:
    first, second = make_series(tmp_path / "in", 2, rows=32, cols=32)
    port = storescp.port

    storescp.pause()
    assert not port_open(storescp.host, port)
    down = storescu(storescp.host, port, [first], called_aet=storescp.ae_title)
    assert down.returncode != 0 and storescu_acknowledged(down) == 0

    storescp.resume()
    assert storescp.port == port and port_open(storescp.host, port)
    up = storescu(storescp.host, port, [second], called_aet=storescp.ae_title)
    assert storescu_acknowledged(up) == 1, _output(up)
    assert storescp.sop_instance_uids() == Counter({str(pydicom.dcmread(second).SOPInstanceUID): 1})


def test_orthanc_pause_keeps_its_data(orthanc: Orthanc, tmp_path: Path) -> None:
    require_tool("storescu")
    (one,) = make_series(tmp_path / "in", 1, rows=32, cols=32)
    assert storescu_acknowledged(storescu(orthanc.host, orthanc.port, [one], called_aet=orthanc.ae_title)) == 1
    started = time.monotonic()
    orthanc.pause()
    assert not port_open(orthanc.host, orthanc.port)
    orthanc.resume()
    assert time.monotonic() - started < 30
    assert len(orthanc.instances()) == 1


def test_storescp_refusing_stores_is_reported_as_failures(tmp_path: Path) -> None:
    require_tool("storescp")
    files = make_series(tmp_path / "in", 3, rows=32, cols=32)
    with StoreSCP(tmp_path / "refusing", extra=["--refuse"]) as scp:
        result = storescu(scp.host, scp.port, files, called_aet=scp.ae_title)
    assert storescu_acknowledged(result) == 0
    assert result.returncode != 0


@pytest.mark.postgres
def test_pg_url_is_a_fresh_database_of_its_own(pg_url: str) -> None:
    from sqlalchemy import create_engine, inspect, text

    engine = create_engine(pg_url)
    try:
        with engine.connect() as conn:
            assert conn.execute(text("select current_database()")).scalar() == pg_url.rsplit("/", 1)[1]
        assert inspect(engine).get_table_names() == []
    finally:
        engine.dispose()
