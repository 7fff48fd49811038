"""The one place where C-STORE results and failures become an :class:`Outcome`.

Every forwarder and the worker ask this module; nothing else interprets a DIMSE status or a
failure, so the retry/permanent policy can be read (and changed) in one screen. Two tables,
in the manner of pynetdicom's ``status.py``: C-STORE statuses (PS3.4 B.2.3, PS3.7 Annex C)
and :data:`FAILURE_RULES`, from :class:`FailureKind` to what the failure means.

Unknown failure statuses and unknown failure kinds are classified RETRY on purpose: a PACS
that invents a status for "busy" must not lose an instance, and a truly permanent failure
still stops after ``queue.max_attempts`` and lands in the quarantine, where a human can
inspect it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum

from deid_router.jobs.outcome import Outcome, OutcomeKind


class FailureKind(str, Enum):
    """Every way an attempt can fail short of a C-STORE status: fixed codes, PHI-free."""

    # opening the association
    CONNECTION_REFUSED = "connection_refused"
    CONNECT_TIMEOUT = "connect_timeout"
    CONNECT_FAILED = "connect_failed"
    ACSE_TIMEOUT = "acse_timeout"
    ASSOCIATION_REJECTED_TRANSIENT = "association_rejected_transient"
    ASSOCIATION_REJECTED_PERMANENT = "association_rejected_permanent"
    # on an established association
    ASSOCIATION_ABORTED = "association_aborted"
    ASSOCIATION_LOST = "association_lost"  # an earlier item ended the association: not tried
    DIMSE_TIMEOUT = "dimse_timeout"
    NETWORK_TIMEOUT = "network_timeout"
    INVALID_RESPONSE = "invalid_response"
    # this instance cannot be sent as it is
    SOP_CLASS_NOT_ACCEPTED = "sop_class_not_accepted"
    TRANSFER_SYNTAX_NOT_ACCEPTED = "transfer_syntax_not_accepted"
    INVALID_FILE = "invalid_file"
    FILE_READ_FAILED = "file_read_failed"
    # folder destinations
    FOLDER_WRITE_FAILED = "folder_write_failed"
    INVALID_UID_FOR_PATH = "invalid_uid_for_path"
    # the worker, before anything is sent
    RAW_FILE_MISSING = "raw_file_missing"
    WORK_WRITE_FAILED = "work_write_failed"
    DEID_REFUSED = "deid"
    NO_OUTCOME = "no_outcome"
    INTERNAL_ERROR = "internal_error"  # a bug: costs attempts, then the quarantine
    UNKNOWN = "unknown"  # a code this table does not know yet (treated like a busy PACS)


@dataclass(frozen=True)
class FailureRule:
    """What one failure kind means.

    ``outcome``: the job's next step (``jobs.policy`` turns it into a state).
    ``ends_association``: the association cannot carry the rest of the batch (those items
    become ``association_lost``, never tried).
    ``fails_batch``: when opening the association fails this way, every later group of the
    batch would fail alike: fail them at once instead of one timeout per group.
    ``reopen_once``: on an association reused after idling, the PACS may have dropped it
    just as we sent: reopen once and resend the item.
    ``probe_at_cap``: only a person can fix it (a configuration problem on one side): the
    destination is probed at the retry cap, not with the usual backoff.
    """

    outcome: OutcomeKind
    ends_association: bool = False
    fails_batch: bool = False
    reopen_once: bool = False
    probe_at_cap: bool = False


_U, _R, _P, _Q = OutcomeKind.UNAVAILABLE, OutcomeKind.RETRY, OutcomeKind.PERMANENT, OutcomeKind.QUARANTINE

# UNAVAILABLE: the destination as a whole is down, unreachable or refusing us; the instance
# itself was not tried: no attempt is spent and the destination is paused (a PACS down for a
# day must not quarantine a day of images). RETRY: this instance's attempt failed in a way a
# later attempt may survive (costs an attempt). PERMANENT: no retry can fix it.
FAILURE_RULES: Mapping[FailureKind, FailureRule] = {
    FailureKind.CONNECTION_REFUSED: FailureRule(_U, fails_batch=True),
    FailureKind.CONNECT_TIMEOUT: FailureRule(_U, fails_batch=True),
    FailureKind.CONNECT_FAILED: FailureRule(_U, fails_batch=True),
    FailureKind.ACSE_TIMEOUT: FailureRule(_U, fails_batch=True),
    FailureKind.ASSOCIATION_REJECTED_TRANSIENT: FailureRule(_U, fails_batch=True),
    FailureKind.ASSOCIATION_REJECTED_PERMANENT: FailureRule(_U, fails_batch=True, probe_at_cap=True),
    FailureKind.ASSOCIATION_ABORTED: FailureRule(_U, ends_association=True, fails_batch=True, reopen_once=True),
    FailureKind.ASSOCIATION_LOST: FailureRule(_U, ends_association=True),
    FailureKind.DIMSE_TIMEOUT: FailureRule(_R, ends_association=True),
    FailureKind.NETWORK_TIMEOUT: FailureRule(_R, ends_association=True),
    FailureKind.INVALID_RESPONSE: FailureRule(_R, ends_association=True),
    FailureKind.SOP_CLASS_NOT_ACCEPTED: FailureRule(_P),
    FailureKind.TRANSFER_SYNTAX_NOT_ACCEPTED: FailureRule(_P),
    FailureKind.INVALID_FILE: FailureRule(_P),
    FailureKind.FILE_READ_FAILED: FailureRule(_R),
    FailureKind.FOLDER_WRITE_FAILED: FailureRule(_R),
    FailureKind.INVALID_UID_FOR_PATH: FailureRule(_P),
    FailureKind.RAW_FILE_MISSING: FailureRule(_P),
    FailureKind.WORK_WRITE_FAILED: FailureRule(_R),
    FailureKind.DEID_REFUSED: FailureRule(_Q),
    FailureKind.NO_OUTCOME: FailureRule(_R),
    FailureKind.INTERNAL_ERROR: FailureRule(_R),
    FailureKind.UNKNOWN: FailureRule(_R),
}

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


def reject_reason(result: int, source: int, diagnostic: int) -> tuple[FailureKind, str]:
    """Turn an A-ASSOCIATE-RJ (result, source, diagnostic) into (kind, detail) codes."""
    kind = FailureKind.ASSOCIATION_REJECTED_PERMANENT if result == 1 else FailureKind.ASSOCIATION_REJECTED_TRANSIENT
    detail = _REJECT_REASONS.get((source, diagnostic), f"source_{source}_diagnostic_{diagnostic}")
    return kind, detail


def failure_kind(kind: FailureKind | str) -> FailureKind:
    """The table's kind for a code (``UNKNOWN`` for one it does not know)."""
    try:
        return FailureKind(kind)
    except ValueError:
        return FailureKind.UNKNOWN


def failure_rule(kind: FailureKind | str | None) -> FailureRule | None:
    """The rule of a failure code; None for no failure (a C-STORE status was the answer)."""
    return None if kind is None else FAILURE_RULES[failure_kind(kind)]


def classify_failure(kind: FailureKind | str, detail: str = "") -> Outcome:
    """Classify a failure before or outside a C-STORE response (any destination, the worker).

    ``kind`` is a :class:`FailureKind` (or its code, as :mod:`forward.association` raises
    them); ``detail`` a fixed sub-code appended after a colon. An unknown code keeps its
    text in the reason and is retried, like an unknown status.
    """
    code = kind.value if isinstance(kind, FailureKind) else str(kind)
    known = failure_kind(kind)
    reason = f"{code}:{detail}" if detail else code
    return Outcome(FAILURE_RULES[known].outcome, None, reason, failure=known)


# The name forwarders have used since the first version; one function, one table.
classify_association_failure = classify_failure


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
