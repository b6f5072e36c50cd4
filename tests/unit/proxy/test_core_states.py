"""The proxy core's branch and context tables: what each state allows."""

from __future__ import annotations

from e911_sip.proxy.core import (
    BRANCH_TRANSITIONS,
    CONTEXT_TRANSITIONS,
    BranchEvent,
    BranchState,
    ContextEvent,
    ContextState,
)

LIVE = [s for s in BranchState if s is not BranchState.DONE]


def test_every_live_branch_ends_on_a_final_response_a_timeout_or_a_transport_error() -> None:
    for state in LIVE:
        for event in (BranchEvent.SUCCESS, BranchEvent.FAILURE, BranchEvent.FAILED):
            assert BRANCH_TRANSITIONS[(state, event)] is BranchState.DONE, (state, event)


def test_a_done_branch_takes_only_2xx_retransmissions() -> None:
    from_done = {e for (s, e) in BRANCH_TRANSITIONS if s is BranchState.DONE}
    assert from_done == {BranchEvent.SUCCESS}
    assert BRANCH_TRANSITIONS[(BranchState.DONE, BranchEvent.SUCCESS)] is BranchState.DONE


def test_a_cancel_before_any_provisional_waits_for_one() -> None:
    # RFC 3261 §9.1: no CANCEL until a provisional arrived; then it goes at once.
    assert BRANCH_TRANSITIONS[(BranchState.CALLING, BranchEvent.CANCEL)] is (
        BranchState.CANCEL_PENDING
    )
    assert BRANCH_TRANSITIONS[(BranchState.CANCEL_PENDING, BranchEvent.PROVISIONAL)] is (
        BranchState.CANCELLING
    )
    assert BRANCH_TRANSITIONS[(BranchState.ABANDONED, BranchEvent.PROVISIONAL)] is (
        BranchState.ABANDONED_CANCELLING
    )


def test_timer_c_cancels_a_ringing_branch_and_gives_up_on_a_cancelled_one() -> None:
    assert BRANCH_TRANSITIONS[(BranchState.PROCEEDING, BranchEvent.TIMER_C)] is (
        BranchState.CANCELLING
    )
    for state in (BranchState.CANCELLING, BranchState.ABANDONED_CANCELLING):
        assert BRANCH_TRANSITIONS[(state, BranchEvent.TIMER_C)] is BranchState.DONE
    for state in (BranchState.CALLING, BranchState.CANCEL_PENDING, BranchState.ABANDONED):
        assert (state, BranchEvent.TIMER_C) not in BRANCH_TRANSITIONS  # no provisional yet


def test_only_a_silent_branch_is_abandoned() -> None:
    sources = {s for (s, e) in BRANCH_TRANSITIONS if e is BranchEvent.NO_PROVISIONAL}
    assert sources == {BranchState.CALLING, BranchState.CANCEL_PENDING}


def test_a_finished_context_takes_nothing_more() -> None:
    assert not [key for key in CONTEXT_TRANSITIONS if key[0] is ContextState.FINISHED]
    for state in (ContextState.PROXYING, ContextState.AWAITING_OWNER, ContextState.CANCELLED):
        assert CONTEXT_TRANSITIONS[(state, ContextEvent.FINAL)] is ContextState.FINISHED
        assert CONTEXT_TRANSITIONS[(state, ContextEvent.SERVER_GONE)] is ContextState.FINISHED


def test_only_a_waiting_emergency_call_resumes_and_a_cancel_counts_once() -> None:
    resumes = {s for (s, e) in CONTEXT_TRANSITIONS if e is ContextEvent.RESUME}
    assert resumes == {ContextState.AWAITING_OWNER}
    assert (ContextState.CANCELLED, ContextEvent.CANCEL) not in CONTEXT_TRANSITIONS


def test_step_indexes_match_the_tables() -> None:
    # The per-state indexes the steps read hold exactly the pairs of the tables.
    from e911_sip.proxy import core

    assert {
        (state, event): nxt
        for state, events in core._BRANCH_NEXT.items()
        for event, nxt in events.items()
    } == BRANCH_TRANSITIONS
    assert {
        (state, event): nxt
        for state, events in core._CONTEXT_NEXT.items()
        for event, nxt in events.items()
    } == CONTEXT_TRANSITIONS
