"""Fuzz the two places that read bytes a modality sent: the C-STORE intake and the engine.

Hypothesis mutates valid Part-10 files (bit flips, truncation, corrupted length fields,
inserted junk). Whatever comes in, the intake answers a valid DIMSE status (and never 0x0000
for something it could not read through to the end), the engine either de-identifies or
raises DeidError (the job is quarantined), and each example stays bounded in time and memory.

The CI run is ~100 examples per target; ``-m slow`` runs the long version.
"""

from __future__ import annotations

import io
import resource
import shutil
import struct
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deid_router.config import DeidConfig, RouteConfig
from deid_router.db.engine import make_engine, migrate
from deid_router.db.repository import JobRepository
from deid_router.deid.engine import Deidentifier
from deid_router.deid.keys import Keys
from deid_router.errors import DeidError
from deid_router.routing import Router
from deid_router.scp import statuses
from deid_router.scp.listener import Intake, read_complete_header
from deid_router.scp.receive import StoreRequest
from deid_router.store.holding import Holding
from tests.support.corpus import make_ct, pydicom_test_files

VALID_STATUSES = {statuses.SUCCESS, statuses.OUT_OF_RESOURCES, statuses.CANNOT_UNDERSTAND,
                  statuses.DATASET_DOES_NOT_MATCH_SOP_CLASS, statuses.SOP_CLASS_NOT_SUPPORTED}
MAX_RSS_GROWTH_KB = 200 * 1024  # a hostile 4 GB length must not be read into memory


def _seeds() -> list[tuple[str, bytes]]:
    tmp = Path(tempfile.mkdtemp(prefix="fuzzseed-"))
    ct = make_ct(tmp / "ct.dcm", "PID7", "FUZZ^SEED", "1.2.3.1", "1.2.3.2", "1.2.3.3", rows=16, cols=16)
    files = pydicom_test_files()
    out = [("ct", ct.read_bytes())]
    for name in ("rtplan.dcm", "test-SR.dcm", "JPEG2000.dcm", "ExplVR_BigEnd.dcm", "image_dfl.dcm"):
        data = files[name].read_bytes()
        if len(data) < 300_000:
            out.append((name, data))
    shutil.rmtree(tmp, ignore_errors=True)
    return out


SEEDS = _seeds()


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A seed file with one to four mutations, mostly after the 132-byte preamble + magic."""
    _name, data = draw(st.sampled_from(SEEDS))
    buf = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "truncate", "length", "insert", "huge", "delete"]))
        pos = draw(st.integers(132, max(132, len(buf) - 1)))
        if kind == "flip":
            buf[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "truncate":
            del buf[pos:]
        elif kind == "insert":
            buf[pos:pos] = draw(st.binary(min_size=1, max_size=64))
        elif kind == "delete":
            del buf[pos:pos + draw(st.integers(1, 64))]
        else:  # overwrite 2 or 4 bytes with a length-like value (small, odd, 4 GB-ish, undefined)
            value = draw(st.sampled_from([0, 1, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFF0, 0xFFFFFFFF]))
            width = draw(st.sampled_from([2, 4]))
            packed = struct.pack("<L", value)[:width] if width == 4 else struct.pack("<H", value & 0xFFFF)
            buf[pos:pos + width] = packed
        if len(buf) <= 132:
            break
    return bytes(buf)


class _Env:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.holding = Holding(root / "var")
        self.holding.prepare()
        self.engine = make_engine(f"sqlite:///{root / 'queue.sqlite3'}")
        migrate(self.engine)
        self.repo = JobRepository(self.engine)
        self.keys = Keys.load_or_create(root / "secret.key")
        router = Router((RouteConfig("all", ("pacs",)),))
        self.intake = Intake(self.holding, self.repo, router, self.keys, min_free_bytes=1)
        self.deid = Deidentifier(DeidConfig(secret_file=root / "secret.key", burned_in_annotation="forward"), self.keys)


@pytest.fixture(scope="module")
def env() -> _Env:
    root = Path(tempfile.mkdtemp(prefix="fuzzintake-"))
    return _Env(root)


def _maxrss_kb() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def _accept(env: _Env, data: bytes, sop_class: str, sop_instance: str) -> int:
    """What the acceptor does with a received data set: a raw file, the intake, then discard."""
    raw = env.holding.new_raw_file(data)
    try:
        return env.intake.accept(StoreRequest(raw, sop_class, sop_instance, "1.2.840.10008.1.2.1", "FUZZ", "DEID_ROUTER"))
    finally:
        raw.discard()  # kept only when committed


def _intake_one(env: _Env, data: bytes) -> None:
    received = env.root / "fuzz.dcm"
    received.write_bytes(data)
    try:
        sop_class, sop_instance = "1.2.840.10008.5.1.4.1.1.2", "1.2.3.3"
        try:  # a real modality's command carries the UIDs it believes the file has
            sop_class, sop_instance, _ = read_complete_header(received)
        except Exception:
            pass
        before = _maxrss_kb()
        status = _accept(env, data, sop_class, sop_instance)
        assert status in VALID_STATUSES, hex(status)
        assert _maxrss_kb() - before < MAX_RSS_GROWTH_KB
        if status == statuses.SUCCESS:
            # acknowledged: the structure was walked to the last byte; the engine must then
            # either de-identify it or refuse it cleanly (quarantine), never crash
            raw = sorted(env.holding.raw_dir.rglob("*.dcm"))
            assert raw, "acknowledged without a held raw file"
    finally:
        received.unlink(missing_ok=True)


def _deid_one(env: _Env, data: bytes) -> None:
    src = env.root / "deid-in.dcm"
    src.write_bytes(data)
    before = _maxrss_kb()
    out = io.BytesIO()
    try:
        env.deid.deidentify_file(src, out)
    except DeidError:
        return
    assert _maxrss_kb() - before < MAX_RSS_GROWTH_KB
    assert out.getvalue()[:128] == b"\0" * 128, "output preamble must be zero"


_CI = settings(max_examples=100, deadline=2000, suppress_health_check=[HealthCheck.too_slow,
               HealthCheck.function_scoped_fixture, HealthCheck.data_too_large], database=None)
_LONG = settings(max_examples=3000, deadline=2000, suppress_health_check=[HealthCheck.too_slow,
                 HealthCheck.function_scoped_fixture, HealthCheck.data_too_large], database=None)


@_CI
@given(data=mutated())
def test_intake_answers_a_valid_status_for_mutated_files(env: _Env, data: bytes) -> None:
    _intake_one(env, data)


@_CI
@given(data=mutated())
def test_engine_deidentifies_or_raises_deid_error_for_mutated_files(env: _Env, data: bytes) -> None:
    _deid_one(env, data)


@pytest.mark.slow
@_LONG
@given(data=mutated())
def test_intake_fuzz_long(env: _Env, data: bytes) -> None:
    _intake_one(env, data)


@pytest.mark.slow
@_LONG
@given(data=mutated())
def test_engine_fuzz_long(env: _Env, data: bytes) -> None:
    _deid_one(env, data)


def test_truncated_files_are_never_acknowledged(env: _Env, tmp_path: Path) -> None:
    """Every cut of a valid file (header or pixel data) is refused: pydicom alone would accept it."""
    ct = make_ct(tmp_path / "ct.dcm", "PID8", "TRUNC^SEED", "1.2.3.11", "1.2.3.12", "1.2.3.13", rows=16, cols=16).read_bytes()
    for cut in range(140, len(ct) - 1, 37):
        status = _accept(env, ct[:cut], "1.2.840.10008.5.1.4.1.1.2", "1.2.3.13")
        assert status != statuses.SUCCESS, f"truncated at {cut} acknowledged"


def test_four_gigabyte_length_is_refused_without_reading_it(env: _Env, tmp_path: Path) -> None:
    ct = make_ct(tmp_path / "ct.dcm", "PID9", "HUGE^LEN", "1.2.3.21", "1.2.3.22", "1.2.3.23", rows=16, cols=16).read_bytes()
    # a private OB element claiming 0xFFFFFFF0 bytes, placed right after the file meta
    from pynetdicom.dsutils import split_dataset

    _meta, off = split_dataset(tmp_path / "ct.dcm")
    hostile = ct[:off] + struct.pack("<HH2sHL", 0x0008, 0x0001, b"OB", 0, 0xFFFFFFF0) + b"\x01" * 64 + ct[off:]
    before = _maxrss_kb()
    status = _accept(env, hostile, "1.2.840.10008.5.1.4.1.1.2", "1.2.3.23")
    assert status == statuses.CANNOT_UNDERSTAND
    assert _maxrss_kb() - before < MAX_RSS_GROWTH_KB
