"""The job lifecycle table: every legal move passes, every other move raises."""

from __future__ import annotations

import itertools

import pytest

from deid_router.errors import QueueError
from deid_router.jobs.states import ALL_STATES, IllegalTransitionError, JobState, allowed, assert_transition

Q, RUN, RETRY, DONE, FAIL = (JobState.QUEUED, JobState.RUNNING, JobState.RETRYING, JobState.DONE, JobState.FAILED)
LEGAL = {
    (None, Q), (None, FAIL),
    (Q, RUN), (RETRY, RUN),
    (RUN, DONE), (RUN, RETRY), (RUN, FAIL), (RUN, Q),
    (FAIL, Q), (RETRY, Q), (RETRY, FAIL),
}


@pytest.mark.parametrize("src,dst", list(itertools.product([None, *ALL_STATES], ALL_STATES)))
def test_table_is_exactly_the_design(src: JobState | None, dst: JobState) -> None:
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
