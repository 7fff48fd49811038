"""Opening what must already exist: the queue database for commands, the secret for everyone.

Commands that read or act on a node's state (``status``, ``quarantine``, ``retry``,
``crosswalk``, ``jobs``, ``resend``) never create a database, a secret or a folder: a
mistyped ``--config`` would otherwise report a fresh, empty node as healthy (and mint a new
secret). They open the database only when it exists and its schema is current.

The secret's fingerprint (a keyed hash, ``Keys.fingerprint``) is stored in the database at
first start. ``serve`` creates a missing secret only while the database holds nothing keyed by
a secret; anything else that does not match refuses, naming the secret file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from sqlalchemy import Engine, inspect
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from deid_router.db.engine import make_engine, migrations_dir
from deid_router.deid.keys import Keys
from deid_router.errors import ConfigError, MissingDatabaseError, QueueError, SecretMismatchError

__all__ = ["database_label", "keys_for_reading", "keys_for_serve", "open_existing", "probe_database"]


class KeyedData(Protocol):
    """What the secret check reads and records (``db.crosswalk_rows.CrosswalkRows``, which the
    job repository inherits; the offline tool holds it alone)."""

    def secret_fingerprint(self) -> str | None: ...

    def record_secret_fingerprint(self, fingerprint: str) -> str: ...

    def holds_keyed_data(self) -> bool: ...

    def first_crosswalk_original(self) -> bytes | None: ...


_FIX = "check --config (storage.root, queue.url); the node creates its database when `deid-router serve` first starts"


def sqlite_path(url: str) -> Path | None:
    """The file of a SQLite url (None for PostgreSQL or an in-memory database)."""
    try:
        parsed = make_url(url)
    except Exception:  # noqa: BLE001 - make_engine reports a bad url
        return None
    if parsed.get_backend_name() != "sqlite":
        return None
    db = parsed.database
    if not db or db == ":memory:" or db.startswith("file:"):
        return None
    return Path(db).expanduser()


def database_label(url: str) -> str:
    """How messages name the database: its file, or its url without the password."""
    path = sqlite_path(url)
    if path is not None:
        return str(path)
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001
        return "the configured queue.url"


def _head_revisions() -> set[str]:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    return set(ScriptDirectory.from_config(cfg).get_heads())


def _current_revisions(engine: Engine) -> set[str] | None:
    """The database's Alembic revisions; None when it has no deid-router schema."""
    from alembic.migration import MigrationContext

    with engine.connect() as conn:
        if not inspect(conn).has_table("alembic_version"):
            return None
        return set(MigrationContext.configure(conn).get_current_heads())


def probe_database(url: str, busy_timeout_ms: int = 30000) -> bool | None:
    """True when a deid-router database exists at ``url``, False when not, None if unreachable.

    Creates nothing (a SQLite file is only opened when it exists).
    """
    path = sqlite_path(url)
    if path is not None and not path.is_file():
        return False
    try:
        engine = make_engine(url, busy_timeout_ms=busy_timeout_ms)
    except QueueError:
        return None
    try:
        return _current_revisions(engine) is not None
    except DBAPIError:
        return None
    finally:
        engine.dispose()


def open_existing(url: str, busy_timeout_ms: int = 30000) -> Engine:
    """An engine on the existing, current database at ``url``; MissingDatabaseError otherwise."""
    label = database_label(url)
    path = sqlite_path(url)
    if path is not None and not path.is_file():
        raise MissingDatabaseError(f"no queue database at {label}: {_FIX}")
    engine = make_engine(url, busy_timeout_ms=busy_timeout_ms)
    try:
        current = _current_revisions(engine)
    except DBAPIError as exc:
        engine.dispose()
        raise QueueError(f"cannot reach the queue database {label}") from exc
    if current is None:
        engine.dispose()
        raise MissingDatabaseError(f"{label} holds no deid-router queue database: {_FIX}")
    if not _head_revisions() <= current:
        engine.dispose()
        raise MissingDatabaseError(
            f"the queue database {label} has an older schema than this version of deid-router: "
            "start `deid-router serve` once (it applies the migrations; see docs/operations.md, upgrades)"
        )
    return engine


def _mismatch(secret_file: Path, label: str) -> ConfigError:
    return ConfigError([(
        str(secret_file), "deid.secret_file",
        f"is not the secret the queue database {label} was first started with (its fingerprint differs): "
        "restore the right secret file from backup, or point queue.url at this secret's database",
    )])


def keys_for_serve(repo: KeyedData, secret_file: Path, label: str) -> Keys:
    """The node's keys, checked against (or recorded as) the database's fingerprint.

    A missing secret file is created only while the database holds nothing keyed by a secret
    and no fingerprint; otherwise the secret was lost or mistyped and a new one would change
    every pseudonym: ConfigError (exit 2).
    """
    recorded = repo.secret_fingerprint()
    if not Path(secret_file).exists():
        if recorded is not None or repo.holds_keyed_data():
            raise ConfigError([(
                str(secret_file), "deid.secret_file",
                f"does not exist, but the queue database {label} holds data keyed by a secret: restore the "
                "secret file from backup (a new secret would give every patient new pseudonyms)",
            )])
        keys = Keys.load_or_create(secret_file)
    else:
        keys = Keys.load(secret_file)
    if recorded is None:
        _check_against_crosswalk(repo, keys, secret_file, label)  # a database from before fingerprints
    if repo.record_secret_fingerprint(keys.fingerprint()) != keys.fingerprint():
        raise _mismatch(secret_file, label)
    return keys


def _check_against_crosswalk(repo: KeyedData, keys: Keys, secret_file: Path, label: str) -> None:
    """Without a recorded fingerprint, one crosswalk entry tells whether the secret is the one
    the data was written with (so a wrong secret is not recorded as the right one)."""
    blob = repo.first_crosswalk_original()
    if blob is None:
        return
    try:
        keys.decrypt(blob)
    except SecretMismatchError:
        raise _mismatch(secret_file, label) from None


def keys_for_reading(repo: KeyedData, secret_file: Path, label: str) -> Keys:
    """The keys for a command that decrypts or derives (crosswalk): never creates the secret."""
    keys = Keys.load(secret_file)
    recorded = repo.secret_fingerprint()
    if recorded is not None and recorded != keys.fingerprint():
        raise _mismatch(secret_file, label)
    return keys
