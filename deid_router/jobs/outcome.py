"""What happened to one attempt at a job: the vocabulary shared by forwarders and the decider.

Forwarders (and the de-identification step) produce an :class:`Outcome`; ``jobs.policy``
alone turns it into the job's next state.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from deid_router.forward.status import FailureKind


class OutcomeKind(str, Enum):
    DELIVERED = "delivered"
    DELIVERED_WARNING = "delivered_warning"
    RETRY = "retry"  # transient for this instance: try again after a backoff (costs an attempt)
    UNAVAILABLE = "unavailable"  # the destination as a whole is down or refuses us: the instance
    # was not tried, so no attempt is spent; the destination is paused and probed with backoff
    PERMANENT = "permanent"  # retrying cannot help: fail and quarantine now
    QUARANTINE = "quarantine"  # de-identification refused the instance: never send it


@dataclass(frozen=True)
class Outcome:
    kind: OutcomeKind
    status_code: int | None = None  # DIMSE status when there was one
    reason: str = ""  # short, PHI-free (a code or fixed text; never a tag value)
    failure: FailureKind | None = None  # set by forward.status for failures (its FAILURE_RULES row)

    @property
    def delivered(self) -> bool:
        return self.kind in (OutcomeKind.DELIVERED, OutcomeKind.DELIVERED_WARNING)
