"""Typed, validated configuration (see ../shared/contract.md).

Every problem is collected (file, key, reason) so that ``check-config`` can print them all at
once. Unknown keys are errors: a typo must never silently weaken de-identification. Relative
paths resolve against the directory of the config file.
"""

from __future__ import annotations

import functools
import ipaddress
import os
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Self, Union, get_args, get_origin

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    model_validator,
)
from pydantic_core import PydanticCustomError

from deid_router.errors import ConfigError, TlsError

ENV_CONFIG = "DEID_ROUTER_CONFIG"
ENV_QUEUE_URL = "DEID_ROUTER_QUEUE_URL"

RULE_ACTIONS = ("keep", "remove", "empty", "dummy", "replace", "uid", "hash", "shift_date", "clean")
DEID_OPTIONS = (
    "retain_safe_private",
    "retain_uids",
    "retain_device_identity",
    "retain_institution_identity",
    "retain_patient_characteristics",
    "retain_long_full_dates",
    "retain_long_modified_dates",
    "clean_descriptors",
    "clean_structured_content",
    "clean_graphics",
)
BURNED_IN_CHOICES = ("quarantine", "forward", "clean")
PIXEL_NO_RULE_CHOICES = ("quarantine", "ocr_clear")
MATCH_KEYS = ("calling_aet", "called_aet", "modality", "sop_class_uid")
_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # default character repertoire, no backslash
_TAG_RE = re.compile(r"^\(([0-9A-Fa-f]{4}),([0-9A-Fa-f]{4})\)$")


@dataclass(frozen=True)
class ListenerTlsConfig:
    """[listener.tls]: DICOM TLS on its own port (PS3.15 B.1, BCP 195)."""

    port: int
    cert_file: Path
    key_file: Path
    ca_file: Path | None = None
    require_client_cert: bool = True


@dataclass(frozen=True)
class ListenerConfig:
    ae_title: str = "DEID_ROUTER"
    host: str = "0.0.0.0"
    port: int = 11112
    allowed_calling_aets: tuple[str, ...] = ()
    max_associations: int = 16  # per listener process
    processes: int = 1  # listener processes sharing the port (SO_REUSEPORT); 0: one per core
    max_pdu_size: int = 0  # 0: unlimited, fastest for pynetdicom
    network_timeout_seconds: float = 60.0
    dimse_timeout_seconds: float = 60.0
    # Network front door (contract "Network security"): hosts allowed to connect (CIDRs, empty:
    # any), the plain port on or off, the TLS listener, and the bounds on connections that have
    # not completed A-ASSOCIATE yet (ARTIM from the connection, caps in total and per host).
    allowed_hosts: tuple[str, ...] = ()
    plain: bool = True
    tls: ListenerTlsConfig | None = None
    artim_timeout_seconds: float = 10.0
    max_pending_connections: int = 256
    max_pending_per_host: int = 32


@dataclass(frozen=True)
class StorageConfig:
    root: Path
    keep_raw_hours: float = 0.0
    min_free_mb: int = 512  # below this free space, new associations are refused (transient)


@dataclass(frozen=True)
class QueueConfig:
    url: str
    max_attempts: int = 10
    retry_initial_seconds: float = 2.0
    retry_max_seconds: float = 600.0
    workers: int = 0  # 0: one per CPU core
    lease_seconds: float = 60.0
    batch_size: int = 32
    poll_seconds: float = 0.5
    busy_timeout_seconds: float = 30.0  # SQLite: how long a write waits for the lock before 0xA700
    worker_nice: int = 19  # workers yield the CPU to the listener: intake never waits for de-identification


@dataclass(frozen=True)
class DeidRule:
    tag: str  # keyword or "(gggg,eeee)", as written
    action: str
    value: str | None = None


@dataclass(frozen=True)
class DeidConfig:
    secret_file: Path
    options: tuple[str, ...] = ()
    burned_in_annotation: str = "quarantine"
    rules: tuple[DeidRule, ...] = ()
    pseudonym_prefix: str = "DEID-"
    pseudonym_length: int = 10
    patient_name_pattern: str = "ANON^{pseudonym}"
    date_shift_min_days: int = -3650
    date_shift_max_days: int = -365
    patient_mapping_csv: Path | None = None
    # pixel de-identification (burned_in_annotation = "clean", deid/pixels.py): extra rules,
    # OCR verification, and what OCR may do for an image no rule matches
    pixel_rules_file: Path | None = None
    pixel_ocr: bool = False
    pixel_no_rule: str = "quarantine"  # quarantine | ocr_clear (needs pixel_ocr)


@dataclass(frozen=True)
class DestinationConfig:
    name: str
    type: str  # "dicom" | "folder"
    ae_title: str = ""
    host: str = ""
    port: int = 0
    path: Path | None = None
    calling_ae_title: str = ""  # empty: the listener's AE title
    max_associations: int = 1
    connect_timeout_seconds: float = 10.0
    acse_timeout_seconds: float = 30.0
    dimse_timeout_seconds: float = 60.0
    network_timeout_seconds: float = 60.0
    max_pdu_size: int = 0
    # DICOM TLS to the PACS (type "dicom"): verified against ca_file and server_name (default host)
    tls: bool = False
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    server_name: str = ""
    # type = "dicomweb" (issue 15): STOW-RS to url; auth from a file; TLS verified against ca_file
    url: str = ""
    username: str = ""
    password_file: Path | None = None
    token_file: Path | None = None
    instances_per_request: int = 16  # (ca_file above: also the STOW-RS server's CA)


@dataclass(frozen=True)
class AuditConfig:
    syslog_url: str = ""  # udp://host:port, tcp://host:port or tls://host:port; empty: no audit messages
    ca_file: Path | None = None  # tls: the collector's CA
    source_id: str = ""  # AuditSourceID; empty: the node's name (host and listener port)


@dataclass(frozen=True)
class CommitmentPeerConfig:
    ae_title: str
    host: str
    port: int


@dataclass(frozen=True)
class StorageCommitmentConfig:
    enabled: bool = True  # accept Storage Commitment Push Model requests
    commitment: str = "held"  # "held": durably held; "delivered": every routed destination has it
    wait_seconds: float = 600.0  # "delivered": how long to wait before reporting a failure
    peers: tuple[CommitmentPeerConfig, ...] = ()  # where to report when the association is gone


@dataclass(frozen=True)
class RouteConfig:
    name: str
    destinations: tuple[str, ...]
    match: dict[str, str] = field(default_factory=dict)
    profile: str = ""  # a [profiles.NAME]; "": the [deid] table


# --- profiles (issue 15): [profiles.NAME] = any key of [deid] except secret_file, plus scope
DEFAULT_SCOPE = "default"  # the scope of [deid]: v1 keys, v1 pseudonyms and UIDs
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class ProfileConfig:
    name: str
    scope: str  # keys UIDs, pseudonyms, date shifts and the crosswalk (derived from the one secret)
    deid: DeidConfig


@dataclass(frozen=True)
class HttpConfig:
    """``[http]``: console, API, health and metrics (port 0: no HTTP server)."""

    host: str = "127.0.0.1"
    port: int = 8080
    cert_file: Path | None = None  # [http.tls]: both or neither
    key_file: Path | None = None


@dataclass(frozen=True)
class Config:
    path: Path
    listener: ListenerConfig
    storage: StorageConfig
    queue: QueueConfig
    deid: DeidConfig
    destinations: tuple[DestinationConfig, ...]
    routes: tuple[RouteConfig, ...]
    warnings: tuple[str, ...] = ()
    http: HttpConfig = field(default_factory=HttpConfig)
    storage_commitment: StorageCommitmentConfig = StorageCommitmentConfig()
    audit: AuditConfig = AuditConfig()
    profiles: tuple[ProfileConfig, ...] = ()

    def profile(self, name: str) -> ProfileConfig:
        """The profile a route names; "" is [deid] in the default scope."""
        if not name:
            return ProfileConfig("", DEFAULT_SCOPE, self.deid)
        for p in self.profiles:
            if p.name == name:
                return p
        raise KeyError(name)

    def scopes(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys([DEFAULT_SCOPE, *(p.scope for p in self.profiles)]))

    def destination(self, name: str) -> DestinationConfig:
        for d in self.destinations:
            if d.name == name:
                return d
        raise KeyError(name)


# --------------------------------------------------------------------------- the TOML schema
# pydantic models of the TOML tables (extra="forbid": a typo is an error, never a silently
# ignored key). Their errors become today's (file, key, reason) lines in _lines(); the
# validated tables build the frozen dataclasses above, which are what the node uses.

PROBLEM = "deid_router_config"  # the error type of Problems: reasons written for operators


@dataclass(frozen=True)
class Site:
    """The validation context: where relative paths resolve, and the names other tables may
    refer to (as written, so that a route naming a destination that has its own mistake is
    not also reported as naming an unknown one)."""

    base: Path
    destinations: tuple[str, ...] | None = None  # None: references are not checked
    profiles: tuple[str, ...] | None = None
    queue_url: str = ""  # DEID_ROUTER_QUEUE_URL, when set


def site(info: ValidationInfo) -> Site:
    """The context of this validation (the current folder when a table is validated alone)."""
    return info.context if isinstance(info.context, Site) else Site(Path.cwd())


class Problems:
    """The problems one validator finds, raised together as one pydantic error that _lines()
    splits again: ``at`` is appended to the key of the value being validated (".port")."""

    def __init__(self) -> None:
        self.found: list[tuple[str, str]] = []

    def add(self, reason: str, at: str = "") -> None:
        self.found.append((at, reason))

    def check(self) -> None:
        if self.found:
            raise _error(tuple(self.found))


def problem(reason: str, at: str = "") -> PydanticCustomError:
    """One problem with the value being validated (raise it)."""
    return _error(((at, reason),))


def _error(found: tuple[tuple[str, str], ...]) -> PydanticCustomError:
    summary = "; ".join(f"{at}: {reason}" if at else reason for at, reason in found)
    return PydanticCustomError(PROBLEM, "{summary}", {"summary": summary, "problems": found})


class Table(BaseModel):
    """A TOML table: unknown keys are errors; values are never converted from another type
    (``port = "11112"`` is a mistake, not a port)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @classmethod
    def extra_reason(cls, key: str) -> str:
        """What is wrong with ``key``, which this table does not have."""
        return f"unknown key (allowed: {', '.join(cls.model_fields)})"

    @classmethod
    def missing_reason(cls, key: str) -> str:
        return "is required"

    def fields(self, *without: str) -> dict[str, Any]:
        """The validated values by key (to build the dataclass of the same fields)."""
        return {k: getattr(self, k) for k in type(self).model_fields if k not in without}


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise problem(f"must be a str, got {type(value).__name__}")
    return value


def resolve(base: Path, value: str) -> Path:
    p = Path(value).expanduser()
    return Path(os.path.normpath(p if p.is_absolute() else base / p))


def _path(value: Any, info: ValidationInfo) -> Path:
    return resolve(site(info).base, _text(value))


def _optional_path(value: Any, info: ValidationInfo) -> Path | None:
    return _path(value, info) if value != "" else None


def _readable_file(path: Path | None) -> Path | None:
    if path is not None and not (path.is_file() and os.access(path, os.R_OK)):
        raise problem(f"{path} is not a readable file")
    return path


def writable_dir_problem(path: Path) -> str | None:
    """The directory must exist and be writable, or be creatable under a writable parent."""
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        return f"{path} is not a directory"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{path} is not writable"
    return None


def _writable_dir(path: Path) -> Path:
    reason = writable_dir_problem(path)
    if reason:
        raise problem(reason)
    return path


def _ae_title(value: str) -> str:
    if not _AE_RE.match(value) or not value.strip():
        raise problem("must be 1-16 printable characters without backslash")
    return value


def _optional_ae_title(value: str) -> str:
    return _ae_title(value) if value else value


def one_of(*choices: str) -> AfterValidator:
    def check(value: str) -> str:
        if value not in choices:
            raise problem(f"must be one of {', '.join(choices)}")
        return value

    return AfterValidator(check)


# Relative paths resolve against the config file's folder; "" is "not given" where optional.
ConfigPath = Annotated[Path, BeforeValidator(_path)]
ReadableFile = Annotated[Path, BeforeValidator(_path), AfterValidator(_readable_file)]
OptionalFile = Annotated[Path | None, BeforeValidator(_optional_path), AfterValidator(_readable_file)]
WritableDir = Annotated[Path, BeforeValidator(_path), AfterValidator(_writable_dir)]
AeTitle = Annotated[StrictStr, AfterValidator(_ae_title)]
OptionalAeTitle = Annotated[StrictStr, AfterValidator(_optional_ae_title)]
Port = Annotated[StrictInt, Field(ge=0, le=65535)]
Seconds = Annotated[StrictFloat, Field(ge=0.1)]
Count = Annotated[StrictInt, Field(ge=0)]
Positive = Annotated[StrictInt, Field(ge=1)]

_TYPE_ERRORS = {"int_type": "int", "string_type": "str", "bool_type": "bool", "float_type": "float"}


def _unwrap(tp: Any) -> Any:
    """``X`` of ``Annotated[X, ...]`` and of ``X | None``."""
    while True:
        if get_origin(tp) is Annotated:
            tp = get_args(tp)[0]
        elif get_origin(tp) in (Union, UnionType) and type(None) in get_args(tp):
            rest = [a for a in get_args(tp) if a is not type(None)]
            tp = rest[0] if len(rest) == 1 else Union[tuple(rest)]
        else:
            return tp


def _is_table(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _tagged(tp: Any) -> tuple[Any, ...]:
    """The members of a union of tables told apart by ``type`` (destinations); () otherwise."""
    if get_origin(tp) in (Union, UnionType) and all(_is_table(a) for a in get_args(tp)):
        return get_args(tp)
    return ()


def _walk(root: Any, loc: tuple[str | int, ...], prefix: str) -> tuple[str, Any, str, Any]:
    """Follow a pydantic error location through the schema: the key as operators write it
    (``destinations[0].port``), the table holding its last part, that part, and its type."""
    key, table, last, tp = prefix, None, "", root
    for part in loc:
        tp = _unwrap(tp)
        if part == "[key]":  # the key of a dict entry was wrong, not its value
            continue
        if isinstance(part, int):
            key += f"[{part}]"
            args = get_args(tp)
            tp = args[0] if args else None
            continue
        members = _tagged(tp)
        if members:  # a tagged union: the location names the member, not a key
            tp = next((m for m in members if part in get_args(m.model_fields["type"].annotation)), None)
            continue
        key = f"{key}.{part}" if key else part
        last = part
        if _is_table(tp):
            table = tp
            field = tp.model_fields.get(part)
            tp = field.annotation if field is not None else None
        elif get_origin(tp) is dict:
            tp = get_args(tp)[1]
        else:
            tp = None
    return key, table, last, _unwrap(tp)


def _tags(tp: Any) -> str:
    return ", ".join(repr(a) for m in _tagged(tp) for a in get_args(m.model_fields["type"].annotation))


# --------------------------------------------------------------------------- [deid], [profiles.NAME]


def _known_keyword(name: str) -> bool:
    from pydicom.datadict import tag_for_keyword

    return tag_for_keyword(name) is not None


def _rule_tag(tag: str) -> str:
    if not tag:
        raise problem("is required")
    if not _TAG_RE.match(tag) and not _known_keyword(tag):
        raise problem(f"{tag!r} is neither a DICOM keyword nor (gggg,eeee)")
    return tag


def _value_for_action(value: str | None, info: ValidationInfo) -> str | None:
    action = info.data.get("action")  # absent when the action itself is wrong
    if action == "replace" and value is None:
        raise problem("is required (a string) for action 'replace'")
    if action not in (None, "replace") and value is not None:
        raise problem("is only allowed with action 'replace'")
    return value


class RuleTable(Table):
    """``[[deid.rules]]``: an override applied after the profile.

    Checks between keys are field validators on the later key (``info.data`` holds the
    earlier ones): they run, and are reported, even when another key of the table is wrong.
    """

    tag: Annotated[StrictStr, AfterValidator(_rule_tag)]  # keyword or "(gggg,eeee)", as written
    action: Annotated[StrictStr, one_of(*RULE_ACTIONS)]
    value: Annotated[StrictStr | None, AfterValidator(_value_for_action)] = Field(default=None, validate_default=True)

    def to_config(self) -> DeidRule:
        return DeidRule(**self.fields())


def _options(options: tuple[str, ...]) -> tuple[str, ...]:
    problems = Problems()
    for opt in options:
        if opt not in DEID_OPTIONS:
            problems.add(f"unknown option {opt!r} (known: {', '.join(DEID_OPTIONS)})")
    if "retain_long_full_dates" in options and "retain_long_modified_dates" in options:
        problems.add("retain_long_full_dates and retain_long_modified_dates exclude each other")
    problems.check()
    return options


def _name_pattern(pattern: str) -> str:
    if "{pseudonym}" not in pattern:
        raise problem("must contain {pseudonym}")
    return pattern


def _pixel_rules(path: Path | None) -> Path | None:
    """Read the extra pixel rules now: a bad rule is named by check-config, not by a worker."""
    if path is None:
        return None
    from deid_router.deid.pixel_rules import read_rules_file

    _, found = read_rules_file(path)
    problems = Problems()
    for file, key, reason in found:
        problems.add(f"{reason} ({file})", "" if key == "-" else f" {key}")
    problems.check()
    return path


def _tesseract(ocr: bool) -> bool:
    import shutil

    if ocr and shutil.which("tesseract") is None:
        raise problem("tesseract is not installed (Debian: apt-get install tesseract-ocr)")
    return ocr


def _after_min_days(days: int, info: ValidationInfo) -> int:
    if days < info.data.get("date_shift_min_days", days):
        raise problem("must be >= date_shift_min_days")
    return days


def _fits_patient_id(length: int, info: ValidationInfo) -> int:
    if len(info.data.get("pseudonym_prefix", "")) + length > 64:
        raise problem("prefix plus length must fit PatientID (64 characters)")
    return length


def _no_rule_choice(choice: str, info: ValidationInfo) -> str:
    if choice == "ocr_clear" and info.data.get("pixel_ocr") is False:
        raise problem("'ocr_clear' needs pixel_ocr = true")
    return choice


_DD = DeidConfig  # the defaults are the dataclass's


class DeidKeys(Table):
    """The keys of ``[deid]`` that a ``[profiles.NAME]`` may set too (all but secret_file).

    A check between keys sits on the later key and reads the earlier ones from ``info.data``,
    so it is reported together with any other mistake in the table.
    """

    options: Annotated[tuple[StrictStr, ...], AfterValidator(_options)] = _DD.options
    burned_in_annotation: Annotated[StrictStr, one_of(*BURNED_IN_CHOICES)] = _DD.burned_in_annotation
    rules: tuple[RuleTable, ...] = ()
    pseudonym_prefix: StrictStr = _DD.pseudonym_prefix
    pseudonym_length: Annotated[StrictInt, Field(ge=6), AfterValidator(_fits_patient_id)] = Field(
        default=_DD.pseudonym_length, validate_default=True
    )
    patient_name_pattern: Annotated[StrictStr, AfterValidator(_name_pattern)] = _DD.patient_name_pattern
    date_shift_min_days: StrictInt = _DD.date_shift_min_days
    date_shift_max_days: Annotated[StrictInt, AfterValidator(_after_min_days)] = Field(
        default=_DD.date_shift_max_days, validate_default=True
    )
    patient_mapping_csv: OptionalFile = None
    pixel_rules_file: Annotated[Path | None, BeforeValidator(_optional_path), AfterValidator(_pixel_rules)] = None
    pixel_ocr: Annotated[StrictBool, AfterValidator(_tesseract)] = _DD.pixel_ocr
    pixel_no_rule: Annotated[StrictStr, one_of(*PIXEL_NO_RULE_CHOICES), AfterValidator(_no_rule_choice)] = Field(
        default=_DD.pixel_no_rule, validate_default=True
    )

    def to_config(self, secret_file: Path) -> DeidConfig:
        rules = tuple(rule.to_config() for rule in self.rules)
        return DeidConfig(secret_file=secret_file, rules=rules, **self.fields("rules", "secret_file", "scope"))


def _secret_file(path: Path) -> Path:
    """Readable when it exists; else creatable (serve creates it, mode 0600)."""
    if path.exists():
        if not os.access(path, os.R_OK):
            raise problem(f"{path} is not readable")
    elif reason := writable_dir_problem(path.parent):
        raise problem(reason)
    return path


class DeidTable(DeidKeys):
    """``[deid]``: the profile of routes without one, in the default scope."""

    # the HMAC key of every scope (each derives its own with HKDF): created if missing
    secret_file: Annotated[Path, BeforeValidator(_path), AfterValidator(_secret_file)] = Field(
        default="var/secret.key", validate_default=True
    )


def _scope_name(what: str) -> AfterValidator:
    def check(name: str) -> str:
        if not _NAME_RE.match(name):
            raise problem(f"a {what} is 1-64 letters, digits, '.', '_' or '-'")
        return name

    return AfterValidator(check)


ProfileName = Annotated[str, _scope_name("profile name")]


class ProfileTable(DeidKeys):
    """``[profiles.NAME]``: any key of [deid] but secret_file, plus the scope that keys its
    UIDs, pseudonyms, date shifts and crosswalk (default: the profile's name)."""

    scope: Annotated[StrictStr, _scope_name("scope")] | None = None

    @classmethod
    def extra_reason(cls, key: str) -> str:
        if key == "secret_file":
            return "not allowed: every scope's keys derive from deid.secret_file"
        return super().extra_reason(key)

    def to_profile(self, name: str, secret_file: Path) -> ProfileConfig:
        return ProfileConfig(name, self.scope or name, self.to_config(secret_file))


@functools.cache
def _destination_schema() -> tuple[Any, TypeAdapter[Any]]:
    """One [[destinations]] table: the union of the registered types' models (registry.py)."""
    from deid_router.forward.registry import destination_table

    schema = destination_table()
    return schema, TypeAdapter(schema)


def _validate(r: _Reader, schema: Any, data: Any, prefix: str, ctx: Site) -> Any:
    try:
        return TypeAdapter(schema).validate_python(data, context=ctx)
    except ValidationError as exc:
        for key, reason in _lines(exc, schema, prefix):
            r.problem(key, reason)
        return None


def _lines(exc: ValidationError, root: Any, prefix: str = "") -> list[tuple[str, str]]:
    """pydantic's errors as (key, reason), in the words check-config has always used."""
    out: list[tuple[str, str]] = []
    for err in exc.errors(include_url=False):
        key, table, last, tp = _walk(root, err["loc"], prefix)
        kind, ctx, value = err["type"], err.get("ctx") or {}, err.get("input")
        if kind == PROBLEM:
            out.extend((key + at, reason) for at, reason in ctx["problems"])
            continue
        if kind == "extra_forbidden":
            reason = table.extra_reason(last) if table is not None else "unknown key"
        elif kind == "missing":
            reason = table.missing_reason(last) if table is not None else "is required"
        elif kind in ("union_tag_invalid", "union_tag_not_found"):
            key, reason = f"{key}.type", f"must be one of {_tags(tp)}"
        elif kind in _TYPE_ERRORS:
            reason = f"must be a {_TYPE_ERRORS[kind]}, got {type(value).__name__}"
        elif kind == "greater_than_equal":
            reason = f"must be >= {ctx['ge']}"
        elif kind == "less_than_equal":
            reason = f"must be <= {ctx['le']}"
        elif kind in ("model_type", "model_attributes_type", "dict_type"):
            reason = "must be a table"
        elif kind in ("tuple_type", "list_type"):
            items = _unwrap(get_args(tp)[0]) if get_args(tp) else None
            tables = _is_table(items) or bool(_tagged(items))
            reason = f"must be an array of tables ([[{key}]])" if tables else "must be a list of strings"
        else:
            reason = str(err["msg"])
        out.append((key, reason))
    return out


class _Reader:
    """Collects problems while pulling typed values out of nested TOML tables."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.problems: list[tuple[str, str, str]] = []

    def problem(self, key: str, reason: str) -> None:
        self.problems.append((self.file, key, reason))

    def table(self, data: dict[str, Any], key: str) -> dict[str, Any]:
        value = data.get(key, {})
        if not isinstance(value, dict):
            self.problem(key, "must be a table")
            return {}
        return value

    def unknown(self, data: dict[str, Any], prefix: str, allowed: tuple[str, ...]) -> None:
        for k in data:
            if k not in allowed:
                where = f"{prefix}.{k}" if prefix else k
                self.problem(where, f"unknown key (allowed: {', '.join(allowed)})")

    def get(self, data: dict[str, Any], prefix: str, key: str, kind: type, default: Any) -> Any:
        where = f"{prefix}.{key}"
        if key not in data:
            return default
        value = data[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if kind is not bool and isinstance(value, bool) or not isinstance(value, kind):
            self.problem(where, f"must be a {kind.__name__}, got {type(value).__name__}")
            return default
        return value

    def number(
        self, data: dict[str, Any], prefix: str, key: str, kind: type, default: Any, minimum: float
    ) -> Any:
        value = self.get(data, prefix, key, kind, default)
        if value < minimum:
            self.problem(f"{prefix}.{key}", f"must be >= {minimum}")
            return default
        return value

    def strings(self, data: dict[str, Any], prefix: str, key: str) -> tuple[str, ...]:
        value = data.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            self.problem(f"{prefix}.{key}", "must be a list of strings")
            return ()
        return tuple(value)

    def ae_title(self, value: str, where: str) -> None:
        if not _AE_RE.match(value) or not value.strip():
            self.problem(where, "must be 1-16 printable characters without backslash")


def _check_writable_dir(r: _Reader, where: str, path: Path) -> None:
    reason = writable_dir_problem(path)
    if reason:
        r.problem(where, reason)


def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    """Read and validate a config file; raise ConfigError listing every problem."""
    if path is None:
        env = os.environ.get(ENV_CONFIG)
        if not env:
            raise ConfigError([("-", "--config", f"no config given: pass --config PATH or set {ENV_CONFIG}")])
        path = env
    file = Path(path).expanduser().resolve()
    try:
        raw = tomllib.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError([(str(file), "-", "file not found")]) from None
    except PermissionError:
        raise ConfigError([(str(file), "-", "file not readable (permission denied)")]) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError([(str(file), "-", f"not valid TOML: {exc}")]) from None
    return parse_config(raw, file)


def parse_config(raw: dict[str, Any], file: Path) -> Config:
    """Validate an already-parsed TOML document."""
    r = _Reader(str(file))
    base = file.parent
    warnings: list[str] = []
    r.unknown(raw, "", ("listener", "storage", "queue", "deid", "destinations", "routes", "storage_commitment", "audit",
                     "http", "profiles"))

    # [listener]
    li = r.table(raw, "listener")
    r.unknown(li, "listener", tuple(ListenerConfig.__dataclass_fields__))
    d = ListenerConfig()
    listener_net = _listener_network(r, li, base, d)
    listener = ListenerConfig(
        **listener_net,
        ae_title=r.get(li, "listener", "ae_title", str, d.ae_title),
        host=r.get(li, "listener", "host", str, d.host),
        port=r.number(li, "listener", "port", int, d.port, 0),
        allowed_calling_aets=r.strings(li, "listener", "allowed_calling_aets"),
        max_associations=r.number(li, "listener", "max_associations", int, d.max_associations, 1),
        processes=r.number(li, "listener", "processes", int, d.processes, 0),
        max_pdu_size=r.number(li, "listener", "max_pdu_size", int, d.max_pdu_size, 0),
        network_timeout_seconds=r.number(li, "listener", "network_timeout_seconds", float, 60.0, 0.1),
        dimse_timeout_seconds=r.number(li, "listener", "dimse_timeout_seconds", float, 60.0, 0.1),
    )
    r.ae_title(listener.ae_title, "listener.ae_title")
    for i, aet in enumerate(listener.allowed_calling_aets):
        r.ae_title(aet, f"listener.allowed_calling_aets[{i}]")
    if listener.port > 65535:
        r.problem("listener.port", "must be <= 65535")
    if listener.tls is not None and listener.plain and listener.tls.port == listener.port and listener.port:
        r.problem("listener.tls.port", "must differ from listener.port")

    # [storage]
    st = r.table(raw, "storage")
    r.unknown(st, "storage", tuple(StorageConfig.__dataclass_fields__))
    root = resolve(base, r.get(st, "storage", "root", str, "var"))
    storage = StorageConfig(
        root=root,
        keep_raw_hours=r.number(st, "storage", "keep_raw_hours", float, 0.0, 0),
        min_free_mb=r.number(st, "storage", "min_free_mb", int, 512, 0),
    )
    _check_writable_dir(r, "storage.root", root)

    # [queue]
    qu = r.table(raw, "queue")
    r.unknown(qu, "queue", tuple(QueueConfig.__dataclass_fields__))
    url = os.environ.get(ENV_QUEUE_URL) or r.get(qu, "queue", "url", str, "")
    if not url:
        url = f"sqlite:///{root / 'queue.sqlite3'}"
    elif not (url.startswith("sqlite:") or url.startswith("postgresql")):
        r.problem("queue.url", "must be empty (SQLite under storage.root), sqlite:///PATH or postgresql+psycopg://...")
    queue = QueueConfig(
        url=url,
        max_attempts=r.number(qu, "queue", "max_attempts", int, 10, 1),
        retry_initial_seconds=r.number(qu, "queue", "retry_initial_seconds", float, 2.0, 0),
        retry_max_seconds=r.number(qu, "queue", "retry_max_seconds", float, 600.0, 0),
        workers=r.number(qu, "queue", "workers", int, 0, 0),
        lease_seconds=r.number(qu, "queue", "lease_seconds", float, 60.0, 1),
        batch_size=r.number(qu, "queue", "batch_size", int, 32, 1),
        poll_seconds=r.number(qu, "queue", "poll_seconds", float, 0.5, 0.01),
        busy_timeout_seconds=r.number(qu, "queue", "busy_timeout_seconds", float, 30.0, 0.1),
        worker_nice=r.number(qu, "queue", "worker_nice", int, 19, 0),
    )
    if queue.worker_nice > 19:
        r.problem("queue.worker_nice", "must be <= 19")
    if queue.retry_max_seconds < queue.retry_initial_seconds:
        r.problem("queue.retry_max_seconds", "must be >= queue.retry_initial_seconds")

    ctx = Site(base)
    deid_table = _validate(r, DeidTable, r.table(raw, "deid"), "deid", ctx)
    deid = deid_table.to_config(deid_table.secret_file) if deid_table else DeidConfig(resolve(base, "var/secret.key"))
    profile_tables = _validate(r, dict[ProfileName, ProfileTable], r.table(raw, "profiles"), "profiles", ctx) or {}
    profiles = tuple(p.to_profile(name, deid.secret_file) for name, p in profile_tables.items())

    # [[destinations]]
    destinations: list[DestinationConfig] = []
    raw_dests = raw.get("destinations", [])
    if not isinstance(raw_dests, list):
        r.problem("destinations", "must be an array of tables ([[destinations]])")
        raw_dests = []
    seen: set[str] = set()
    schema, tables = _destination_schema()
    for i, dest in enumerate(raw_dests):
        where = f"destinations[{i}]"
        name = dest.get("name") if isinstance(dest, dict) else None
        try:
            table = tables.validate_python(dest, context=Site(base))
        except ValidationError as exc:
            for key, reason in _lines(exc, schema, where):
                r.problem(key, reason)
        else:
            destinations.append(table.to_config())
        if isinstance(name, str) and name:
            if name in seen:
                r.problem(f"{where}.name", f"duplicate destination name {name!r}")
            seen.add(name)

    # [[routes]]
    routes: list[RouteConfig] = []
    raw_routes = raw.get("routes", [])
    if not isinstance(raw_routes, list):
        r.problem("routes", "must be an array of tables ([[routes]])")
        raw_routes = []
    for i, route in enumerate(raw_routes):
        where = f"routes[{i}]"
        if not isinstance(route, dict):
            r.problem(where, "must be a table")
            continue
        r.unknown(route, where, ("name", "destinations", "match", "profile"))
        name = r.get(route, where, "name", str, f"route{i}")
        dests = r.strings(route, where, "destinations")
        if not dests:
            r.problem(f"{where}.destinations", "must name at least one destination")
        for dn in dests:
            if dn not in seen:
                r.problem(f"{where}.destinations", f"names unknown destination {dn!r}")
        match = r.table(route, "match") if "match" in route else {}
        clean_match: dict[str, str] = {}
        for k, v in match.items():
            if k not in MATCH_KEYS and not _route_attribute(r, f"{where}.match.{k}", k):
                continue
            if isinstance(v, str):
                clean_match[k] = v
            else:
                r.problem(f"{where}.match.{k}", "must be a string (a glob)")
        profile = r.get(route, where, "profile", str, "")
        if profile and profile not in {p.name for p in profiles}:
            known = ", ".join(p.name for p in profiles) or "none"
            r.problem(f"{where}.profile", f"names unknown profile {profile!r} (defined [profiles.*]: {known})")
        routes.append(RouteConfig(name=name, destinations=dests, match=clean_match, profile=profile))
    if not destinations:
        r.problem("destinations", "at least one [[destinations]] is required")
    if not routes:
        r.problem("routes", "at least one [[routes]] is required, or nothing would be forwarded")
    storage_commitment = _storage_commitment(r, r.table(raw, "storage_commitment"))
    audit = _audit(r, r.table(raw, "audit"), base)
    http = _parse_http(r, raw, base)

    if r.problems:
        raise ConfigError(r.problems)
    return Config(
        path=file,
        listener=listener,
        storage=storage,
        queue=queue,
        deid=deid,
        http=http,
        destinations=tuple(destinations),
        routes=tuple(routes),
        warnings=tuple(warnings),
        storage_commitment=storage_commitment,
        audit=audit,
        profiles=profiles,
    )


def _audit(r: _Reader, au: dict[str, Any], base: Path) -> AuditConfig:
    """[audit]: DICOM audit messages (PS3.15 A.5) to a syslog collector (RFC 5424)."""
    r.unknown(au, "audit", tuple(AuditConfig.__dataclass_fields__))
    url = r.get(au, "audit", "syslog_url", str, "")
    if url and not re.match(r"^(udp|tcp|tls)://[^/:]+:\d{1,5}$", url):
        r.problem("audit.syslog_url", "must be udp://host:port, tcp://host:port or tls://host:port (or empty: off)")
    ca_raw = r.get(au, "audit", "ca_file", str, "")
    ca_file = resolve(base, ca_raw) if ca_raw else None
    if ca_file is not None and not (ca_file.is_file() and os.access(ca_file, os.R_OK)):
        r.problem("audit.ca_file", f"{ca_file} is not a readable file")
    return AuditConfig(syslog_url=url, ca_file=ca_file, source_id=r.get(au, "audit", "source_id", str, ""))


def _storage_commitment(r: _Reader, sc: dict[str, Any]) -> StorageCommitmentConfig:
    """[storage_commitment]: the Storage Commitment Push Model SCP (PS3.4 J)."""
    where = "storage_commitment"
    r.unknown(sc, where, tuple(StorageCommitmentConfig.__dataclass_fields__))
    d = StorageCommitmentConfig()
    mode = r.get(sc, where, "commitment", str, d.commitment)
    if mode not in ("held", "delivered"):
        r.problem(f"{where}.commitment", "must be 'held' (durably held) or 'delivered' (every destination has it)")
    peers: list[CommitmentPeerConfig] = []
    raw_peers = sc.get("peers", [])
    if not isinstance(raw_peers, list):
        r.problem(f"{where}.peers", "must be an array of tables ([[storage_commitment.peers]])")
        raw_peers = []
    for i, peer in enumerate(raw_peers):
        pw = f"{where}.peers[{i}]"
        if not isinstance(peer, dict):
            r.problem(pw, "must be a table")
            continue
        r.unknown(peer, pw, ("ae_title", "host", "port"))
        for key in ("ae_title", "host", "port"):
            if key not in peer:
                r.problem(f"{pw}.{key}", "is required")
        ae = r.get(peer, pw, "ae_title", str, "")
        if ae:
            r.ae_title(ae, f"{pw}.ae_title")
        port = r.number(peer, pw, "port", int, 0, 1)
        if port > 65535:
            r.problem(f"{pw}.port", "must be <= 65535")
        peers.append(CommitmentPeerConfig(ae_title=ae, host=r.get(peer, pw, "host", str, ""), port=port))
    return StorageCommitmentConfig(
        enabled=r.get(sc, where, "enabled", bool, d.enabled),
        commitment=mode,
        wait_seconds=r.number(sc, where, "wait_seconds", float, d.wait_seconds, 0),
        peers=tuple(peers),
    )




def _route_attribute(r: _Reader, where: str, key: str) -> bool:
    """A non-v1 match key must name a top-level text or number attribute."""
    from deid_router.routing import attribute_tag

    try:
        attribute_tag(key)
    except ValueError as exc:
        reason = str(exc)
        if reason.startswith("unknown key"):
            reason = f"unknown key (allowed: {', '.join(MATCH_KEYS)}, a DICOM keyword or (gggg,eeee))"
        r.problem(where, reason)
        return False
    return True


# -- network security ("Network security" in the contract) -----------------------------------

def _cidrs(r: _Reader, values: tuple[str, ...], where: str) -> tuple[str, ...]:
    out: list[str] = []
    for i, value in enumerate(values):
        try:
            out.append(str(ipaddress.ip_network(value.strip(), strict=True)))
        except ValueError as exc:
            r.problem(f"{where}[{i}]", f"{value!r} is not a CIDR network ({exc})")
    return tuple(out)


def _tls_problems(r: _Reader, where: str, files: dict[str, Path | None], build: Callable[[], object]) -> None:
    """Every file must be readable; then load them into a real context: a bad PEM or a key
    of another certificate is found by check-config, not by the first modality."""
    unreadable = False
    for key, path in files.items():
        if path is not None and not (path.is_file() and os.access(path, os.R_OK)):
            r.problem(f"{where}.{key}", f"{path} is not a readable file")
            unreadable = True
    if unreadable:
        return
    try:
        build()
    except TlsError as exc:
        r.problem(f"{where}.{exc.key}", exc.reason)


def _listener_network(r: _Reader, li: dict[str, Any], base: Path, d: ListenerConfig) -> dict[str, Any]:
    """The front-door keys of [listener] and its [listener.tls] table."""
    tls: ListenerTlsConfig | None = None
    if "tls" in li:
        tl = r.table(li, "tls")
        where = "listener.tls"
        r.unknown(tl, where, tuple(ListenerTlsConfig.__dataclass_fields__))
        for key in ("port", "cert_file", "key_file"):
            if key not in tl:
                r.problem(f"{where}.{key}", "is required in [listener.tls]")
        port = r.number(tl, where, "port", int, 0, 0)
        if port > 65535:
            r.problem(f"{where}.port", "must be <= 65535")
        require = r.get(tl, where, "require_client_cert", bool, True)
        ca_raw = r.get(tl, where, "ca_file", str, "")
        if require and not ca_raw:
            r.problem(f"{where}.ca_file", "is required while require_client_cert = true")
        cert_raw, key_raw = r.get(tl, where, "cert_file", str, ""), r.get(tl, where, "key_file", str, "")
        tls = built = ListenerTlsConfig(
            port=port,
            cert_file=resolve(base, cert_raw),
            key_file=resolve(base, key_raw),
            ca_file=resolve(base, ca_raw) if ca_raw else None,
            require_client_cert=require,
        )
        if cert_raw and key_raw and (ca_raw or not require):
            from deid_router.tls import server_context_for

            files = {"cert_file": built.cert_file, "key_file": built.key_file, "ca_file": built.ca_file}
            _tls_problems(r, where, files, lambda: server_context_for(built))
    plain = r.get(li, "listener", "plain", bool, True)
    if not plain and tls is None:
        r.problem("listener.plain", "false needs a [listener.tls] table, or nothing would listen")
    return dict(
        allowed_hosts=_cidrs(r, r.strings(li, "listener", "allowed_hosts"), "listener.allowed_hosts"),
        plain=plain,
        tls=tls,
        artim_timeout_seconds=r.number(li, "listener", "artim_timeout_seconds", float, d.artim_timeout_seconds, 0.1),
        max_pending_connections=r.number(li, "listener", "max_pending_connections", int, d.max_pending_connections, 1),
        max_pending_per_host=r.number(li, "listener", "max_pending_per_host", int, d.max_pending_per_host, 1),
    )


def _parse_http(r: _Reader, raw: dict[str, Any], base: Path) -> HttpConfig:
    """``[http]`` host, port and the optional ``[http.tls]`` cert_file / key_file."""
    ht = r.table(raw, "http")
    r.unknown(ht, "http", ("host", "port", "tls"))
    d = HttpConfig()
    port = r.number(ht, "http", "port", int, d.port, 0)
    if port > 65535:
        r.problem("http.port", "must be <= 65535")
    tls = r.table(ht, "tls") if "tls" in ht else {}
    r.unknown(tls, "http.tls", ("cert_file", "key_file"))
    files: dict[str, Path | None] = {}
    for key in ("cert_file", "key_file"):
        value = r.get(tls, "http.tls", key, str, "")
        files[key] = resolve(base, value) if value else None
        path = files[key]
        if path is not None and not (path.is_file() and os.access(path, os.R_OK)):
            r.problem(f"http.tls.{key}", f"{path} is not a readable file")
    if (files["cert_file"] is None) != (files["key_file"] is None):
        r.problem("http.tls", "cert_file and key_file go together")
    return HttpConfig(
        host=r.get(ht, "http", "host", str, d.host), port=port,
        cert_file=files["cert_file"], key_file=files["key_file"],
    )

