"""Finished transactions: what the core keeps of them, and how overload control counts them.

Over UDP a transaction lingers up to 32 s after its final response to absorb
retransmissions. That state is memory, not work: it holds no parsed request, and the
shedding threshold does not count it.
"""

from __future__ import annotations

import gc
import types

import pytest

from e911_sip.proxy.core import _FRONT_STEP, Evicted, ProxyCore, RequestRouted, Route, Shed
from e911_sip.sip.message import Request, Response
from tests.unit.proxy.test_admission import make_core, plain_invite
from tests.unit.proxy.test_core import (
    DEFAULT,
    SOFTSWITCH,
    TRUNK1,
    Harness,
    invite,
    only,
    response_to,
    start_emergency,
    to,
)

pytestmark = pytest.mark.usefixtures("core_paths")


def finished_message(h: Harness, n: int) -> None:
    """A MESSAGE the default trunk answers 200: two transactions, both finished (UDP)."""
    out = h.feed(plain_invite(n).replace(b"INVITE", b"MESSAGE"))
    raw = [o.data for o in out if o.peer.host == DEFAULT.host][0]
    reply = only(SOFTSWITCH, h.feed(response_to(raw, 200, "OK"), DEFAULT))
    assert isinstance(reply, Response) and reply.status == 200


def working_invite(h: Harness, n: int) -> None:
    """An INVITE ringing at the default trunk: two transactions, both working."""
    out = h.feed(plain_invite(n))
    raw = [o.data for o in out if o.peer.host == DEFAULT.host][0]
    h.feed(response_to(raw, 180, "Ringing"), DEFAULT)


def test_finished_transactions_do_not_shed_a_new_call() -> None:
    h = make_core(max_transactions=100, shed_transactions=4)
    for n in range(3):
        finished_message(h, n)
    assert h.core.transactions_in_flight == 6
    assert h.core.transactions_working == 0
    h.feed(plain_invite(10))
    assert not h.event(Shed)
    assert h.event(RequestRouted)[-1] == RequestRouted("INVITE", Route.DEFAULT)
    assert h.core.transactions_working == 2


def test_working_transactions_still_shed_beside_finished_ones() -> None:
    h = make_core(max_transactions=100, shed_transactions=4)
    finished_message(h, 0)
    working_invite(h, 1)
    assert h.core.transactions_working == 2
    h.feed(plain_invite(2))  # 4 working now
    assert not h.event(Shed)
    h.feed(plain_invite(3))
    assert [(e.reason, e.method) for e in h.event(Shed)] == [("transactions", "INVITE")]
    h.feed(invite())  # an emergency INVITE is never shed
    assert h.event(RequestRouted)[-1] == RequestRouted("INVITE", Route.EMERGENCY)


def test_transactions_leave_the_count_as_their_timers_end() -> None:
    h = make_core(max_transactions=100, shed_transactions=4)
    finished_message(h, 0)
    working_invite(h, 1)
    assert (h.core.transactions_in_flight, h.core.transactions_working) == (4, 2)
    h.advance(40.0)  # Timers J and K end the MESSAGE; the INVITE still rings (Timer C)
    assert (h.core.transactions_in_flight, h.core.transactions_working) == (2, 2)


def test_at_the_bound_finished_transactions_are_evicted_before_working_ones() -> None:
    h = make_core(max_transactions=16)
    for n in range(3):
        working_invite(h, n)  # the oldest state, still working
    for n in range(10, 15):
        finished_message(h, n)
    assert (h.core.transactions_in_flight, h.core.transactions_working) == (16, 6)
    # A new call takes the place of the oldest finished transactions instead of a 503.
    out = h.feed(plain_invite(50))
    assert not h.event(Shed)
    assert h.event(Evicted) == [Evicted(4, 0)]  # the two oldest finished MESSAGEs
    assert h.event(RequestRouted)[-1] == RequestRouted("INVITE", Route.DEFAULT)
    assert h.core.transactions_working == 8  # the ringing calls and the new one
    # The working calls were left alone: no 503 to their callers, no CANCEL to the trunk.
    assert not [m for m in to(SOFTSWITCH, out) if isinstance(m, Response) and m.status == 503]
    assert [m.method for m in to(DEFAULT, out) if isinstance(m, Request)] == ["INVITE"]
    h.collect()
    # So does an emergency call.
    finished_message(h, 20)
    assert h.core.transactions_in_flight == 16
    h.feed(invite())
    assert h.event(Evicted)[-1] == Evicted(4, 0)
    assert h.core.transactions_working == 9  # its server transaction; the branch follows
    call = h.emergency()
    h.core.forward_emergency(call.call, call.request, h.now)
    assert isinstance(only(TRUNK1, h.collect()), Request)


def test_at_the_bound_with_nothing_finished_a_new_call_is_refused() -> None:
    h = make_core(max_transactions=8)
    for n in range(4):
        working_invite(h, n)
    assert (h.core.transactions_in_flight, h.core.transactions_working) == (8, 8)
    h.feed(plain_invite(50))
    assert [e.reason for e in h.event(Shed)] == ["transactions_full"]
    assert not h.event(Evicted)


def test_working_emergency_state_is_never_evicted_for_another_emergency_call() -> None:
    h = make_core(max_transactions=16)

    def emergency_call(name: str) -> None:
        h.feed(invite(branch=f"z9hG4bK911-{name}", call_id=f"e-{name}"))
        call = h.emergency()
        assert call.call_id == f"e-{name}"
        h.core.forward_emergency(call.call, call.request, h.now)
        h.collect()

    for n in range(6):
        emergency_call(str(n))
    for n in range(10, 12):
        finished_message(h, n)
    assert (h.core.transactions_in_flight, h.core.transactions_working) == (16, 12)
    emergency_call("a")
    assert h.event(Evicted) == [Evicted(4, 0)]  # every finished one
    emergency_call("b")  # only working emergency state is left: over the bound
    assert h.event(Evicted) == [Evicted(4, 0)]
    assert h.core.transactions_in_flight == h.core.transactions_working == 16


def _reachable(core: ProxyCore) -> list[object]:
    """Everything the core holds, short of code and modules."""
    seen: set[int] = set()
    found: list[object] = []
    stack: list[object] = [core]
    skip = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType)
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, skip):
            continue
        seen.add(id(obj))
        found.append(obj)
        stack.extend(gc.get_referents(obj))
    return found


def test_a_finished_call_keeps_no_parsed_request() -> None:
    h = make_core()
    _, raw = start_emergency(h)
    ok = response_to(raw, 200, "OK")
    h.feed(ok, TRUNK1)
    finished_message(h, 1)
    assert h.core.contexts_in_flight == 0
    assert h.core.transactions_in_flight == 4 and h.core.transactions_working == 0
    held = _reachable(h.core)
    assert not [o for o in held if isinstance(o, Request)]
    # Only the MESSAGE's final response, kept to answer a retransmitted MESSAGE. The 911
    # call's 2xx is not kept: a retransmitted INVITE is absorbed in ACCEPTED, not answered.
    responses = [o for o in held if isinstance(o, Response)]
    assert [r.cseq_method for r in responses] == ["MESSAGE"]
    # What the finished state does still works: a 2xx retransmission goes upstream.
    again = only(SOFTSWITCH, h.feed(ok, TRUNK1))
    assert isinstance(again, Response) and again.status == 200


def test_evicting_at_the_bound_keeps_the_finished_list_to_the_entries_counted() -> None:
    # Evicting the oldest used to read the first key of a dict whose front was all deleted
    # slots, a scan that grew with every transaction evicted or ended since its last resize.
    h = make_core(max_transactions=16)
    done = h.core._done
    for n in range(300):
        finished_message(h, n)  # at the bound, each evicts the two oldest transactions
        h.advance(0.5 if n % 50 else 40.0)  # and now and then every one ends by its timer
        assert len(done._slots) - done._head <= 2 * done.count + 64
        assert done._head <= max(1024, len(done._slots) // 2)
        assert all(e is None for e in done._slots[: done._head])
    assert h.core.transactions_in_flight <= 16
    assert done.count == h.core.transactions_in_flight - h.core.transactions_working
    assert sum(e.transactions for e in h.event(Evicted)) > 300


def test_eviction_passes_over_finished_transactions_that_already_ended() -> None:
    h = make_core(max_transactions=12)
    finished_message(h, 0)  # the oldest finished: ends by its timers below
    working_invite(h, 1)
    h.advance(40.0)
    assert (h.core.transactions_in_flight, h.core.transactions_working) == (2, 2)
    for n in range(10, 15):
        finished_message(h, n)
    assert h.core.transactions_in_flight == 12
    h.feed(plain_invite(50))
    # The two oldest finished MESSAGEs still held (10 and 11) went, not the ringing call.
    assert h.event(Evicted) == [Evicted(4, 0)]
    assert h.core.transactions_working == 4
    again = h.feed(plain_invite(11).replace(b"INVITE", b"MESSAGE"))
    assert h.event(RequestRouted)[-1] == RequestRouted("MESSAGE", Route.DEFAULT)  # forgotten
    assert [o for o in again if o.peer.host == DEFAULT.host]
    h.collect()
    retransmitted = h.feed(plain_invite(12).replace(b"INVITE", b"MESSAGE"))
    reply = only(SOFTSWITCH, retransmitted)  # still held: answered again, not forwarded
    assert isinstance(reply, Response) and reply.status == 200


def test_a_finished_emergency_transaction_outlasts_ordinary_traffic_at_the_bound() -> None:
    h = make_core(max_transactions=8)
    h.feed(invite(branch="z9hG4bK911-done", call_id="e-done"))
    call = h.emergency()
    h.core.forward_emergency(call.call, call.request, h.now)
    raw = [o.data for o in h.collect() if o.peer.host == TRUNK1.host][0]
    # The PSAP is busy: the final response finishes both transactions of the 911 call.
    out = h.feed(response_to(raw, 486, "Busy Here"), TRUNK1)
    busy = [m for m in to(SOFTSWITCH, out) if isinstance(m, Response)]
    assert [m.status for m in busy] == [486]
    assert (h.core.transactions_in_flight, h.core.transactions_working) == (2, 0)
    for n in range(3):
        finished_message(h, n)
    assert h.core.transactions_in_flight == 8
    # Ordinary calls take the place of the ordinary finished transactions only: four (of
    # six) for the first, the last two for the third.
    h.feed(plain_invite(50))
    assert h.event(Evicted) == [Evicted(4, 0)]
    h.feed(plain_invite(51))
    h.feed(plain_invite(52))
    assert h.event(Evicted)[-1] == Evicted(2, 0)
    assert h.core.transactions_in_flight == 8
    # Only the 911 call's finished state is left to take: the next ordinary call is refused.
    h.feed(plain_invite(53))
    assert [e.reason for e in h.event(Shed)] == ["transactions_full"]
    # The caller never saw the 486 and retransmits its INVITE: still absorbed, answered with
    # the same 486, and not sent to the PSAP again as a new call.
    again = h.feed(invite(branch="z9hG4bK911-done", call_id="e-done"))
    replies = [m for m in to(SOFTSWITCH, again) if isinstance(m, Response)]
    assert [m.status for m in replies] == [486]
    assert not to(TRUNK1, again)
    assert not h.event(RequestRouted) or h.event(RequestRouted)[-1].route is not Route.EMERGENCY


def _left_but_held(core: ProxyCore) -> int:
    """Entries that left their table and that the finished list still holds."""
    done = core._done
    return sum(1 for e in done._slots[done._head :] if e is not None and not e.done)


def test_the_finished_list_lets_go_of_ended_transactions_a_few_at_a_time() -> None:
    # The list is usually the last holder of a transaction that ended: letting go of
    # thousands in one call (the list cut in half, or rebuilt) stalled the loop for 0.2 s.
    h = make_core(max_transactions=10_000)
    for n in range(100):
        finished_message(h, n)
    assert h.core._done.count == 200
    h.advance(40.0)  # every one ends by its timers
    assert h.core.transactions_in_flight == 0
    held = _left_but_held(h.core)
    assert held == 200
    for n in range(100, 200):
        finished_message(h, n)  # two entries added, each passing a few of those that left
        now = _left_but_held(h.core)
        assert held - 2 * _FRONT_STEP <= now <= held
        held = now
        if not held:
            break
    assert held == 0
    assert all(e is None for e in h.core._done._slots[: h.core._done._head])


def test_eviction_lets_go_of_the_entries_it_passes() -> None:
    h = make_core(max_transactions=16)
    for n in range(8):
        finished_message(h, n)
    h.advance(40.0)
    for n in range(10, 18):
        finished_message(h, n)
    assert h.core.transactions_in_flight == 16
    h.feed(plain_invite(50))  # evicts the oldest finished, passing every entry that ended
    assert h.event(Evicted) == [Evicted(4, 0)]
    done = h.core._done
    # Only the last one evicted is still at the front, to be passed by the next read.
    assert _left_but_held(h.core) == 1
    assert all(e is None for e in done._slots[: done._head])
