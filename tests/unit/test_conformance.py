"""The conformance statement says what the code does: it is rendered from the code's tables
and must equal docs/conformance-statement.md."""

from __future__ import annotations

import pytest
from pynetdicom.presentation import build_context

from deid_router import conformance
from deid_router.scp import acceptor


def test_the_document_is_what_the_code_renders() -> None:
    committed = conformance.DOCUMENT.read_text(encoding="utf-8")
    assert committed == conformance.render(), (
        "docs/conformance-statement.md is stale: run .venv/bin/python -m deid_router.conformance --write"
    )


def test_a_transfer_syntax_added_to_the_code_but_not_the_document_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    verification = acceptor.SUPPORTED_CONTEXTS[0]
    jpeg_ls = "1.2.840.10008.1.2.4.80"
    assert jpeg_ls not in verification.transfer_syntax
    extended = build_context(verification.abstract_syntax, [*verification.transfer_syntax, jpeg_ls])
    monkeypatch.setattr(acceptor, "SUPPORTED_CONTEXTS", [extended, *acceptor.SUPPORTED_CONTEXTS[1:]])
    rendered = conformance.render()
    assert jpeg_ls in rendered
    assert rendered != conformance.DOCUMENT.read_text(encoding="utf-8")


def _received_row(code: str) -> str:
    """The row of ``code`` in the table of statuses received from a PACS (the last such row)."""
    return [line for line in conformance.render().splitlines() if line.startswith(f"| `{code}`")][-1]


def test_received_statuses_follow_the_classification_table(monkeypatch: pytest.MonkeyPatch) -> None:
    assert "retried" in _received_row("0xA700")
    from deid_router.forward import status as forward_status
    from deid_router.jobs.outcome import Outcome, OutcomeKind

    monkeypatch.setattr(forward_status, "classify_status", lambda code: Outcome(OutcomeKind.PERMANENT, code, "x"))
    assert "quarantined" in _received_row("0xA700")
