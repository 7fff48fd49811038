"""What a claim costs the database: on PostgreSQL one statement (one round trip) for the
whole claim, history included; on SQLite an idle poll is one read that never takes the
write lock the listener needs for every acknowledged instance."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from sqlalchemy import Engine, event

from deid_router.db.operations import DestinationStates
from deid_router.db.repository import JobRepository, NewInstance

Factory = Callable[..., NewInstance]
_TRANSACTION_CONTROL = ("BEGIN", "COMMIT", "ROLLBACK")


@contextmanager
def statements(engine: Engine) -> Iterator[list[str]]:
    """Every statement sent through ``engine`` inside the block (an executemany counts once)."""
    sent: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        sent.append(statement)

    event.listen(engine, "before_cursor_execute", record)
    try:
        yield sent
    finally:
        event.remove(engine, "before_cursor_execute", record)


def _work(sent: list[str]) -> list[str]:
    return [s for s in sent if s.strip().upper() not in _TRANSACTION_CONTROL]


@pytest.mark.postgres
@pytest.mark.parametrize("backend_url", ["postgres"], indirect=True)  # SQLite: BEGIN IMMEDIATE, see below
@pytest.mark.parametrize(
    ("destination", "exclude"),
    [(None, ()), ("pacs", ()), (None, ("outbox",)), ("pacs", ("outbox",))],
    ids=["any", "destination", "excluding", "destination-excluding"],
)
def test_a_postgres_claim_is_one_statement(
    repo: JobRepository, engine: Engine, instance_factory: Factory, destination: str | None, exclude: tuple[str, ...]
) -> None:
    assert engine.dialect.name == "postgresql"
    ids = [repo.enqueue(instance_factory(), ["pacs", "outbox", "paused"]).job_ids for _ in range(3)]
    DestinationStates(engine).set_paused("paused", True, "operator")

    with statements(engine) as sent:
        got = repo.claim("w1", 30, 2, destination=destination, exclude_destinations=exclude)
    assert len(_work(sent)) == 1, _work(sent)
    # ...and it is the whole claim: oldest first, within the limit, filters and pause applied,
    # attempt counted, lease taken, history written.
    filtered = destination is not None or bool(exclude)  # only pacs may be taken
    assert [g.job_id for g in got] == ([ids[0][0], ids[1][0]] if filtered else [ids[0][0], ids[0][1]])
    assert [g.destination for g in got] == (["pacs", "pacs"] if filtered else ["pacs", "outbox"])
    assert all(g.attempts == 1 and g.raw_path.startswith("raw/") for g in got)
    for g in got:
        assert [(e.from_state, e.to_state, e.attempt, e.reason) for e in repo.job_events(g.job_id)] == [
            (None, "queued", 0, "received"), ("queued", "running", 1, "claimed")]
    assert repo.heartbeat("w1", [g.job_id for g in got], 30) == len(got)  # the lease is w1's

    with statements(engine) as sent:
        assert repo.claim("w1", 30, 10, destination="paused") == []
    assert len(_work(sent)) == 1, _work(sent)


def test_an_idle_claim_is_one_read(repo: JobRepository, engine: Engine, instance_factory: Factory) -> None:
    repo.enqueue(instance_factory(), ["pacs"])
    with statements(engine) as sent:
        assert repo.claim("w1", 30, 10, destination="outbox") == []
    assert len(_work(sent)) == 1, _work(sent)
    assert not any("IMMEDIATE" in s.upper() for s in sent)  # SQLite: the write lock was not taken
