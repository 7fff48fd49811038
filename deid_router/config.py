"""Typed, validated configuration (see ../shared/contract.md).

The TOML document is validated by pydantic models, one per table (``Table``: extra="forbid",
no conversion between types), whose errors become the (file, key, reason) lines that
``check-config`` prints, all at once. Unknown keys are errors: a typo must never silently
weaken de-identification. Relative paths resolve against the directory of the config file.
The validated tables build the frozen dataclasses (``Config`` and its parts) the node uses.
``[[destinations]]`` tables are the models each destination type registers in
``forward/registry.py``, told apart by ``type``.
"""

from __future__ import annotations

import functools
import ipaddress
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from types import UnionType
from typing import TYPE_CHECKING, Annotated, Any, Self, Union, get_args, get_origin

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
    ValidationError,
    ValidationInfo,
    create_model,
    model_validator,
)
from pydantic_core import PydanticCustomError

from deid_router.errors import ConfigError, TlsError

if TYPE_CHECKING:
    from deid_router.forward.targets import DestinationTable

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
    type: str  # a registered type (forward/registry.py): "dicom" | "folder" | "dicomweb"
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
    splits again: ``at`` is appended to the key of the value being validated (".port"), and
    ``{table}`` in a reason becomes the key of the table holding it ("deid", "profiles.x")."""

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


def _walk(root: Any, loc: tuple[str | int, ...]) -> tuple[str, Any, str, Any]:
    """Follow a pydantic error location through the schema: the key as operators write it
    (``destinations[0].port``), the table holding its last part, that part, and its type."""
    key, table, last, tp = "", None, "", root
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
            declared = tp.model_fields.get(part)
            tp = declared.annotation if declared is not None else None
        elif get_origin(tp) is dict:
            tp = get_args(tp)[1]
        else:
            tp = None
    return key, table, last, _unwrap(tp)


def _tags(tp: Any) -> str:
    return ", ".join(repr(a) for m in _tagged(tp) for a in get_args(m.model_fields["type"].annotation))


def _bound(limit: float) -> str:
    """A limit as written in the model: ``0`` for a float field's 0.0, ``0.1`` as is."""
    return str(int(limit)) if float(limit).is_integer() else str(limit)


def _lines(exc: ValidationError, root: Any) -> list[tuple[str, str]]:
    """pydantic's errors as (key, reason), in the words check-config has always used."""
    out: list[tuple[str, str]] = []
    for err in exc.errors(include_url=False):
        key, table, last, tp = _walk(root, err["loc"])
        kind, ctx, value = err["type"], err.get("ctx") or {}, err.get("input")
        if kind == PROBLEM:  # "{table}" in a reason: the table holding the key ("deid", "profiles.x")
            holder = key if _is_table(tp) else key.rpartition(".")[0]
            out.extend((key + at, reason.replace("{table}", holder)) for at, reason in ctx["problems"])
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
            reason = f"must be >= {_bound(ctx['ge'])}"
        elif kind == "less_than_equal":
            reason = f"must be <= {_bound(ctx['le'])}"
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
        raise problem("must be >= {table}.date_shift_min_days")
    return days


def _fits_patient_id(length: int, info: ValidationInfo) -> int:
    if len(info.data.get("pseudonym_prefix", "")) + length > 64:
        raise problem("prefix plus length must fit PatientID (64 characters)")
    return length


def _no_rule_choice(choice: str, info: ValidationInfo) -> str:
    if choice == "ocr_clear" and info.data.get("pixel_ocr") is False:
        raise problem("'ocr_clear' needs {table}.pixel_ocr = true")
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


# --------------------------------------------------------------------------- [listener], [storage], [queue]


def _cidr(value: str) -> str:
    try:
        return str(ipaddress.ip_network(value.strip(), strict=True))
    except ValueError as exc:
        raise problem(f"{value!r} is not a CIDR network ({exc})") from None


_LD = ListenerConfig  # the defaults are the dataclass's


class ListenerTlsTable(Table):
    """``[listener.tls]``: DICOM TLS on its own port (PS3.15 B.1, BCP 195)."""

    port: Port
    cert_file: ReadableFile
    key_file: ReadableFile
    ca_file: OptionalFile = None  # peers' certificates are verified against it
    require_client_cert: StrictBool = True

    @model_validator(mode="after")
    def _context(self) -> Self:
        """Load the files into a real context: a bad PEM or a key of another certificate is
        found by check-config, not by the first modality."""
        if self.require_client_cert and self.ca_file is None:
            raise problem("is required while require_client_cert = true", ".ca_file")
        from deid_router.tls import server_context_for

        try:
            server_context_for(self.to_config())
        except TlsError as exc:
            raise problem(exc.reason, f".{exc.key}") from None
        return self

    def to_config(self) -> ListenerTlsConfig:
        return ListenerTlsConfig(**self.fields())


class ListenerTable(Table):
    """``[listener]``, with the network front door (allowed hosts, the plain port on or off,
    ``[listener.tls]``, the bounds on connections before A-ASSOCIATE)."""

    ae_title: AeTitle = _LD.ae_title
    host: StrictStr = _LD.host
    port: Port = _LD.port
    allowed_calling_aets: tuple[AeTitle, ...] = _LD.allowed_calling_aets
    max_associations: Positive = _LD.max_associations
    processes: Count = _LD.processes
    max_pdu_size: Count = _LD.max_pdu_size
    network_timeout_seconds: Seconds = _LD.network_timeout_seconds
    dimse_timeout_seconds: Seconds = _LD.dimse_timeout_seconds
    allowed_hosts: tuple[Annotated[StrictStr, AfterValidator(_cidr)], ...] = _LD.allowed_hosts
    plain: StrictBool = _LD.plain
    tls: ListenerTlsTable | None = None
    artim_timeout_seconds: Seconds = _LD.artim_timeout_seconds
    max_pending_connections: Positive = _LD.max_pending_connections
    max_pending_per_host: Positive = _LD.max_pending_per_host

    @model_validator(mode="after")
    def _something_listens(self) -> Self:
        if not self.plain and self.tls is None:
            raise problem("false needs a [listener.tls] table, or nothing would listen", ".plain")
        if self.tls is not None and self.plain and self.tls.port == self.port and self.port:
            raise problem("must differ from listener.port", ".tls.port")
        return self

    def to_config(self) -> ListenerConfig:
        return ListenerConfig(**self.fields("tls"), tls=self.tls.to_config() if self.tls else None)


class StorageTable(Table):
    """``[storage]``: the holding area, quarantine and the default database live under root."""

    root: WritableDir = Field(default="var", validate_default=True)
    keep_raw_hours: Annotated[StrictFloat, Field(ge=0)] = StorageConfig.keep_raw_hours
    min_free_mb: Count = StorageConfig.min_free_mb  # below this free space, new associations are refused

    def to_config(self) -> StorageConfig:
        return StorageConfig(**self.fields())


def _queue_url(url: str, info: ValidationInfo) -> str:
    url = site(info).queue_url or url  # DEID_ROUTER_QUEUE_URL overrides
    if url and not (url.startswith("sqlite:") or url.startswith("postgresql")):
        raise problem("must be empty (SQLite under storage.root), sqlite:///PATH or postgresql+psycopg://...")
    return url


def _not_below_initial(seconds: float, info: ValidationInfo) -> float:
    if seconds < info.data.get("retry_initial_seconds", seconds):
        raise problem("must be >= queue.retry_initial_seconds")
    return seconds


_QD = QueueConfig  # the defaults are the dataclass's


class QueueTable(Table):
    """``[queue]``: the job database and the workers (url "": SQLite under storage.root)."""

    url: Annotated[StrictStr, AfterValidator(_queue_url)] = Field(default="", validate_default=True)
    max_attempts: Positive = _QD.max_attempts
    retry_initial_seconds: Annotated[StrictFloat, Field(ge=0)] = _QD.retry_initial_seconds
    retry_max_seconds: Annotated[StrictFloat, Field(ge=0), AfterValidator(_not_below_initial)] = Field(
        default=_QD.retry_max_seconds, validate_default=True
    )
    workers: Count = _QD.workers
    lease_seconds: Annotated[StrictFloat, Field(ge=1)] = _QD.lease_seconds
    batch_size: Positive = _QD.batch_size
    poll_seconds: Annotated[StrictFloat, Field(ge=0.01)] = _QD.poll_seconds
    busy_timeout_seconds: Seconds = _QD.busy_timeout_seconds
    worker_nice: Annotated[StrictInt, Field(ge=0, le=19)] = _QD.worker_nice

    def to_config(self, root: Path) -> QueueConfig:
        return QueueConfig(**self.fields("url"), url=self.url or f"sqlite:///{root / 'queue.sqlite3'}")


# --------------------------------------------------------------------------- [[routes]]


def _route_destinations(names: tuple[str, ...], info: ValidationInfo) -> tuple[str, ...]:
    problems = Problems()
    if not names:
        problems.add("must name at least one destination")
    known = site(info).destinations
    for name in names:
        if known is not None and name not in known:
            problems.add(f"names unknown destination {name!r}")
    problems.check()
    return names


def _route_match(match: dict[str, Any]) -> dict[str, Any]:
    """v1 keys, or a top-level text or number attribute (keyword or "(gggg,eeee)"): a glob each."""
    from deid_router.routing import attribute_tag

    problems = Problems()
    for key, glob in match.items():
        if key not in MATCH_KEYS:
            try:
                attribute_tag(key)
            except ValueError as exc:
                reason = str(exc)
                if reason.startswith("unknown key"):
                    reason = f"unknown key (allowed: {', '.join(MATCH_KEYS)}, a DICOM keyword or (gggg,eeee))"
                problems.add(reason, f".{key}")
                continue
        if not isinstance(glob, str):
            problems.add("must be a string (a glob)", f".{key}")
    problems.check()
    return match


def _route_profile(name: str, info: ValidationInfo) -> str:
    known = site(info).profiles
    if name and known is not None and name not in known:
        raise problem(f"names unknown profile {name!r} (defined [profiles.*]: {', '.join(known) or 'none'})")
    return name


class RouteTable(Table):
    """``[[routes]]``: every instance goes to the destinations of every route that matches it."""

    name: StrictStr | None = None  # default: route<index>
    destinations: Annotated[tuple[StrictStr, ...], AfterValidator(_route_destinations)] = Field(
        default=(), validate_default=True
    )
    match: Annotated[dict[str, Any], AfterValidator(_route_match)] = Field(default_factory=dict)
    profile: Annotated[StrictStr, AfterValidator(_route_profile)] = ""  # "": the [deid] table

    def to_config(self, index: int) -> RouteConfig:
        name = self.name if self.name is not None else f"route{index}"
        return RouteConfig(name=name, destinations=self.destinations, match=dict(self.match), profile=self.profile)


# --------------------------------------------------------------------------- [storage_commitment], [audit], [http]


class PeerTable(Table):
    """``[[storage_commitment.peers]]``: where to report when the association is gone."""

    ae_title: AeTitle
    host: StrictStr
    port: Annotated[StrictInt, Field(ge=1, le=65535)]

    def to_config(self) -> CommitmentPeerConfig:
        return CommitmentPeerConfig(**self.fields())


def _commitment(mode: str) -> str:
    if mode not in ("held", "delivered"):
        raise problem("must be 'held' (durably held) or 'delivered' (every destination has it)")
    return mode


_SD = StorageCommitmentConfig  # the defaults are the dataclass's


class StorageCommitmentTable(Table):
    """``[storage_commitment]``: the Storage Commitment Push Model SCP (PS3.4 J)."""

    enabled: StrictBool = _SD.enabled
    commitment: Annotated[StrictStr, AfterValidator(_commitment)] = _SD.commitment
    wait_seconds: Annotated[StrictFloat, Field(ge=0)] = _SD.wait_seconds
    peers: tuple[PeerTable, ...] = ()

    def to_config(self) -> StorageCommitmentConfig:
        return StorageCommitmentConfig(**self.fields("peers"), peers=tuple(p.to_config() for p in self.peers))


def _syslog_url(url: str) -> str:
    if url and not re.match(r"^(udp|tcp|tls)://[^/:]+:\d{1,5}$", url):
        raise problem("must be udp://host:port, tcp://host:port or tls://host:port (or empty: off)")
    return url


class AuditTable(Table):
    """``[audit]``: DICOM audit messages (PS3.15 A.5) to a syslog collector (RFC 5424)."""

    syslog_url: Annotated[StrictStr, AfterValidator(_syslog_url)] = AuditConfig.syslog_url
    ca_file: OptionalFile = None  # tls: the collector's CA
    source_id: StrictStr = AuditConfig.source_id

    def to_config(self) -> AuditConfig:
        return AuditConfig(**self.fields())


class HttpTlsTable(Table):
    """``[http.tls]``: both files or neither."""

    cert_file: OptionalFile = None
    key_file: OptionalFile = None

    @model_validator(mode="after")
    def _pair(self) -> Self:
        if (self.cert_file is None) != (self.key_file is None):
            raise problem("cert_file and key_file go together")
        return self


class HttpTable(Table):
    """``[http]``: console, API, health and metrics (port 0: no HTTP server)."""

    host: StrictStr = HttpConfig.host
    port: Port = HttpConfig.port
    tls: HttpTlsTable | None = None

    def to_config(self) -> HttpConfig:
        tls = self.tls or HttpTlsTable()
        return HttpConfig(host=self.host, port=self.port, cert_file=tls.cert_file, key_file=tls.key_file)


# --------------------------------------------------------------------------- the document


def _unique_names(destinations: tuple[DestinationTable, ...]) -> tuple[DestinationTable, ...]:
    problems = Problems()
    if not destinations:
        problems.add("at least one [[destinations]] is required")
    seen: set[str] = set()
    for i, dest in enumerate(destinations):
        if dest.name in seen:
            problems.add(f"duplicate destination name {dest.name!r}", f"[{i}].name")
        seen.add(dest.name)
    problems.check()
    return destinations


def _some_route(routes: tuple[RouteTable, ...]) -> tuple[RouteTable, ...]:
    if not routes:
        raise problem("at least one [[routes]] is required, or nothing would be forwarded")
    return routes


def _table() -> Any:
    """A section: absent is an empty table, validated like a written one (defaults, paths)."""
    return Field(default_factory=dict, validate_default=True)


class DocumentTable(Table):
    """The whole file. ``destinations`` is typed here by the base of the registered models;
    :func:`_document` makes the model that validates it, with their union by ``type``."""

    listener: ListenerTable = _table()
    storage: StorageTable = _table()
    queue: QueueTable = _table()
    deid: DeidTable = _table()
    destinations: tuple[DestinationTable, ...] = ()
    routes: Annotated[tuple[RouteTable, ...], AfterValidator(_some_route)] = Field(default=(), validate_default=True)
    storage_commitment: StorageCommitmentTable = _table()
    audit: AuditTable = _table()
    http: HttpTable = _table()
    profiles: dict[ProfileName, ProfileTable] = Field(default_factory=dict)

    def to_config(self, file: Path) -> Config:
        deid = self.deid.to_config(self.deid.secret_file)
        return Config(
            path=file,
            listener=self.listener.to_config(),
            storage=self.storage.to_config(),
            queue=self.queue.to_config(self.storage.root),
            deid=deid,
            destinations=tuple(d.to_config() for d in self.destinations),
            routes=tuple(route.to_config(i) for i, route in enumerate(self.routes)),
            http=self.http.to_config(),
            storage_commitment=self.storage_commitment.to_config(),
            audit=self.audit.to_config(),
            profiles=tuple(p.to_profile(name, deid.secret_file) for name, p in self.profiles.items()),
        )


@functools.cache
def _document() -> type[DocumentTable]:
    """The model of the whole file, with ``destinations`` a tuple of the registered types'
    models told apart by ``type`` (registry.py imports this module: hence built on first use)."""
    from deid_router.forward.registry import destination_table

    entries: Any = Annotated[tuple[destination_table(), ...], AfterValidator(_unique_names)]  # type: ignore[misc]
    return create_model(
        "Document", __base__=DocumentTable, destinations=(entries, Field(default=(), validate_default=True))
    )


def _site(raw: dict[str, Any], base: Path) -> Site:
    """The validation context: the names routes may refer to, as written."""
    dests = raw.get("destinations")
    names = tuple(
        d["name"] for d in (dests if isinstance(dests, list) else [])
        if isinstance(d, dict) and isinstance(d.get("name"), str)
    )
    profiles = raw.get("profiles")
    return Site(
        base, destinations=names, profiles=tuple(profiles) if isinstance(profiles, dict) else (),
        queue_url=os.environ.get(ENV_QUEUE_URL, ""),
    )


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
    """Validate an already-parsed TOML document (relative paths against ``file``'s folder)."""
    document = _document()
    try:
        table = document.model_validate(raw, context=_site(raw, file.parent))
    except ValidationError as exc:
        raise ConfigError([(str(file), key, reason) for key, reason in _lines(exc, document)]) from None
    return table.to_config(file)
