"""The C-STORE status table: what a user sees as delivered, retried or failed."""

from __future__ import annotations

import pytest

from deid_router.forward.status import classify_association_failure, classify_status, reject_reason
from deid_router.jobs.outcome import OutcomeKind

D, W, R, P = OutcomeKind.DELIVERED, OutcomeKind.DELIVERED_WARNING, OutcomeKind.RETRY, OutcomeKind.PERMANENT
U = OutcomeKind.UNAVAILABLE


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (0x0000, D),
        (0x0001, W),
        (0xB000, W), (0xB006, W), (0xB007, W), (0xB123, W),
        (0xA700, R), (0xA701, R), (0xA7FF, R), (0xA76F, R), (0xA77A, R),
        (0x0110, R), (0x0213, R),
        (0xA770, P), (0xA771, P), (0xA779, P),  # dcm4chee: permanent inside the 0xA7xx range
        (0xA900, P), (0xA9FF, P),
        (0xC000, P), (0xC123, P), (0xCFFF, P),
        (0x0122, P), (0x0124, P),
        (0x0999, R), (0xD000, R), (0xFE00, R), (0xFF00, R),  # unknown / non-final: retry
    ],
)
def test_status_classes(status: int, kind: OutcomeKind) -> None:
    outcome = classify_status(status)
    assert outcome.kind is kind
    assert outcome.status_code == status
    if kind is not D:
        assert outcome.reason == f"status_0x{status:04X}"


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        # the destination as a whole: no attempt spent, destination paused
        ("connection_refused", U), ("connect_timeout", U), ("association_aborted", U),
        ("acse_timeout", U), ("association_lost", U),
        ("association_rejected_transient", U), ("association_rejected_permanent", U),
        # this instance's attempt
        ("dimse_timeout", R), ("network_timeout", R), ("invalid_response", R),
        ("sop_class_not_accepted", P), ("transfer_syntax_not_accepted", P), ("something_new", R),
    ],
)
def test_association_failures(kind: str, expected: OutcomeKind) -> None:
    assert classify_association_failure(kind).kind is expected


def test_reject_reasons_are_fixed_codes() -> None:
    assert reject_reason(1, 1, 7) == ("association_rejected_permanent", "called_ae_not_recognized")
    assert reject_reason(2, 3, 1) == ("association_rejected_transient", "temporary_congestion")
    out = classify_association_failure(*reject_reason(1, 1, 3))
    assert out.reason == "association_rejected_permanent:calling_ae_not_recognized"
    assert out.kind is U  # paused and probed slowly (jobs.policy), never quarantined wholesale
