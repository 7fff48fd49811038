"""The offline batch's crosswalk store on both databases: rows written in batches are the ones
the custodian's lookup and export read, each once, on a database it migrated itself."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from deid_router.config import Config, load_config
from deid_router.db.crosswalk import export_crosswalk, lookup_pseudonym
from deid_router.db.crosswalk_rows import crosswalk_store
from deid_router.db.engine import make_engine
from deid_router.db.repository import JobRepository
from deid_router.deid.crosswalk import BufferedCrosswalk
from deid_router.deid.keys import Keys
from tests.support.router import render_toml


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'queue.sqlite3'}"
    return str(request.getfixturevalue("pg_url"))


def _config(url: str, tmp_path: Path) -> Config:
    """A folder node on ``url`` whose secret is ``tmp_path/secret.key``."""
    doc = {
        "storage": {"root": str(tmp_path / "var")},
        "queue": {"url": url},
        "deid": {"secret_file": str(tmp_path / "secret.key")},
        "destinations": [{"name": "outbox", "type": "folder", "path": str(tmp_path / "outbox")}],
        "routes": [{"name": "all", "destinations": ["outbox"]}],
    }
    (tmp_path / "router.toml").write_text(render_toml(doc), encoding="utf-8")
    return load_config(tmp_path / "router.toml")


def test_batched_rows_are_what_lookup_and_export_read(url: str, tmp_path: Path) -> None:
    keys = Keys.load_or_create(tmp_path / "secret.key")
    buffered = BufferedCrosswalk(keys)
    buffered.record("patient_id", "\0MRN-1", "SUBJ-A")
    buffered.record("patient_id", "\0MRN-1", "SUBJ-A")  # a second instance of the same patient
    buffered.record("accession_number", "ACC-9", "PSEUDO-ACC")
    first = buffered.take()
    assert len(first) == 2 and buffered.take() == []
    config = _config(url, tmp_path)
    for _ in range(2):  # a second batch (another chunk, another run) repeats rows: no duplicates
        store = crosswalk_store(config)
        try:
            store.crosswalk_record_many(first)
        finally:
            store.engine.dispose()
    engine = make_engine(url)
    try:
        repo = JobRepository(engine)
        assert repo.crosswalk_count() == 2
        assert lookup_pseudonym(repo, keys, "SUBJ-A", actor="t") == [("patient_id", "MRN-1")]
        out = io.StringIO()
        assert export_crosswalk(repo, keys, out, actor="t") == 2
        assert "ACC-9" in out.getvalue() and "PSEUDO-ACC" in out.getvalue()
    finally:
        engine.dispose()


def test_the_offline_store_and_the_repository_agree_on_the_secret(url: str, tmp_path: Path) -> None:
    """The offline tool checks the secret through the Core store, the node through the
    repository: a fingerprint one records is the one the other reads, on both databases."""
    keys = Keys.load_or_create(tmp_path / "secret.key")
    store = crosswalk_store(_config(url, tmp_path))
    repo = JobRepository(store.engine)
    try:
        assert store.secret_fingerprint() is None and not store.holds_keyed_data()
        assert store.first_crosswalk_original() is None
        assert store.record_secret_fingerprint(keys.fingerprint()) == keys.fingerprint()
        assert repo.secret_fingerprint() == keys.fingerprint()
        assert repo.record_secret_fingerprint("another") == keys.fingerprint()  # the first one stays
        buffered = BufferedCrosswalk(keys)
        buffered.record("patient_id", "\0MRN-7", "SUBJ-7")
        repo.crosswalk_record_many(buffered.take())
        assert store.holds_keyed_data()
        original = store.first_crosswalk_original()
        assert original is not None and keys.decrypt(original) == "\0MRN-7"
    finally:
        store.engine.dispose()
