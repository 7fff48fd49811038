"""The crosswalk kept in the database: pseudonym <-> original, originals encrypted at rest.

Pseudonyms themselves are keyed derivations (deterministic), so every worker and node computes
the same one; the table only records them for authorised re-identification. Recording is
idempotent (unique on kind + keyed token), so concurrent first sightings yield one row.
Every lookup and export is written to the audit table.
"""

from __future__ import annotations

import csv
from typing import TextIO

from deid_router.db.repository import JobRepository
from deid_router.config import DEFAULT_SCOPE
from deid_router.deid.crosswalk import crosswalk_token
from deid_router.deid.keys import Keys


class DbCrosswalk:
    """Implements ``deid_router.deid.crosswalk.Crosswalk`` on the job database."""

    def __init__(
        self, repo: JobRepository, keys: Keys, scope: str = DEFAULT_SCOPE
    ) -> None:
        self._repo = repo
        self._keys = keys  # the scope's keys (Keys.for_scope)
        self._scope = scope
        self._seen: set[tuple[str, str]] = set()

    def record(self, kind: str, original: str, pseudonym: str) -> None:
        token = crosswalk_token(self._keys, kind, original)
        if (kind, token) in self._seen:
            return
        self._repo.crosswalk_record(kind, token, pseudonym, self._keys.encrypt(original), self._scope)
        self._seen.add((kind, token))


def _split_issuer(original: str) -> tuple[str, str]:
    """The engine keys patients by issuer and ID joined with NUL; show them apart."""
    issuer, sep, value = original.partition("\0")
    return (value, issuer) if sep else (original, "")


def lookup_pseudonym(
    repo: JobRepository, keys: Keys, pseudonym: str, actor: str, scope: str = DEFAULT_SCOPE
) -> list[tuple[str, str]]:
    """Originals behind a pseudonym of ``scope`` (``keys``: the node's keys), for the data
    custodian; audited whether found or not."""
    keys = keys.for_scope(scope)
    rows = []
    for kind, blob in repo.crosswalk_lookup(pseudonym, scope):
        value, issuer = _split_issuer(keys.decrypt(blob))
        rows.append((kind, f"{value} (issuer {issuer})" if issuer else value))
    repo.audit("crosswalk_lookup", actor, f"found={len(rows)}" + _scope_detail(scope))
    return rows


def _scope_detail(scope: str) -> str:
    return "" if scope == DEFAULT_SCOPE else f" scope={scope}"


def export_crosswalk(repo: JobRepository, keys: Keys, out: TextIO, actor: str, scope: str = DEFAULT_SCOPE) -> int:
    """Write kind,pseudonym,original,issuer CSV rows of ``scope``; audited with the row count."""
    keys = keys.for_scope(scope)
    writer = csv.writer(out)
    writer.writerow(["kind", "pseudonym", "original", "issuer"])
    n = 0
    for kind, pseudonym, blob in repo.crosswalk_all(scope):
        writer.writerow([kind, pseudonym, *_split_issuer(keys.decrypt(blob))])
        n += 1
    repo.audit("crosswalk_export", actor, f"rows={n}" + _scope_detail(scope))
    return n
