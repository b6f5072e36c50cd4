"""When the 100 Trying goes: after the forwarded INVITE, never before a final made at once.

The forwarded INVITE is what the call waits for; the 100 only stops the caller's
retransmissions (RFC 3261 §17.2.1 asks for it within 200 ms), so it is the second message out.
An emergency INVITE's 100 is held while the owner looks the caller up, up to
``ProxyOptions.trying_after``; a retransmitted INVITE is answered with it at once.
"""

from __future__ import annotations

import math

import pytest

from e911_sip.proxy.core import CallCompleted, FailOpen, Outgoing
from e911_sip.proxy.wheel import TICKS_PER_SECOND
from e911_sip.sip.message import Request, Response, parse
from e911_sip.sip.peer import Peer
from tests.unit.proxy.test_core import (
    DEFAULT,
    SOFTSWITCH,
    TRUNK1,
    Harness,
    invite,
    make_core,
    response_to,
)

pytestmark = pytest.mark.usefixtures("core_paths")

PLAIN = "sip:3215550000@192.0.2.1:5070"
"""A Request-URI that is not an emergency number: the call goes to the default trunk."""


def wire(out: list[Outgoing]) -> list[tuple[Peer, str]]:
    """Each message sent, in order: where it went and what it was (method or status)."""
    summary: list[tuple[Peer, str]] = []
    for o in out:
        message = parse(o.data)
        what = message.method if isinstance(message, Request) else str(message.status)
        summary.append((Peer(o.peer.transport, o.peer.host, o.peer.port), what))
    return summary


def statuses(out: list[Outgoing]) -> list[int]:
    return [m.status for m in map(parse, (o.data for o in out)) if isinstance(m, Response)]


def forward(h: Harness) -> list[Outgoing]:
    """The owner hands the emergency INVITE back unchanged; what went out."""
    call = h.emergency()
    h.core.forward_emergency(call.call, call.request, h.now)
    return h.collect()


# -- the order of the outputs ------------------------------------------------------------


def test_a_pass_through_invite_leaves_before_its_100() -> None:
    h = make_core()
    out = h.feed(invite(PLAIN))
    assert wire(out) == [(DEFAULT, "INVITE"), (SOFTSWITCH, "100")]


def test_an_emergency_invite_leaves_before_its_held_100() -> None:
    h = make_core()
    assert h.feed(invite()) == []  # held while the owner looks the caller up
    assert wire(forward(h)) == [(TRUNK1, "INVITE"), (SOFTSWITCH, "100")]
    assert statuses(h.advance(1.0)) == []  # and only once: the deadline was dropped


def test_a_non_invite_gets_no_100() -> None:
    h = make_core()
    message = invite(PLAIN).replace(b"INVITE", b"MESSAGE")
    assert wire(h.feed(message)) == [(DEFAULT, "MESSAGE")]


# -- a slow lookup -----------------------------------------------------------------------


def test_the_held_100_goes_at_its_deadline_when_the_lookup_is_slow() -> None:
    h = make_core()
    h.feed(invite())
    tick = math.ceil(0.1 * TICKS_PER_SECOND) / TICKS_PER_SECOND
    # One wheel slot for the call: the 100's deadline, the earlier of its two.
    assert h.core.get_timer() == tick
    assert h.advance(0.09) == []
    out = h.advance(tick - h.now)
    assert wire(out) == [(SOFTSWITCH, "100")]
    assert 0.1 <= h.now <= 0.1 + 1 / TICKS_PER_SECOND
    # The enriched INVITE still goes when the owner answers, with no second 100.
    assert wire(forward(h)) == [(TRUNK1, "INVITE")]


def test_the_fail_open_deadline_still_fires_after_the_100s() -> None:
    h = make_core()
    h.feed(invite())
    out = h.advance(0.2)
    assert wire(out) == [(SOFTSWITCH, "100")]
    assert h.event(FailOpen) == []
    out = h.advance(0.4)  # past the 0.5 s fail-open deadline
    assert wire(out) == [(TRUNK1, "INVITE")]
    assert len(h.event(FailOpen)) == 1


def test_a_fail_open_before_the_100s_deadline_sends_the_invite_then_the_100() -> None:
    h = make_core(trying_after=2.0)
    h.feed(invite())
    out = h.advance(0.6)  # past the fail-open deadline, before the INVITE's Timer A
    assert wire(out) == [(TRUNK1, "INVITE"), (SOFTSWITCH, "100")]
    assert len(h.event(FailOpen)) == 1
    assert 100 not in statuses(h.advance(2.0))


# -- no 100 before, or after, a final response -------------------------------------------


def test_max_forwards_zero_gets_its_483_without_a_100() -> None:
    h = make_core()
    assert statuses(h.feed(invite(PLAIN, max_forwards=0))) == [483]


def test_no_trunk_gets_a_503_without_a_100() -> None:
    h = make_core(default_trunks=())
    assert wire(h.feed(invite(PLAIN))) == [(SOFTSWITCH, "503")]


def test_an_in_dialog_invite_for_us_gets_a_481_without_a_100() -> None:
    h = make_core()
    data = invite(PLAIN).replace(b"To: <sip:3215550000@192.0.2.1:5070>", b"To: <x@y>;tag=t1")
    assert wire(h.feed(data)) == [(SOFTSWITCH, "481")]


def test_no_emergency_trunk_gets_a_503_and_no_held_100_after_it() -> None:
    h = make_core(emergency_trunks=())
    assert h.feed(invite()) == []
    assert wire(forward(h)) == [(SOFTSWITCH, "503")]
    assert set(statuses(h.advance(1.0))) <= {503}  # Timer G, never a 100


def test_a_cancelled_emergency_call_never_sends_its_held_100() -> None:
    h = make_core()
    request = invite()
    h.feed(request)
    cancel = (
        request.split(b"\r\n\r\n")[0]
        .replace(b"INVITE sip:", b"CANCEL sip:")
        .replace(b"CSeq: 1 INVITE", b"CSeq: 1 CANCEL")
        .replace(b"Content-Type: application/sdp\r\n", b"")
        .split(b"Content-Length")[0]
        + b"Content-Length: 0\r\n\r\n"
    )
    assert sorted(statuses(h.feed(cancel))) == [200, 487]
    assert 100 not in statuses(h.advance(1.0))
    # A retransmitted INVITE now gets the 487 again, not a 100.
    assert 100 not in statuses(h.feed(request))
    assert [e.status for e in h.event(CallCompleted)] == [487]  # type: ignore[attr-defined]


# -- retransmissions ---------------------------------------------------------------------


def test_a_retransmitted_invite_gets_the_held_100_at_once() -> None:
    h = make_core()
    request = invite()
    h.feed(request)
    h.now = 0.05
    assert wire(h.feed(request)) == [(SOFTSWITCH, "100")]
    # The transaction answers the next one with it (its latest provisional).
    assert wire(h.feed(request)) == [(SOFTSWITCH, "100")]
    # Neither the deadline nor the forwarded INVITE sends another.
    assert h.advance(0.1) == []
    assert wire(forward(h)) == [(TRUNK1, "INVITE")]


def test_a_retransmitted_pass_through_invite_is_answered_with_the_100_it_had() -> None:
    h = make_core()
    request = invite(PLAIN)
    h.feed(request)
    assert wire(h.feed(request)) == [(SOFTSWITCH, "100")]


def test_a_retransmission_after_the_answer_gets_the_answer_not_a_100() -> None:
    h = make_core()
    request = invite(PLAIN)
    downstream = h.feed(request)[0].data
    out = h.feed(response_to(downstream, 180, "Ringing"), DEFAULT)
    assert statuses(out) == [180]
    assert statuses(h.feed(request)) == [180]
