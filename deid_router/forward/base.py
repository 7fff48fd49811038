"""What a forwarder is: a destination that turns a batch of de-identified files into outcomes.

The job layer hands over :class:`Delivery` items and receives one :class:`Outcome` per job
id. Destinations never raise for per-item or association problems: the outcome is the
answer, so one bad instance or one unreachable PACS can never crash a worker.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from deid_router.config import DestinationConfig
from deid_router.jobs.outcome import Outcome
from deid_router.store.layout import is_uid


def is_valid_uid(value: str) -> bool:
    """True when ``value`` is safe to use as a path component (the layout module decides)."""
    return is_uid(value)


@dataclass(frozen=True)
class Delivery:
    """One de-identified Part-10 file to deliver for one job (UIDs are output UIDs)."""

    job_id: int
    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str


class Destination(Protocol):
    """A place de-identified instances go to (a PACS, a folder)."""

    name: str

    def send(self, items: Sequence[Delivery]) -> dict[int, Outcome]:
        """Deliver ``items``; return an outcome for every job id, never raise for delivery problems."""
        ...

    def close(self) -> None:
        """Release connections and other resources; safe to call twice."""
        ...


def build_destination(cfg: DestinationConfig, calling_ae_title: str) -> Destination:
    """Build the destination described by ``cfg`` (``calling_ae_title``: the listener's AE title)."""
    from deid_router.forward.registry import handler_for

    try:
        handler = handler_for(cfg.type)
    except ValueError:
        raise ValueError(f"unknown destination type {cfg.type!r} for destination {cfg.name!r}") from None
    return handler.build(cfg, calling_ae_title)
