"""The ``[[destinations]]`` table of each destination type, as a pydantic model.

After mercure's ``common/types.py``: one model per type, told apart by ``type`` (a
discriminated union, built from ``registry.py``, where each model is registered beside its
Destination class). A model validates its keys (unknown ones and those of another type are
errors naming the key) and builds the :class:`DestinationConfig` its Destination takes.

This module stays light (no pynetdicom, no httpx): ``check-config`` and every command that
reads the config import it.
"""

from __future__ import annotations

from typing import Annotated, Literal, Self, get_args

from pydantic import AfterValidator, Field, StrictBool, StrictInt, StrictStr, model_validator

from deid_router.config import (
    AeTitle,
    Count,
    DestinationConfig,
    OptionalAeTitle,
    OptionalFile,
    Positive,
    Problems,
    Seconds,
    Table,
    WritableDir,
    problem,
)
from deid_router.errors import TlsError

_D = DestinationConfig  # the defaults are the dataclass's


def _name(value: str) -> str:
    if not value:
        raise problem("is required")
    return value


class DestinationTable(Table):
    """The keys of every type."""

    name: Annotated[StrictStr, AfterValidator(_name)]
    type: str
    max_associations: Positive = _D.max_associations
    connect_timeout_seconds: Seconds = _D.connect_timeout_seconds
    acse_timeout_seconds: Seconds = _D.acse_timeout_seconds
    dimse_timeout_seconds: Seconds = _D.dimse_timeout_seconds
    network_timeout_seconds: Seconds = _D.network_timeout_seconds
    max_pdu_size: Count = _D.max_pdu_size

    @classmethod
    def type_name(cls) -> str:
        """The ``type = "..."`` of this model (its ``Literal``)."""
        (name,) = get_args(cls.model_fields["type"].annotation)
        return str(name)

    @classmethod
    def extra_reason(cls, key: str) -> str:
        from deid_router.forward.registry import types

        owners = [t.name for t in types() if key in t.model.model_fields]
        if owners:
            return "is only allowed for type " + " or ".join(repr(o) for o in owners)
        return super().extra_reason(key)

    @classmethod
    def missing_reason(cls, key: str) -> str:
        return f"is required for type {cls.type_name()!r}"

    def to_config(self) -> DestinationConfig:
        return DestinationConfig(**self.fields())


class DicomTarget(DestinationTable):
    """``type = "dicom"``: C-STORE to ae_title@host:port, optionally over TLS."""

    type: Literal["dicom"]
    ae_title: AeTitle
    host: StrictStr
    port: Annotated[StrictInt, Field(ge=1, le=65535)]
    calling_ae_title: OptionalAeTitle = _D.calling_ae_title  # "": the listener's AE title
    tls: StrictBool = _D.tls
    ca_file: OptionalFile = None  # the PACS certificate is verified against it (and server_name)
    cert_file: OptionalFile = None  # our client certificate, optional
    key_file: OptionalFile = None
    server_name: StrictStr = _D.server_name  # "": host

    @model_validator(mode="after")
    def _tls_files(self) -> Self:
        """Load the files into a real context: a bad PEM or a key of another certificate is
        found by check-config, not by the first association."""
        problems = Problems()
        if not self.tls:
            for key in ("ca_file", "cert_file", "key_file", "server_name"):
                if key in self.model_fields_set:
                    problems.add("is only used with tls = true", f".{key}")
        elif (self.cert_file is None) != (self.key_file is None):
            missing = "key_file" if self.key_file is None else "cert_file"
            problems.add("cert_file and key_file go together (our client certificate)", f".{missing}")
        else:
            from deid_router.tls import client_context

            try:
                client_context(self.ca_file, self.cert_file, self.key_file)
            except TlsError as exc:
                problems.add(exc.reason, f".{exc.key}")
        problems.check()
        return self


class FolderTarget(DestinationTable):
    """``type = "folder"``: writes <path>/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm."""

    type: Literal["folder"]
    path: WritableDir


def _stow_root(url: str) -> str:
    import re

    if not url:
        raise problem("is required for type 'dicomweb' (the DICOMweb root, e.g. http://host:8042/dicom-web)")
    if not re.match(r"^https?://[^/\s]+", url):
        raise problem("must be an http:// or https:// URL")
    return url.rstrip("/")


class DicomwebTarget(DestinationTable):
    """``type = "dicomweb"``: STOW-RS to url; basic (username + password_file) or bearer
    (token_file) auth; ca_file verifies an https server."""

    type: Literal["dicomweb"]
    url: Annotated[StrictStr, AfterValidator(_stow_root)]
    username: StrictStr = _D.username
    password_file: OptionalFile = None
    token_file: OptionalFile = None
    ca_file: OptionalFile = None
    instances_per_request: Positive = _D.instances_per_request

    @classmethod
    def missing_reason(cls, key: str) -> str:
        hint = " (the DICOMweb root, e.g. http://host:8042/dicom-web)" if key == "url" else ""
        return super().missing_reason(key) + hint

    @model_validator(mode="after")
    def _auth(self) -> Self:
        problems = Problems()
        if bool(self.username) != (self.password_file is not None):
            problems.add("basic auth needs both username and password_file", ".username")
        if self.token_file is not None and self.username:
            problems.add("give either token_file (bearer) or username + password_file (basic)", ".token_file")
        if self.ca_file is not None and not self.url.startswith("https://"):
            problems.add("is only used with an https:// url", ".ca_file")
        problems.check()
        return self
