"""The DICOM conformance statement (PS3.2 Annex A layout), rendered from the code's own tables.

``docs/conformance-statement.md`` is this module's output; a test renders it again and fails
when the two differ, so a transfer syntax, status or option added to the code without the
document (or the other way round) is caught. Regenerate with::

    .venv/bin/python -m deid_router.conformance --write
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from pathlib import Path

from pydicom.uid import UID

from deid_router import __version__, tls, wire
from deid_router.config import DEID_OPTIONS, DestinationConfig, ListenerConfig, ListenerTlsConfig
from deid_router.forward import status as forward_status
from deid_router.scp import acceptor, commitment, statuses

DOCUMENT = Path(__file__).resolve().parent.parent / "docs" / "conformance-statement.md"

# What each status we answer with means to the modality (names from PS3.4 / PS3.7).
RETURNED_STORE_STATUSES: tuple[tuple[int, str, str], ...] = (
    (statuses.SUCCESS, "Success", "the raw instance is fsync'd on disk and its jobs are committed"),
    (statuses.OUT_OF_RESOURCES, "Refused: Out of Resources",
     "holding disk below its reserve, queue database unavailable or busy: keep the instance and send it again later"),
    (statuses.DATASET_DOES_NOT_MATCH_SOP_CLASS, "Error: Data Set Does Not Match SOP Class",
     "the command's SOP Class UID differs from the data set's"),
    (statuses.CANNOT_UNDERSTAND, "Error: Cannot Understand",
     "the data set cannot be parsed, is truncated, or its SOP Instance UID differs from the command's"),
    (statuses.SOP_CLASS_NOT_SUPPORTED, "Refused: SOP Class Not Supported",
     "no route wants this instance (it is refused, never silently dropped)"),
)

RETURNED_COMMITMENT_STATUSES: tuple[tuple[int, str, str], ...] = (
    (commitment.SUCCESS, "N-ACTION Success", "the request is taken; the result follows in an N-EVENT-REPORT"),
    (commitment.INVALID_ARGUMENT_VALUE, "N-ACTION Invalid Argument Value", "no Transaction UID or no referenced instance"),
    (commitment.NO_SUCH_ACTION, "N-ACTION No Such Action", "an Action Type ID other than 1"),
    (commitment.PROCESSING_FAILURE, "N-ACTION Processing Failure", "the request's data set cannot be decoded"),
    (commitment.FAILURE_NO_SUCH_OBJECT, "Failure Reason: No Such Object Instance", "the router holds no such instance"),
    (commitment.FAILURE_CLASS_INSTANCE_CONFLICT, "Failure Reason: Class/Instance Conflict",
     "held, but under another SOP class"),
    (commitment.FAILURE_PROCESSING, "Failure Reason: Processing Failure",
     'commitment = "delivered": not every destination has it within wait_seconds'),
)

# C-STORE statuses a PACS may answer with, shown by what the router does with them; the
# router's behaviour is read from forward/status.py for each example, never restated here.
RECEIVED_STATUS_EXAMPLES: tuple[tuple[int, str], ...] = (
    (0x0000, "Success"),
    (0x0001, "Warning (coercion of data elements)"),
    (0xB000, "Warning: Coercion of Data Elements"),
    (0xB007, "Warning: Data Set Does Not Match SOP Class"),
    (0xB006, "Warning: Elements Discarded"),
    (0xA700, "Refused: Out of Resources"),
    (0xA7FF, "Refused: Out of Resources (other)"),
    (0xA770, "dcm4chee: storage rejected (A770-A779)"),
    (0xA900, "Error: Data Set Does Not Match SOP Class"),
    (0xC000, "Error: Cannot Understand"),
    (0x0110, "Processing Failure"),
    (0x0117, "Invalid Object Instance"),
    (0x0122, "Refused: SOP Class Not Supported"),
    (0x0124, "Refused: Not Authorized"),
    (0x0210, "Duplicate Invocation"),
    (0x0211, "Unrecognized Operation"),
    (0x0212, "Mistyped Argument"),
    (0x0213, "Resource Limitation"),
    (0xFE00, "Cancel (not a final C-STORE answer)"),
    (0xD123, "any other failure status"),
)

ASSOCIATION_FAILURE_EXAMPLES: tuple[tuple[str, str], ...] = (
    ("connection_refused", "TCP connection refused"),
    ("connect_timeout", "no TCP connection within connect_timeout_seconds"),
    ("association_rejected_transient", "A-ASSOCIATE-RJ, rejected-transient"),
    ("association_rejected_permanent", "A-ASSOCIATE-RJ, rejected-permanent"),
    ("acse_timeout", "no A-ASSOCIATE-AC within acse_timeout_seconds"),
    ("association_aborted", "A-ABORT from the PACS"),
    ("association_lost", "connection closed by the PACS"),
    ("dimse_timeout", "no C-STORE-RSP within dimse_timeout_seconds"),
    ("network_timeout", "the connection stalls mid-message"),
    ("invalid_response", "a response that is not a C-STORE-RSP to our request"),
    ("sop_class_not_accepted", "the PACS refused every presentation context for the SOP class"),
    ("transfer_syntax_not_accepted", "no accepted transfer syntax can carry the instance"),
)

_OUTCOME_WORDS = {
    "delivered": "done",
    "delivered_warning": "done (warning recorded)",
    "retry": "retried with backoff (costs an attempt; after queue.max_attempts: quarantined)",
    "unavailable": "destination paused and retried (no attempt spent)",
    "permanent": "quarantined (no retry)",
    "quarantine": "quarantined",
}


def _ts_name(uid: str) -> str:
    return f"{UID(uid).name} (`{uid}`)"


def _table(header: Iterable[str], rows: Iterable[Iterable[str]]) -> list[str]:
    head = list(header)
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(row) + " |" for row in rows]
    return out


def _outcome(kind: str) -> str:
    return _OUTCOME_WORDS.get(kind, kind)


def render() -> str:
    """The whole conformance statement as Markdown."""
    listener, dest = ListenerConfig(), DestinationConfig(name="-", type="dicom")
    verification = acceptor.SUPPORTED_CONTEXTS[0]
    lines: list[str] = [
        "# deid-router DICOM Conformance Statement",
        "",
        "<!-- Generated by `python -m deid_router.conformance --write` from the code's own tables;",
        "     tests/unit/test_conformance.py fails when this file and the code disagree. -->",
        "",
        f"Product version {__version__}. Implementation Class UID `{wire.IMPLEMENTATION_CLASS_UID}`, "
        f"Implementation Version Name `{wire.IMPLEMENTATION_VERSION_NAME}` (pynetdicom's, whose A-ASSOCIATE "
        "encoding the router uses).",
        "",
        "## 1 Overview",
        "",
        "deid-router is a DICOM node between modalities and a research or teaching PACS. It receives "
        "instances (Storage SCP), holds the raw instance durably, de-identifies it (PS3.15 Annex E Basic "
        "Application Level Confidentiality Profile with options) and forwards only the de-identified "
        "instance to its destinations (Storage SCU, or folder / DICOMweb where configured).",
        "",
        *_table(
            ("SOP class", "UID", "SCU", "SCP"),
            [
                ("Verification", f"`{verification.abstract_syntax}`", "no", "yes"),
                ("Every Storage SOP class, private and unknown storage classes included", "(any)", "yes", "yes"),
                ("Storage Commitment Push Model", f"`{commitment.STORAGE_COMMITMENT_PUSH}`", "no",
                 "yes (`[storage_commitment] enabled`, default on)"),
            ],
        ),
        "",
        "## 2 Networking",
        "",
        "### 2.1 Association acceptance (the listener)",
        "",
        f"- Called AE title: `listener.ae_title` (default `{listener.ae_title}`); any other called AE title "
        "is rejected (A-ASSOCIATE-RJ permanent, called-AE-title-not-recognized).",
        "- Calling AE titles: any, or only `listener.allowed_calling_aets` (others: rejected permanent, "
        "calling-AE-title-not-recognized).",
        f"- At most `listener.max_associations` (default {listener.max_associations}) established "
        "associations per listener process; more, or a holding disk below `storage.min_free_mb`: rejected "
        "transient, local-limit-exceeded.",
        f"- Maximum PDU received: `listener.max_pdu_size` (default {listener.max_pdu_size}: unlimited).",
        "- Hosts: any, or only those in `listener.allowed_hosts` (CIDRs); others are disconnected at accept, "
        "before anything is read. Connections without a complete A-ASSOCIATE-RQ yet are capped at "
        f"`listener.max_pending_connections` (default {listener.max_pending_connections}) and "
        f"`listener.max_pending_per_host` (default {listener.max_pending_per_host}); beyond: disconnected.",
        f"- Timeouts: the ARTIM timer, `listener.artim_timeout_seconds` (default {listener.artim_timeout_seconds:.0f} s "
        "from the connection, not from the last byte), for the TLS handshake and the whole A-ASSOCIATE-RQ "
        "(expired: the connection is closed), "
        f"`listener.network_timeout_seconds` (default {listener.network_timeout_seconds:.0f} s) "
        f"between messages, `listener.dimse_timeout_seconds` (default {listener.dimse_timeout_seconds:.0f} s) "
        "within one.",
        "- Asynchronous operations: not supported (one operation at a time per association). "
        "SCP/SCU role selection: answered as proposed for storage classes.",
        "",
        "Presentation contexts accepted:",
        "",
        *_table(
            ("Abstract syntax", "Transfer syntaxes", "Role"),
            [
                ("Verification", "<br>".join(_ts_name(t) for t in verification.transfer_syntax), "SCP"),
                ("Storage (any)", "the first transfer syntax the modality proposes for the context, whatever it is "
                 "(the instance is held as received)", "SCP"),
                ("Storage Commitment Push Model",
                 "<br>".join(_ts_name(t) for t in acceptor.COMMITMENT_CONTEXTS[0].transfer_syntax), "SCP"),
            ],
        ),
        "",
        "C-STORE statuses returned:",
        "",
        *_table(
            ("Status", "Meaning", "When"),
            [(f"`0x{code:04X}`", name, when) for code, name, when in RETURNED_STORE_STATUSES],
        ),
        "",
        "Storage commitment: N-ACTION (Request Storage Commitment, Action Type ID 1) is answered at once; "
        "the N-EVENT-REPORT (Event Type ID 1: all committed, 2: failures exist) follows on the same association "
        "while it is open, otherwise on a new association to the `[[storage_commitment.peers]]` address of the "
        "calling AE title, the router taking the SCP role by role selection. \"Committed\" means durably held "
        '(`commitment = "held"`, default) or delivered to every routed destination (`commitment = "delivered"`).',
        "",
        *_table(
            ("Status", "Meaning", "When"),
            [(f"`0x{code:04X}`", name, when) for code, name, when in RETURNED_COMMITMENT_STATUSES],
        ),
        "",
        "### 2.2 Association initiation (forwarding to a DICOM destination)",
        "",
        "- Calling AE title: the destination's `calling_ae_title`, default the listener's AE title.",
        f"- At most `max_associations` (default {dest.max_associations}) associations per destination.",
        "- Proposed presentation contexts: for each SOP class in a batch, the instance's own transfer syntax, "
        "then Explicit VR Little Endian and Implicit VR Little Endian; an instance is sent in its own syntax "
        "when accepted, else decoded and re-encoded in an accepted little endian syntax (compressed pixel data "
        "is decompressed only when the PACS accepts no compressed syntax for it).",
        f"- Timeouts: connect {dest.connect_timeout_seconds:.0f} s, A-ASSOCIATE-AC {dest.acse_timeout_seconds:.0f} s, "
        f"C-STORE-RSP {dest.dimse_timeout_seconds:.0f} s, network {dest.network_timeout_seconds:.0f} s "
        "(destination keys of the same names).",
        "",
        "How the router handles the C-STORE statuses a PACS answers with (read from the code for each):",
        "",
        *_table(
            ("Status", "Meaning", "Router's action"),
            [
                (f"`0x{code:04X}`", name, _outcome(forward_status.classify_status(code).kind.value))
                for code, name in RECEIVED_STATUS_EXAMPLES
            ],
        ),
        "",
        "Failures outside a C-STORE response:",
        "",
        *_table(
            ("Failure", "What happened", "Router's action"),
            [
                (f"`{kind}`", what, _outcome(forward_status.classify_association_failure(kind).kind.value))
                for kind, what in ASSOCIATION_FAILURE_EXAMPLES
            ],
        ),
        "",
        "## 3 Security",
        "",
        "- Nothing identified leaves the node: only de-identified instances are forwarded; an instance the "
        "engine is unsure about is quarantined.",
        "- De-identification: PS3.15 Annex E Table E.1-1 Basic Profile, with these options selectable in "
        "`deid.options`:",
        "",
        *[f"  - `{opt}`" for opt in DEID_OPTIONS],
        "",
        "- De-identified instances carry PatientIdentityRemoved YES, DeidentificationMethod and "
        "DeidentificationMethodCodeSequence (CID 7050: 113100 and one code per option).",
        "- UIDs, pseudonyms and date shifts are keyed (HMAC-SHA256) by the node's secret: the same input gives "
        "the same output across restarts and nodes.",
        "- DICOM TLS (PS3.15 B.1 Basic TLS Secure Transport Connection Profile, with the BCP 195 profile): "
        "a listener on `[listener.tls] port` and, per DICOM destination, `tls = true`. "
        f"{tls.MINIMUM_VERSION_NAME} and {tls.MAXIMUM_VERSION_NAME} only; for TLS 1.2 the cipher suites "
        + ", ".join(f"`{c}`" for c in tls.BCP195_TLS12_CIPHERS.split(":"))
        + "; for TLS 1.3 OpenSSL's (all AEAD). The listener requires a client certificate signed by "
        f"`ca_file` unless `require_client_cert = false` (default {str(ListenerTlsConfig.__dataclass_fields__['require_client_cert'].default).lower()}); "
        "towards a PACS the certificate and host name (`server_name`, default the host) are verified. "
        "A peer that fails is refused and logged with a fixed reason: "
        + ", ".join(f"`tls_{r}`" for r in tls.refusal_codes())
        + ".",
        "",
        "## 4 Character sets",
        "",
        "Instances in every Specific Character Set pydicom decodes (ISO 2022 and ISO_IR 192 included) are "
        "accepted and keep their character set; replacement values the router writes are in the default "
        "repertoire.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="render the DICOM conformance statement")
    parser.add_argument("--write", action="store_true", help=f"write {DOCUMENT}")
    args = parser.parse_args(argv)
    text = render()
    if args.write:
        DOCUMENT.parent.mkdir(parents=True, exist_ok=True)
        DOCUMENT.write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
