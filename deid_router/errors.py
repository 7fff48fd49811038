"""The project's error hierarchy.

Exceptions from pydicom, pynetdicom, SQLAlchemy and the OS are translated into these at
one boundary per layer, with the original kept as ``__cause__``. Messages never contain a
tag value: they name keys, attribute paths, job ids and hashed UIDs only.
"""

from __future__ import annotations


class DeidRouterError(Exception):
    """Base of every error this project raises on purpose."""


class ConfigError(DeidRouterError):
    """The configuration is invalid; ``problems`` lists every (file, key, reason)."""

    def __init__(self, problems: list[tuple[str, str, str]]) -> None:
        self.problems = problems
        super().__init__("; ".join(f"{f}: {k}: {r}" for f, k, r in problems))


class StorageError(DeidRouterError):
    """The holding area could not durably store or read a file (disk full, I/O error)."""


class UnsafePathError(DeidRouterError):
    """A path would be built from a value that is not a UID, or would leave its root (store/layout.py)."""


class QueueError(DeidRouterError):
    """The job database could not be reached or refused a write."""


class ListenerError(DeidRouterError):
    """The DICOM port could not be opened (in use, not permitted, no such address)."""


class TlsError(DeidRouterError):
    """A certificate, key or CA file could not be loaded into a TLS context.

    ``key`` is the config key of the file at fault (``cert_file``, ``key_file``, ``ca_file``).
    """

    def __init__(self, key: str, reason: str) -> None:
        self.key = key
        self.reason = reason
        super().__init__(f"{key}: {reason}")


# Trouble with the machine rather than the instance: whoever meets it retries later. The
# de-identification engine lets these through instead of quarantining the instance.
InfrastructureError = (QueueError, StorageError, OSError)


class DeidError(DeidRouterError):
    """De-identification failed or is unsure: the instance must be quarantined, never sent.

    ``reason`` is a short machine-readable code (``residual_phi``, ``burned_in_annotation``,
    ``unmapped_patient``, ``invalid_dataset``, ...); ``path`` names the attribute path
    (e.g. ``ReferencedStudySequence[0].(0008,1150)``) and never its value.
    """

    def __init__(self, reason: str, detail: str = "", path: str = "") -> None:
        self.reason = reason
        self.detail = detail
        self.path = path
        text = reason
        if path:
            text += f" at {path}"
        if detail:
            text += f": {detail}"
        super().__init__(text)


class ForwardError(DeidRouterError):
    """Sending to a destination failed."""


class TransientForwardError(ForwardError):
    """Worth retrying later (PACS down, out of resources, timeout)."""


class PermanentForwardError(ForwardError):
    """Retrying will not help (refused SOP class, permanent rejection)."""


class MissingDatabaseError(DeidRouterError):
    """A command that only reads (or acts on what exists) found no queue database.

    It never creates one: a mistyped ``--config`` must not report an empty node as healthy.
    """


class SecretMismatchError(DeidRouterError):
    """The secret file is missing or is not the one the database was started with."""


class HttpServerError(DeidRouterError):
    """The HTTP port (``[http]``) could not be opened, or the server did not start."""
