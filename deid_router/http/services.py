"""What the HTTP side needs from the node, built once and passed to every route."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from deid_router.config import Config
from deid_router.db.operations import DestinationStates, Reports, UserStore
from deid_router.db.repository import JobRepository
from deid_router.deid.crosswalk import NullCrosswalk
from deid_router.deid.engine import Deidentifier
from deid_router.deid.keys import Keys
from deid_router.http.actions import Actions
from deid_router.http.auth import Authenticator
from deid_router.http.health import Readiness
from deid_router.observability.audit_messages import Auditor
from deid_router.observability.metrics import QueueCollector, registry_for
from deid_router.store.holding import Holding

from prometheus_client import CollectorRegistry
from prometheus_client.registry import Collector


@dataclass
class Services:
    config: Config
    repo: JobRepository
    reports: Reports
    states: DestinationStates
    users: UserStore
    holding: Holding
    auth: Authenticator
    actions: Actions
    readiness: Readiness
    metrics: CollectorRegistry
    session_secret: str
    keys: Keys

    def deidentifier(self) -> Deidentifier:
        """The real engine, recording nothing in the crosswalk (for the dry-run page)."""
        return Deidentifier(self.config.deid, self.keys, NullCrosswalk())

    @property
    def destinations(self) -> tuple[str, ...]:
        return tuple(d.name for d in self.config.destinations)


def build_services(
    config: Config, repo: JobRepository, holding: Holding, keys: Keys, listener_up: Callable[[], bool],
    auditor: Auditor | None = None, children: Collector | None = None,
) -> Services:
    """``children``: the node's process metrics (latency histograms, refusals) for ``/metrics``."""
    session_secret = keys.token("http_session", "v1")
    engine = repo.engine
    reports = Reports(engine, repo)
    states = DestinationStates(engine)
    users = UserStore(engine)
    names = tuple(d.name for d in config.destinations)
    return Services(
        config=config,
        repo=repo,
        reports=reports,
        states=states,
        users=users,
        holding=holding,
        auth=Authenticator(users, session_secret.encode()),
        actions=Actions(repo, reports, states, holding, names, auditor, config, keys),
        readiness=Readiness(reports, config.queue.url, listener_up, holding.free_bytes,
                            config.storage.min_free_mb * 1024 * 1024),
        metrics=registry_for(QueueCollector(reports, holding.free_bytes, names), children),
        session_secret=session_secret,
        keys=keys,
    )
