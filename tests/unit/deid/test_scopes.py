"""Pseudonym scopes: the default scope is v1 bit for bit; other scopes share nothing with it.

``fixtures/v1_expected.json`` and ``fixtures/v1_output_*.dcm`` were written by
``fixtures/make_v1_fixture.py`` with the plain engine (first before profiles existed, 6cd7af3;
regenerated when issue 11 changed per-IOD actions: same pseudonyms and keys, see its docstring).
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file

from deid_router.app import build_context
from deid_router.config import load_config
from deid_router.deid.keys import Keys

FIXTURES = Path(__file__).parent / "fixtures"
EXPECTED = json.loads((FIXTURES / "v1_expected.json").read_text(encoding="utf-8"))
SECRET = bytes.fromhex(EXPECTED["secret_hex"])


def _input(name: str) -> Path:
    return FIXTURES / name if name == "v1_input.dcm" else Path(str(get_testdata_file(name)))


def _config(tmp_path: Path, options: list[str]) -> Path:
    (tmp_path / "secret.key").write_text(SECRET.hex() + "\n", encoding="ascii")
    (tmp_path / "secret.key").chmod(0o600)
    opts = ", ".join(f'"{o}"' for o in options)
    text = f"""
[storage]
root = "var"
[deid]
secret_file = "secret.key"
options = [{opts}]
[profiles.same]
options = [{opts}]
scope = "default"
[profiles.trial]
options = [{opts}]
scope = "trial"
[profiles.other]
options = [{opts}]
[[destinations]]
name = "out"
type = "folder"
path = "out"
[[routes]]
name = "all"
destinations = ["out"]
"""
    path = tmp_path / "router.toml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("case", EXPECTED["cases"], ids=lambda c: f"{c['input']}-{'+'.join(c['options']) or 'basic'}")
def test_default_scope_outputs_are_v1_bytes(tmp_path: Path, case: dict[str, object]) -> None:
    src = _input(str(case["input"]))
    assert hashlib.sha256(src.read_bytes()).hexdigest() == case["input_sha256"], "the fixture's input changed"
    config = load_config(_config(tmp_path, list(case["options"])))  # type: ignore[arg-type]
    ctx = build_context(config, run_migrations=True)
    try:
        for profile in ("", "same"):  # [deid], and a profile that names the default scope
            out = io.BytesIO()
            ctx.deidentifier(profile).deidentify_file(src, out)
            assert hashlib.sha256(out.getvalue()).hexdigest() == case["output_sha256"], profile
            if case["input"] == "v1_input.dcm":
                label = "basic" if not case["options"] else "modified_dates"
                assert out.getvalue() == (FIXTURES / f"v1_output_{label}.dcm").read_bytes()
        recorded = {(kind, p) for kind, p, _ in ctx.repo.crosswalk_all("default")}
        assert {tuple(r) for r in case["crosswalk"]} <= recorded  # type: ignore[attr-defined]
    finally:
        ctx.close()


def test_default_scope_keys_are_v1_keys() -> None:
    keys = Keys(SECRET).for_scope("default")
    k = EXPECTED["keys"]
    assert keys.uid("1.2.3.4") == k["uid"]
    assert keys.token("crosswalk:patient_id", "FIX-0001") == k["token"]
    assert keys.pseudonym("patient_id", "FIX-0001", 10) == k["pseudonym"]
    assert keys.day_offset("FIX-0001", -3650, -365) == k["day_offset"]


def test_two_scopes_give_the_same_patient_different_pseudonyms_uids_and_dates(tmp_path: Path) -> None:
    config = load_config(_config(tmp_path, ["retain_long_modified_dates"]))  # dates kept, shifted
    assert config.profile("other").scope == "other"  # a profile without scope gets its own
    ctx = build_context(config, run_migrations=True)
    src = FIXTURES / "v1_input.dcm"
    try:
        seen = {}
        for profile in ("", "trial", "other"):
            out = io.BytesIO()
            ctx.deidentifier(profile).deidentify_file(src, out)
            out.seek(0)
            ds = dcmread(out)
            seen[profile] = (str(ds.PatientID), str(ds.StudyInstanceUID), str(ds.SOPInstanceUID), str(ds.StudyDate))
            again = io.BytesIO()
            ctx.deidentifier(profile).deidentify_file(src, again)
            assert again.getvalue() == out.getvalue()  # deterministic within a scope
        for field in range(4):
            assert len({v[field] for v in seen.values()}) == 3, field
        # each scope's crosswalk holds only its own pseudonyms, decryptable with its own keys
        for profile, scope in (("", "default"), ("trial", "trial"), ("other", "other")):
            rows = list(ctx.repo.crosswalk_all(scope))
            assert (("patient_id", seen[profile][0])) in {(k, p) for k, p, _ in rows}
            keys = ctx.keys.for_scope(scope)
            assert {keys.decrypt(b) for k, p, b in rows if k == "patient_id"} == {"\0FIX-0001"}  # issuer NUL id
    finally:
        ctx.close()


def test_scope_keys_derive_from_the_one_secret() -> None:
    a, b = Keys(SECRET), Keys(bytes(reversed(SECRET)))
    assert a.for_scope("trial").uid("1.2.3") == Keys(SECRET).for_scope("trial").uid("1.2.3")
    assert a.for_scope("trial").uid("1.2.3") != b.for_scope("trial").uid("1.2.3")
    assert a.for_scope("trial").uid("1.2.3") != a.for_scope("trial2").uid("1.2.3")
    blob = a.for_scope("trial").encrypt("x")
    with pytest.raises(Exception):
        a.decrypt(blob)  # another scope's crosswalk key cannot read it


def test_default_scope_engine_is_the_unscoped_engine_on_the_corpus(tmp_path: Path) -> None:
    """Independent of the fixture (which an intended engine change regenerates): the default
    scope adds nothing to what the engine does with the plain secret."""
    from deid_router.config import DeidConfig
    from deid_router.deid.engine import Deidentifier
    from tests.support.corpus import pydicom_test_files

    config = load_config(_config(tmp_path, ["retain_long_modified_dates"]))
    ctx = build_context(config, run_migrations=True)
    plain = Deidentifier(DeidConfig(secret_file=Path("/nonexistent"), options=("retain_long_modified_dates",)),
                         Keys(SECRET))
    try:
        compared = 0
        for name, src in pydicom_test_files().items():
            a, b = io.BytesIO(), io.BytesIO()
            try:
                plain.deidentify_file(src, a)
            except Exception:
                continue  # refused by the engine (quarantined): nothing to compare
            ctx.deidentifier("same").deidentify_file(src, b)
            assert a.getvalue() == b.getvalue(), name
            compared += 1
        assert compared >= 5
    finally:
        ctx.close()
