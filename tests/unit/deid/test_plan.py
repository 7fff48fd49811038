"""Dry run: the plan names what happens to each attribute and changes nothing."""

from __future__ import annotations

from deid_router.deid.plan import dry_run
from tests.unit.deid.helpers import make
from tests.unit.deid.synthetic import PATIENT_NAME, build, roundtrip


def test_plan_shows_pseudonym_remove_keep_and_leaves_input_alone() -> None:
    ds = roundtrip(build().ds)
    ds.PatientAddress = "1 Main Street"  # X in Table E.1-1
    before_name = str(ds.PatientName)
    rows = {path: (action, before, after) for path, action, before, after in dry_run(make(), ds)}
    action, before, after = rows["PatientName"]
    assert action == "pseudonym" and before == PATIENT_NAME and after and after != PATIENT_NAME
    assert rows["PatientAddress"] == ("remove", "1 Main Street", None)
    assert rows["Manufacturer"] == ("keep", "ACME", "ACME")
    assert rows["SOPInstanceUID"][0] == "uid"
    assert rows["PatientIdentityRemoved"] == ("replace", None, "YES")
    nested = [p for p in rows if p.startswith("ReferencedStudySequence[0].")]
    assert any(p.endswith("ReferencedSOPInstanceUID") for p in nested)
    assert {a for a, _, _ in rows.values()} <= {
        "keep", "remove", "empty", "dummy", "replace", "uid", "hash", "shift_date", "clean", "pseudonym"}
    assert str(ds.PatientName) == before_name and "PatientIdentityRemoved" not in ds


def test_plan_names_swept_values_inside_sequences_dummy() -> None:
    from pydicom.sequence import Sequence

    ds = roundtrip(build().ds)
    item = ds.ReferencedStudySequence[0].copy()
    item.ContentDescription = "free text in an untabled attribute"
    ds.ReferencedInstanceSequence = Sequence([item])
    rows = {path: (action, before, after) for path, action, before, after in dry_run(make(), ds)}
    assert rows["ReferencedInstanceSequence[0].ContentDescription"] == (
        "dummy", "free text in an untabled attribute", "ANONYMIZED")
