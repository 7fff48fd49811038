"""Which destinations an instance goes to: every destination of every matching route, each with
the route's de-identification profile.

A route matches on the v1 keys (AE titles, modality, SOP class) and on any top-level attribute
named by keyword or ``(gggg,eeee)``. The attribute values come from the header walk the
listener runs before it acknowledges (:mod:`deid_router.scp.integrity`): the walk captures
exactly the tags :meth:`Router.captured_tags` names, so routing costs no extra read. Values are
only compared here, never logged.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from fnmatch import fnmatchcase

from deid_router.config import RouteConfig

_TAG_RE = re.compile(r"^\(([0-9A-Fa-f]{4}),([0-9A-Fa-f]{4})\)$")
# VRs whose values the walk can turn into text for a glob; the others (bulk data, sequences)
# are refused by the configuration.
TEXT_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI",
                      "UR", "UT"})
NUMBER_VRS = frozenset({"US", "SS", "UL", "SL", "FL", "FD", "SV", "UV", "AT"})
ROUTABLE_VRS = TEXT_VRS | NUMBER_VRS


@dataclass(frozen=True)
class RoutingFacts:
    """What routes may match on: the v1 keys (not PHI) and the captured attribute values
    (tag -> its values as text; may be PHI, so never logged)."""

    calling_aet: str
    called_aet: str
    modality: str
    sop_class_uid: str
    attributes: Mapping[int, tuple[str, ...]] = field(default_factory=dict)


# The v1 keys are the fields of RoutingFacts (config.MATCH_KEYS names the same: a test ties them).
V1_KEYS: tuple[str, ...] = tuple(f.name for f in fields(RoutingFacts) if f.name != "attributes")


def attribute_tag(key: str) -> int:
    """The tag a non-v1 match key names; ValueError with a fixed reason when it cannot route."""
    from pydicom.datadict import dictionary_VR, tag_for_keyword

    m = _TAG_RE.match(key)
    if m:
        tag = int(m.group(1), 16) << 16 | int(m.group(2), 16)
    else:
        found = tag_for_keyword(key)
        if found is None:
            raise ValueError("unknown key: neither a v1 key, a DICOM keyword nor (gggg,eeee)")
        tag = int(found)
    group = tag >> 16
    if group == 0x0002 or group == 0xFFFE or tag & 0xFFFF == 0:
        raise ValueError("file meta, delimiters and group lengths cannot be routed on")
    if group & 1:
        return tag  # private: its VR is whatever the sender wrote
    try:
        vr = dictionary_VR(tag)
    except KeyError:
        return tag  # an unknown public tag: routed on its text
    if not set(vr.split(" or ")) & ROUTABLE_VRS:
        raise ValueError(f"has VR {vr}: only text and number attributes can be routed on")
    return tag


@dataclass(frozen=True)
class _Route:
    config: RouteConfig
    v1: tuple[tuple[str, str], ...]
    attributes: tuple[tuple[int, str], ...]  # (tag, lower-cased glob)

    def matches(self, facts: RoutingFacts) -> bool:
        if not all(fnmatchcase(getattr(facts, key), pattern) for key, pattern in self.v1):
            return False
        for tag, pattern in self.attributes:
            values = facts.attributes.get(tag) or ("",)
            if not any(fnmatchcase(v.lower(), pattern) for v in values):
                return False
        return True


class Router:
    def __init__(self, routes: tuple[RouteConfig, ...]) -> None:
        self._routes = tuple(
            _Route(
                r,
                tuple((k, v) for k, v in r.match.items() if k in V1_KEYS),
                tuple((attribute_tag(k), v.lower()) for k, v in r.match.items() if k not in V1_KEYS),
            )
            for r in routes
        )

    def captured_tags(self) -> frozenset[int]:
        """The top-level attributes the header walk must capture for these routes."""
        return frozenset(tag for r in self._routes for tag, _ in r.attributes)

    def targets_for(self, facts: RoutingFacts) -> list[tuple[str, str]]:
        """(destination, profile) pairs in config order, each once; profile "" is [deid]."""
        out: list[tuple[str, str]] = []
        for route in self._routes:
            if route.matches(facts):
                for name in route.config.destinations:
                    target = (name, route.config.profile)
                    if target not in out:
                        out.append(target)
        return out

    def destinations_for(self, facts: RoutingFacts) -> list[str]:
        """Destination names in config order, each once."""
        return list(dict.fromkeys(name for name, _ in self.targets_for(facts)))
