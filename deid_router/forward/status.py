"""The one place where C-STORE results and association failures become an :class:`Outcome`.

Every forwarder asks this module; nothing else interprets a DIMSE status or an association
failure, so the retry/permanent policy can be read (and changed) in one screen.

Unknown failure statuses are classified RETRY on purpose: a PACS that invents a status for
"busy" must not lose an instance, and a truly permanent failure still stops after
``queue.max_attempts`` and lands in the quarantine, where a human can inspect it.
"""

from __future__ import annotations

from deid_router.jobs.outcome import Outcome, OutcomeKind

# PS3.8 Table 9-21: (result source, diagnostic) of an A-ASSOCIATE-RJ, as short fixed codes.
_REJECT_REASONS: dict[tuple[int, int], str] = {
    (1, 1): "no_reason_given",
    (1, 2): "application_context_not_supported",
    (1, 3): "calling_ae_not_recognized",
    (1, 7): "called_ae_not_recognized",
    (2, 1): "no_reason_given",
    (2, 2): "protocol_version_not_supported",
    (3, 1): "temporary_congestion",
    (3, 2): "local_limit_exceeded",
}

# The destination as a whole is down, unreachable or refusing us: the instance itself was not
# tried. UNAVAILABLE spends no attempt and pauses the destination (a PACS down for a day must
# not quarantine a day of images); a permanent rejection is a configuration problem on one
# side and is probed slowly until someone fixes it.
_UNAVAILABLE_KINDS = frozenset(
    {
        "connection_refused",
        "connect_timeout",
        "connect_failed",
        "association_aborted",
        "association_lost",
        "acse_timeout",
        "association_rejected_transient",
        "association_rejected_permanent",
    }
)

# This instance's attempt failed in a way a later attempt may survive (costs an attempt).
_TRANSIENT_KINDS = frozenset({"dimse_timeout", "network_timeout", "invalid_response"})

# Failures that no retry can fix (the PACS said so, or our file can never be sent as-is).
_PERMANENT_KINDS = frozenset(
    {
        "sop_class_not_accepted",
        "transfer_syntax_not_accepted",
        "invalid_file",
    }
)

# Specific failure statuses, checked before the ranges below.
_PERMANENT_STATUSES = frozenset({0x0122, 0x0124, 0x0117, 0x0211, 0x0212})
_RETRY_STATUSES = frozenset({0x0110, 0x0213, 0x0210})


def _hex(status: int) -> str:
    return f"status_0x{status:04X}"


def classify_status(status: int) -> Outcome:
    """Classify one C-STORE response status (PS3.4 B.2.3, PS3.7 Annex C).

    Order matters: dcm4chee's 0xA770-0xA779 (permanent storage rejections) sit inside the
    generic "out of resources" 0xA7xx range and are checked first.
    """
    reason = _hex(status)
    if status == 0x0000:
        return Outcome(OutcomeKind.DELIVERED, status, "")
    if status == 0x0001 or 0xB000 <= status <= 0xBFFF:
        return Outcome(OutcomeKind.DELIVERED_WARNING, status, reason)
    if 0xFF00 <= status <= 0xFFFF:
        # Pending/cancel are not final C-STORE answers: the PACS misbehaved; try again later.
        return Outcome(OutcomeKind.RETRY, status, reason)
    if status in _PERMANENT_STATUSES:
        return Outcome(OutcomeKind.PERMANENT, status, reason)
    if status in _RETRY_STATUSES:
        return Outcome(OutcomeKind.RETRY, status, reason)
    if 0xA770 <= status <= 0xA779:
        return Outcome(OutcomeKind.PERMANENT, status, reason)
    if 0xA700 <= status <= 0xA7FF:
        return Outcome(OutcomeKind.RETRY, status, reason)
    if 0xA900 <= status <= 0xA9FF or 0xC000 <= status <= 0xCFFF:
        return Outcome(OutcomeKind.PERMANENT, status, reason)
    # Unknown failure: conservative retry (see module docstring).
    return Outcome(OutcomeKind.RETRY, status, reason)


def reject_reason(result: int, source: int, diagnostic: int) -> tuple[str, str]:
    """Turn an A-ASSOCIATE-RJ (result, source, diagnostic) into (kind, detail) codes."""
    kind = "association_rejected_permanent" if result == 1 else "association_rejected_transient"
    detail = _REJECT_REASONS.get((source, diagnostic), f"source_{source}_diagnostic_{diagnostic}")
    return kind, detail


def classify_association_failure(kind: str, detail: str = "") -> Outcome:
    """Classify a failure before or outside a C-STORE response.

    ``kind`` is a fixed code (``connection_refused``, ``association_rejected_permanent``,
    ``sop_class_not_accepted``, ...); ``detail`` a fixed sub-code appended after a colon.
    Unknown kinds retry, like unknown statuses.
    """
    reason = f"{kind}:{detail}" if detail else kind
    if kind in _UNAVAILABLE_KINDS:
        return Outcome(OutcomeKind.UNAVAILABLE, None, reason)
    if kind in _PERMANENT_KINDS:
        return Outcome(OutcomeKind.PERMANENT, None, reason)
    if kind in _TRANSIENT_KINDS:
        return Outcome(OutcomeKind.RETRY, None, reason)
    return Outcome(OutcomeKind.RETRY, None, reason)


# --- DICOMweb STOW-RS (PS3.18 10.5): HTTP statuses and the response's per-instance reasons.
# A FailureReason (0008,1197) / WarningReason (0008,1196) is a C-STORE status and goes through
# classify_status; the HTTP status decides only where the body says nothing about an instance.
# 401/403/407 and 429/502/503/504: the service as a whole refuses us or is down (like an
# association rejection): UNAVAILABLE, no attempt spent. 409 (conflict) and other 4xx: this
# request can never succeed as sent: PERMANENT. 408 and other 5xx: RETRY.
_HTTP_UNAVAILABLE = frozenset({401, 403, 407, 429, 502, 503, 504})
_HTTP_RETRY = frozenset({408})


def classify_http_status(code: int) -> Outcome:
    """The outcome of a STOW-RS request for an instance its response body does not mention."""
    reason = f"http_{code}"
    if 200 <= code < 300:
        # accepted, yet the response does not list the instance as stored: not proof of storage
        return Outcome(OutcomeKind.RETRY, None, f"{reason}:instance_not_acknowledged")
    if code in _HTTP_UNAVAILABLE:
        return Outcome(OutcomeKind.UNAVAILABLE, None, reason)
    if code in _HTTP_RETRY or 500 <= code < 600:
        return Outcome(OutcomeKind.RETRY, None, reason)
    if 400 <= code < 500:
        return Outcome(OutcomeKind.PERMANENT, None, reason)
    return Outcome(OutcomeKind.RETRY, None, reason)  # 1xx/3xx: unexpected; conservative


def classify_stow_instance(http_status: int, stored: bool, failure_reason: int | None,
                           warning_reason: int | None) -> Outcome:
    """One instance of a STOW-RS response: in FailedSOPSequence (``failure_reason``, None when the
    item has none), in ReferencedSOPSequence (``stored``, with its ``warning_reason``), or neither."""
    if failure_reason is not None:
        return classify_status(failure_reason)
    if stored and 200 <= http_status < 300:
        if warning_reason:
            return classify_status(warning_reason)
        return Outcome(OutcomeKind.DELIVERED, None, "")
    return classify_http_status(http_status)
