"""assert_transition follows the table: every edge of it passes, every other move raises.

That the table itself is right (each edge reachable through the repository, no other edge
ever written) is tested by driving the repository: tests/integration/queue/test_queue_transitions.py.
"""

from __future__ import annotations

import itertools

import pytest

from deid_router.errors import QueueError
from deid_router.jobs.states import ALL_STATES, TRANSITIONS, IllegalTransitionError, JobState, allowed, assert_transition

RUN = JobState.RUNNING
LEGAL = {(src, dst) for src, targets in TRANSITIONS.items() for dst in targets}


@pytest.mark.parametrize("src,dst", list(itertools.product([None, *ALL_STATES], ALL_STATES)))
def test_assert_transition_follows_the_table(src: JobState | None, dst: JobState) -> None:
    if (src, dst) in LEGAL:
        assert assert_transition(src, dst) is dst
        assert allowed(src, dst)
    else:
        assert not allowed(src, dst)
        with pytest.raises(IllegalTransitionError) as info:
            assert_transition(src, dst)
        assert isinstance(info.value, QueueError)


def test_done_is_final_and_strings_are_accepted() -> None:
    for dst in ALL_STATES:
        assert not allowed("done", dst)
    assert assert_transition("queued", "running") is RUN
    with pytest.raises(QueueError):
        assert_transition("queued", "bogus")
