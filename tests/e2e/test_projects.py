"""Projects: one storescu run, routes on StudyDescription and BodyPartExamined, two folder
destinations de-identified by two profiles in two pseudonym scopes.

What a research coordinator would check: each project's folder holds exactly its instances;
the patient who is in both projects cannot be linked across them (other pseudonym, other
UIDs, other date shift); each project's custodian re-identifies only within its own scope.
"""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from deid_router.deid.keys import Keys
from tests.support.corpus import build_ct
from tests.support.peers import storescu, storescu_acknowledged
from tests.support.router import RouterProcess

pytestmark = pytest.mark.e2e

PROFILES = """
[profiles.trial]
options = ["retain_long_modified_dates"]
scope = "trial"
pseudonym_prefix = "TRIAL-"

[profiles.teaching]
options = ["retain_long_modified_dates", "clean_descriptors"]
scope = "teaching"
pseudonym_prefix = "TEACH-"
"""


def _write(folder: Path, name: str, patient: tuple[str, str], description: str, body_part: str, n: int) -> list[Path]:
    study, series = generate_uid(), generate_uid()
    out = []
    for i in range(n):
        ds = build_ct(patient[0], patient[1], study, series, generate_uid(), rows=16, cols=16, instance_number=i + 1)
        ds.StudyDescription = description
        ds.BodyPartExamined = body_part
        path = folder / f"{name}-{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        out.append(path)
    return out


def _received(folder: Path) -> dict[str, pydicom.Dataset]:
    return {
        str(ds.SOPInstanceUID): ds
        for ds in (pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(folder.rglob("*.dcm")))
    }


def test_two_routes_two_profiles_two_scopes_from_one_storescu_run(tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    alice, bob = ("PIDALICE01", "ALICE^EXAMPLE"), ("PIDBOB0002", "BOB^EXAMPLE")
    chest = _write(src, "chest", alice, "CT CHEST w/o contrast", "CHEST", 3)  # trial only
    head = _write(src, "head", bob, "CT HEAD", "HEAD", 2)  # teaching only
    both = _write(src, "both", alice, "chest and head", "HEAD", 2)  # both projects, same patient
    _write(src, "none", bob, "ABDOMEN", "ABDOMEN", 1)  # no route: refused, never stored

    router = RouterProcess(
        tmp_path / "router",
        [{"name": "trial_out", "type": "folder", "path": "out/trial"},
         {"name": "teaching_out", "type": "folder", "path": "out/teaching"}],
        routes=[
            {"name": "trial", "destinations": ["trial_out"], "profile": "trial",
             "match": {"StudyDescription": "*CHEST*"}},
            {"name": "teaching", "destinations": ["teaching_out"], "profile": "teaching",
             "match": {"BodyPartExamined": "head", "modality": "CT"}},
        ],
        extra_toml=PROFILES,
    )
    check = router.cli("check-config")
    assert "route 'trial': profile 'trial', scope 'trial' -> trial_out" in check.stdout
    with router:
        res = storescu("127.0.0.1", router.port, sorted(src.iterdir()))
        assert storescu_acknowledged(res) == len(chest) + len(head) + len(both), res.stdout + res.stderr
        status = router.wait_idle(120, expect_done=len(chest) + len(head) + 2 * len(both))
        assert status["jobs"]["failed"] == 0 and status["quarantined"] == 0
        assert status["destinations"]["trial_out"]["done"] == len(chest) + len(both)

        keys = Keys.load_or_create(router.secret_path)
        trial_keys, teaching_keys = keys.for_scope("trial"), keys.for_scope("teaching")

        def uid(p: Path) -> str:
            return str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)

        trial = _received(router.workdir / "out" / "trial")
        teaching = _received(router.workdir / "out" / "teaching")
        assert set(trial) == {trial_keys.uid(uid(p)) for p in chest + both}
        assert set(teaching) == {teaching_keys.uid(uid(p)) for p in head + both}

        # the instance in both projects: nothing links its two copies
        for p in both:
            a, b = trial[trial_keys.uid(uid(p))], teaching[teaching_keys.uid(uid(p))]
            assert a.PatientID.startswith("TRIAL-") and b.PatientID.startswith("TEACH-")
            assert a.PatientID[6:] != b.PatientID[6:]
            assert a.StudyInstanceUID != b.StudyInstanceUID and a.SeriesInstanceUID != b.SeriesInstanceUID
            assert a.StudyDate != b.StudyDate  # each scope shifts dates by its own offset
            assert keys.uid(uid(p)) not in trial and keys.uid(uid(p)) not in teaching  # not the default scope
            assert "StudyDescription" not in a and "StudyDescription" in b  # teaching keeps them, cleaned
        # within one scope the same patient keeps one pseudonym (longitudinal studies link)
        alice_trial = {str(ds.PatientID) for ds in trial.values()}
        assert len(alice_trial) == 1

        # re-identification is per scope, and audited
        pseudonym = alice_trial.pop()
        found = router.cli("crosswalk", "lookup", pseudonym, "--scope", "trial")
        assert "PIDALICE01" in found.stdout
        assert router.cli("crosswalk", "lookup", pseudonym, check=False).returncode == 1  # not in the default scope
        assert router.cli("crosswalk", "lookup", pseudonym, "--scope", "teaching", check=False).returncode == 1
        export = router.cli("crosswalk", "export", "--scope", "teaching")
        assert "PIDALICE01" in export.stdout and "PIDBOB0002" in export.stdout and "TRIAL-" not in export.stdout
        bad = router.cli("crosswalk", "export", "--scope", "nope", check=False)
        assert bad.returncode == 2 and "--scope" in bad.stderr
