"""Batches of ids for ``IN (...)`` lists: SQLite allows a bounded number of variables per
statement, so long lists are sent in chunks well under that limit."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TypeVar

IN_CHUNK = 500  # keep IN (...) lists well under SQLite's variable limit

T = TypeVar("T")


def chunks(items: Sequence[T]) -> Iterator[Sequence[T]]:
    """``items`` in consecutive slices of at most :data:`IN_CHUNK`."""
    for i in range(0, len(items), IN_CHUNK):
        yield items[i : i + IN_CHUNK]
