"""Making room at the bounds: the oldest non-emergency state goes, found without a walk.

With a slow PSAP, 911 calls ring for minutes and their contexts pile up at the front of the
contexts table; the transaction tables hold 32 s of finished transactions. Making room for
a new call must cost the same whatever they hold, so these tests swap the core's tables for
doubles that count every walk over them.
"""

from __future__ import annotations

from collections.abc import ItemsView, Iterator, KeysView, ValuesView
from typing import Any

import pytest

from e911_sip.proxy.core import Evicted, Shed
from e911_sip.sip.message import Request, Response
from tests.unit.proxy.test_admission import in_dialog, make_core, plain_invite
from tests.unit.proxy.test_core import (
    DEFAULT,
    SOFTSWITCH,
    TRUNK1,
    Harness,
    invite,
    response_to,
    to,
)

pytestmark = pytest.mark.usefixtures("core_paths")


class CountingTable(dict[Any, Any]):
    """A core table that counts the walks over it: by itself, its keys, values or items."""

    walks = 0

    def __iter__(self) -> Iterator[Any]:
        self.walks += 1
        return super().__iter__()

    def keys(self) -> KeysView[Any]:
        self.walks += 1
        return super().keys()

    def values(self) -> ValuesView[Any]:
        self.walks += 1
        return super().values()

    def items(self) -> ItemsView[Any, Any]:
        self.walks += 1
        return super().items()


def count_walks(h: Harness) -> tuple[CountingTable, ...]:
    """Swap the transaction tables and the contexts table for counting doubles."""
    core = h.core
    server, client, contexts = (
        CountingTable(core._server),
        CountingTable(core._client),
        CountingTable(core._contexts),
    )
    core._server, core._client, core._contexts = server, client, contexts
    return server, client, contexts


def emergency_call(h: Harness, n: int, status: int = 180, reason: str = "Ringing") -> None:
    """A 911 call the PSAP answered ``status``: ringing, two working transactions and a
    context; busy, two finished transactions the core holds and never evicts."""
    h.feed(invite(branch=f"z9hG4bK911-{n}", call_id=f"e{n}"))
    call = h.emergency()
    h.core.forward_emergency(call.call, call.request, h.now)
    raw = [o.data for o in h.collect() if o.peer.host == TRUNK1.host][0]
    h.feed(response_to(raw, status, reason), TRUNK1)


def ringing_call(h: Harness, n: int) -> None:
    """An ordinary call ringing at the default trunk: two working transactions, a context."""
    out = h.feed(plain_invite(n))
    raw = [o.data for o in out if o.peer.host == DEFAULT.host][0]
    h.feed(response_to(raw, 180, "Ringing"), DEFAULT)


def refused(h: Harness, out: list[Any]) -> list[str]:
    """The Call-IDs told 503 in ``out``."""
    return [m.call_id for m in to(SOFTSWITCH, out) if isinstance(m, Response) and m.status == 503]


def test_a_full_transaction_table_of_911_calls_is_not_walked_for_a_new_call() -> None:
    h = make_core(max_transactions=40)
    for n in range(18):
        emergency_call(h, n)
    for n in range(18, 20):
        emergency_call(h, n, 486, "Busy Here")
    assert (h.core.transactions_in_flight, h.core.transactions_working) == (40, 36)
    tables = count_walks(h)
    # A new 911 call and a BYE at the bound: room is sought for them, there is none to
    # take, and they go over the bound. An ordinary call is refused.
    h.feed(invite(branch="z9hG4bK911-new", call_id="e-new"))
    assert h.emergency().call_id == "e-new"
    h.feed(in_dialog("BYE"))
    h.feed(plain_invite(100))
    assert [e.reason for e in h.event(Shed)] == ["transactions_full"]
    assert h.core.transactions_in_flight > 40
    assert not h.event(Evicted)
    assert [t.walks for t in tables] == [0, 0, 0]


def test_a_full_contexts_table_of_911_calls_is_not_walked_for_a_new_call() -> None:
    h = make_core(max_contexts=20)
    for n in range(20):
        emergency_call(h, n)
    tables = count_walks(h)
    for n in range(5):
        h.feed(invite(branch=f"z9hG4bK911-new{n}", call_id=f"e-new{n}"))
        assert h.emergency().call_id == f"e-new{n}"
    assert h.core.contexts_in_flight == 25  # over the bound: only emergency state was left
    assert not h.event(Evicted)
    assert [t.walks for t in tables] == [0, 0, 0]


def test_the_oldest_ordinary_call_is_evicted_past_older_911_calls() -> None:
    h = make_core(max_contexts=6)
    for n in range(3):
        emergency_call(h, n)
    for n in range(3):
        ringing_call(h, n)
    tables = count_walks(h)
    out: list[Any] = []
    for n in range(4):
        out += h.feed(invite(branch=f"z9hG4bK911-new{n}", call_id=f"e-new{n}"))
        call = h.emergency()
        h.core.forward_emergency(call.call, call.request, h.now)
        out += h.collect()
    # One ordinary call evicted per new 911 call, oldest first; then only 911 calls are
    # left, and the fourth goes over the bound. No 911 call was told 503 or cancelled.
    assert refused(h, out) == ["f0", "f1", "f2"]
    cancels = [m for m in to(DEFAULT, out) if isinstance(m, Request) and m.method == "CANCEL"]
    assert [c.call_id for c in cancels] == ["f0", "f1", "f2"]
    assert not [m for m in to(TRUNK1, out) if isinstance(m, Request) and m.method == "CANCEL"]
    assert [e.contexts for e in h.event(Evicted)] == [1, 1, 1]
    assert h.core.contexts_in_flight == 7
    assert h.core._evictable.oldest() is None
    assert [t.walks for t in tables] == [0, 0, 0]


def test_a_call_that_ended_is_not_taken_for_eviction() -> None:
    h = make_core(max_contexts=3)
    ringing_call(h, 0)
    out = h.feed(plain_invite(1))
    raw = [o.data for o in out if o.peer.host == DEFAULT.host][0]
    h.feed(response_to(raw, 486, "Busy Here"), DEFAULT)  # call 1 ends: its context goes
    assert h.core._evictable.oldest() is h.core._contexts[1]
    ringing_call(h, 2)
    ringing_call(h, 3)
    assert h.core.contexts_in_flight == 3
    out = h.feed(invite())
    assert refused(h, out) == ["f0"]
    out = h.feed(invite(branch="z9hG4bK911-b", call_id="e-b"))
    assert refused(h, out) == ["f2"]


def test_the_evictable_list_lets_go_of_what_ended_and_stays_short() -> None:
    h = make_core(max_transactions=100_000, max_contexts=100_000)
    for n in range(3000):
        out = h.feed(plain_invite(n).replace(b"INVITE", b"MESSAGE"))
        raw = [o.data for o in out if o.peer.host == DEFAULT.host][0]
        h.feed(response_to(raw, 200, "OK"), DEFAULT)  # its context ends
        if n % 100 == 0:
            emergency_call(h, n)  # never offered: its id is a cleared slot
    evictable = h.core._evictable
    assert h.core.contexts_in_flight == 30
    assert evictable.oldest() is None
    assert len(evictable._slots) <= 2 * 1024 + 64
    assert not [s for s in evictable._slots if s is not None]


def test_at_a_bound_of_911_calls_a_hang_up_does_not_evict_the_one_before_it() -> None:
    h = make_core(max_transactions=40)
    for n in range(18):
        emergency_call(h, n)
    for n in range(18, 20):
        emergency_call(h, n, 486, "Busy Here")
    out: list[Any] = []
    # The BYEs of calls already answered, each still waiting for its 200 when the next one
    # comes: room is sought for each, and none is taken from the one before (that freed
    # nothing and refused its caller's hang-up). They go over the bound, as 911 calls do.
    for n in range(3):
        out += h.feed(in_dialog("BYE", n))
    assert refused(h, out) == []
    assert [o.data.split(b"\r\n")[0] for o in out if o.data.startswith(b"BYE ")] == [
        b"BYE sip:3215550000@198.51.100.9:5060 SIP/2.0"
    ] * 3
    assert not h.event(Evicted)
    assert h.core._evictable.oldest() is None
    # A new ordinary call is still refused at the bound.
    assert refused(h, h.feed(plain_invite(100))) == ["f100"]
