"""Shared test helpers for the de-identification engine."""

from __future__ import annotations

from pathlib import Path

from deid_router.config import DeidConfig, DeidRule
from deid_router.deid.engine import Deidentifier
from deid_router.deid.keys import Keys

SECRET = bytes(range(32))


def make(options: tuple[str, ...] = (), secret: bytes = SECRET, rules: tuple[DeidRule, ...] = (),
         **kw: object) -> Deidentifier:
    cfg = DeidConfig(secret_file=Path("/nonexistent/secret.key"), options=options, rules=rules, **kw)  # type: ignore[arg-type]
    return Deidentifier(cfg, Keys(secret))
