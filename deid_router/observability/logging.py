"""Structured JSON logs that never carry a tag value.

Events are snake_case facts with ids, hashed UIDs, AE titles and status codes. As a
backstop, a processor drops any field whose name says it holds a dataset value, and any
value that is a pydicom object.
"""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import MutableMapping
from typing import Any

import structlog

# Field names that are allowed to carry free text; anything else that looks like a dataset
# value is dropped by the redaction processor.
_FORBIDDEN_KEYS = frozenset(
    {"value", "dataset", "ds", "patient", "patient_id", "patient_name", "name", "uid", "sop_instance_uid",
     "study_instance_uid", "series_instance_uid", "accession", "accession_number", "original"}
)


def redact_phi(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Drop fields that could carry a dataset value (names listed above, pydicom objects)."""
    for key in list(event_dict):
        val = event_dict[key]
        mod = type(val).__module__
        if key.lower() in _FORBIDDEN_KEYS or mod.startswith("pydicom"):
            event_dict[key] = "[redacted]"
    return event_dict


def configure_logging(level: str = "INFO", stream: Any = None) -> None:
    """Configure structlog (JSON lines) and silence pynetdicom's identifier logging."""
    stream = stream or sys.stdout
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            redact_phi,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.WriteLoggerFactory(stream),  # one write per line: processes share stdout
        cache_logger_on_first_use=False,
    )
    # pynetdicom logs identifiers (patient names, UIDs) at INFO/DEBUG: keep only its warnings,
    # and never its request identifiers.
    from pynetdicom import _config as pnd_config

    pnd_config.LOG_REQUEST_IDENTIFIERS = False
    pnd_config.LOG_RESPONSE_IDENTIFIERS = False
    pnd_config.LOG_HANDLER_LEVEL = "none"
    for name in ("pynetdicom", "pydicom"):
        logging.getLogger(name).setLevel(logging.ERROR)
        logging.getLogger(name).propagate = False
    # pydicom's warnings quote the offending value ("Invalid value for VR PN: '...'") and Python
    # prints warnings to stderr, which is this node's log: keep the fact, drop the message.
    warnings.showwarning = _log_warning_without_message


def _log_warning_without_message(
    message: Warning | str, category: type[Warning], filename: str, lineno: int, file: Any = None, line: Any = None
) -> None:
    structlog.get_logger(component="python").warning(
        "python_warning", category=category.__name__, origin=f"{filename.rsplit('/', 1)[-1]}:{lineno}"
    )


def get_logger(name: str) -> Any:
    """A structlog logger bound to a component name."""
    return structlog.get_logger(component=name)
