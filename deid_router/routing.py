"""Which destinations an instance goes to: every destination of every matching route."""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase

from deid_router.config import RouteConfig


@dataclass(frozen=True)
class RoutingFacts:
    """What routes may match on. None of these is PHI (AE titles, modality, SOP class)."""

    calling_aet: str
    called_aet: str
    modality: str
    sop_class_uid: str


class Router:
    def __init__(self, routes: tuple[RouteConfig, ...]) -> None:
        self._routes = routes

    def destinations_for(self, facts: RoutingFacts) -> list[str]:
        """Destination names in config order, each once."""
        out: list[str] = []
        for route in self._routes:
            if all(fnmatchcase(getattr(facts, key), pattern) for key, pattern in route.match.items()):
                for name in route.destinations:
                    if name not in out:
                        out.append(name)
        return out
