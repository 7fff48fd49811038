"""The worker de-identifies each job with its own profile; a job whose profile is no longer
configured is quarantined, never de-identified with another profile and sent."""

from __future__ import annotations

import shutil
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file

from deid_router.config import DeidConfig, DestinationConfig
from deid_router.db.engine import make_engine, migrate
from deid_router.db.repository import JobRepository, NewInstance
from deid_router.deid.engine import Deidentifier
from deid_router.deid.keys import Keys
from deid_router.forward.folder import FolderDestination
from deid_router.forward.lanes import FreeLane
from deid_router.jobs.policy import RetryPolicy
from deid_router.jobs.worker import Worker
from deid_router.store.holding import Holding


def test_each_job_uses_its_profile_and_an_unknown_profile_is_quarantined(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'q.db'}")
    migrate(engine)
    repo = JobRepository(engine)
    holding = Holding(tmp_path / "var", "n")
    holding.prepare()
    instance_id = holding.new_id()
    rel = holding.raw_relative(instance_id)
    holding.absolute(rel).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(str(get_testdata_file("CT_small.dcm")), holding.absolute(rel))
    original = str(pydicom.dcmread(holding.absolute(rel), stop_before_pixels=True).SOPInstanceUID)
    repo.enqueue(
        NewInstance(instance_id, "k" * 64, "a" * 64, rel, 1, "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1",
                    "MOD", "DEID", "CT"),
        [("out", ""), ("out", "trial"), ("out", "gone")],
    )
    keys = Keys(bytes(range(32)))
    cfg = DeidConfig(secret_file=tmp_path / "s.key")
    worker = Worker(
        owner="w", repo=repo, holding=holding, deidentifier=Deidentifier(cfg, keys),
        profiles={"trial": Deidentifier(cfg, keys.for_scope("trial"))},
        destinations={"out": [FreeLane(FolderDestination(DestinationConfig(name="out", type="folder",
                                                                           path=tmp_path / "out")))]},
        policy=RetryPolicy(initial_seconds=1, max_seconds=2, max_attempts=3), lease_seconds=30, batch_size=10,
    )
    done, _ = worker.run_once("out", worker.destinations["out"][0])
    assert done == 3
    written = {p.stem for p in (tmp_path / "out").rglob("*.dcm")}
    assert written == {keys.uid(original), keys.for_scope("trial").uid(original)}
    (entry,) = repo.quarantine_list()
    assert entry.reason == "deid:profile_not_configured"
    engine.dispose()
