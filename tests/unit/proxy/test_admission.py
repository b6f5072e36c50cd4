"""Overload control in the core and the byte-level classifier: injected time, no sockets."""

from __future__ import annotations

import functools
import ipaddress
import random
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from e911_sip.policy.emergency import emergency_number
from e911_sip.proxy.admission import LoadSignal, Priority, classify
from e911_sip.proxy.core import (
    EmergencyCall,
    Evicted,
    ProxyCore,
    ProxyOptions,
    RequestRouted,
    Route,
    Shed,
)
from e911_sip.sip.errors import SipError
from e911_sip.sip.message import Request, Response, parse
from e911_sip.sip.peer import Peer
from e911_sip.sip.uri import parse_uri
from tests.unit.proxy import paths
from tests.unit.proxy.test_core import (
    DEFAULT,
    EDGE_TCP,
    EDGE_UDP,
    SOFTSWITCH,
    TRUNK1,
    Harness,
    invite,
    only,
    response_to,
    to,
)

pytestmark = pytest.mark.usefixtures("core_paths")

NUMBERS = frozenset({"911", "933"})
POLICY = functools.partial(emergency_number, numbers=NUMBERS)
DIALOG_PEER = Peer("udp", "198.51.100.9", 5060)


def make_core(
    *,
    max_transactions: int = 1000,
    shed_transactions: int = 1000,
    max_contexts: int = 1000,
    overload: Callable[[], str | None] = lambda: None,
) -> Harness:
    options = ProxyOptions(
        fast_paths=paths.FAST,
        local=(EDGE_UDP, EDGE_TCP),
        emergency_classifier=POLICY,
        emergency_trunks=("sip:198.51.100.1:5060", "sip:198.51.100.2:5060"),
        default_trunks=("sip:203.0.113.5:5060",),
        max_transactions=max_transactions,
        shed_transactions=shed_transactions,
        max_contexts=max_contexts,
        overload=overload,
        retry_after=7,
        trusted_sources=(ipaddress.ip_network("192.0.2.0/24"),),
    )
    return Harness(ProxyCore(options=options, entropy=random.Random(1).randbytes))


def plain_invite(n: int) -> bytes:
    return invite("sip:3215550000@192.0.2.1:5070", branch=f"z9hG4bKflood{n}", call_id=f"f{n}")


def in_dialog(method: str, n: int = 1) -> bytes:
    return (
        f"{method} sip:3215550000@198.51.100.9:5060 SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bKdlg{method}{n}\r\n"
        "Max-Forwards: 70\r\n"
        "Route: <sip:192.0.2.1:5070;lr>\r\n"
        "From: <sip:3215551234@192.0.2.10>;tag=uac-tag\r\n"
        "To: <sip:3215550000@192.0.2.1>;tag=uas-tag\r\n"
        f"Call-ID: dlg-{n}\r\n"
        f"CSeq: 2 {method}\r\n"
        "Content-Length: 0\r\n\r\n"
    ).encode()


def assert_shed(h: Harness, data: bytes, reason: str) -> None:
    """``data`` gets exactly one 503 with Retry-After, and the core keeps nothing."""
    transactions = h.core.transactions_in_flight
    contexts = h.core.contexts_in_flight
    timer = h.core.get_timer()
    before = len(h.events)
    out = h.feed(data)
    reply = only(SOFTSWITCH, out)
    assert isinstance(reply, Response) and reply.status == 503
    assert reply.get("retry-after") == "7"
    assert len(out) == 1  # nothing went downstream
    assert h.core.transactions_in_flight == transactions
    assert h.core.contexts_in_flight == contexts
    assert h.core.get_timer() == timer  # no Timer G/H/J armed for it
    shed = [e for e in h.events[before:] if isinstance(e, Shed)]
    assert [(e.reason, e.method) for e in shed] == [(reason, parse(data).method)]  # type: ignore[union-attr]


# -- table bounds --------------------------------------------------------------------------


def test_full_table_refuses_a_new_call_with_a_stateless_503() -> None:
    h = make_core(max_transactions=8)
    for n in range(4):
        h.feed(plain_invite(n))  # a server and a client transaction each
    assert h.core.transactions_in_flight == 8
    assert_shed(h, plain_invite(99), "transactions_full")
    # Its retransmission is answered the same way: still no state.
    assert_shed(h, plain_invite(99), "transactions_full")
    # And in-dialog requests other than BYE are refused too while the table is full.
    assert_shed(h, in_dialog("INFO"), "transactions_full")


def test_the_ack_of_a_shed_invite_ends_at_the_edge() -> None:
    h = make_core(max_transactions=8)
    for n in range(4):
        h.feed(plain_invite(n))
    out = h.feed(plain_invite(99))
    reply = only(SOFTSWITCH, out)
    assert isinstance(reply, Response)
    ack = (
        "ACK sip:3215550000@192.0.2.1:5070 SIP/2.0\r\n"
        "Via: SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bKflood99\r\n"
        "Max-Forwards: 70\r\n"
        "From: <sip:3215551234@192.0.2.10>;tag=uac-tag\r\n"
        f"To: {reply.get('to')}\r\n"
        "Call-ID: f99\r\n"
        "CSeq: 1 ACK\r\n"
        "Content-Length: 0\r\n\r\n"
    ).encode()
    before = len(h.events)
    assert h.feed(ack) == []
    assert h.events[before:] == []


def test_emergency_call_is_admitted_into_a_full_table_by_evicting_the_oldest_call() -> None:
    h = make_core(max_transactions=8)
    for n in range(4):
        h.feed(plain_invite(n))
    # The oldest call is ringing at the default trunk.
    first_sent = to(DEFAULT, h.sent)[0]
    h.feed(response_to(first_sent.to_bytes(), 180, "Ringing"), DEFAULT)
    h.sent.clear()
    out = h.feed(invite())
    # Admitted: handed to the owner, not refused (its 100 waits for the INVITE to leave).
    assert not [m for m in to(SOFTSWITCH, out) if m.call_id == "call-1@192.0.2.10"]
    assert [e for e in h.events if isinstance(e, EmergencyCall)]
    evicted = [e for e in h.events if isinstance(e, Evicted)]
    assert evicted and evicted[0].contexts >= 1
    # The evicted caller is told (stateless 503); the ringing trunk gets a CANCEL.
    refused = [
        m
        for m in to(SOFTSWITCH, out)
        if isinstance(m, Response) and m.status == 503 and m.call_id == "f0"
    ]
    assert len(refused) == 1 and refused[0].get("retry-after") == "7"
    cancels = [m for m in to(DEFAULT, out) if isinstance(m, Request) and m.method == "CANCEL"]
    assert [c.call_id for c in cancels] == ["f0"]
    call = h.emergency()
    h.core.forward_emergency(call.call, call.request, h.now)
    sent = only(TRUNK1, h.collect())
    assert isinstance(sent, Request) and sent.uri == "sip:911@198.51.100.1:5060"
    assert h.core.transactions_in_flight <= 8


def test_emergency_calls_go_over_the_bound_when_only_emergency_state_is_left() -> None:
    h = make_core(max_transactions=16)
    for n in range(12):
        h.feed(invite(branch=f"z9hG4bK911-{n}", call_id=f"e{n}"))
        call = h.emergency()
        h.core.forward_emergency(call.call, call.request, h.now)
        h.collect()
    assert h.core.transactions_in_flight > 16
    assert not [e for e in h.events if isinstance(e, Evicted)]
    emergencies = [e for e in h.events if isinstance(e, RequestRouted)]
    assert len(emergencies) == 12 and {e.route for e in emergencies} == {Route.EMERGENCY}


def test_full_context_table_refuses_new_calls_and_evicts_for_an_emergency() -> None:
    h = make_core(max_contexts=3)
    for n in range(3):
        h.feed(plain_invite(n))
    assert_shed(h, plain_invite(50), "contexts_full")
    h.feed(invite())
    assert h.core.contexts_in_flight == 3
    assert [e.contexts for e in h.events if isinstance(e, Evicted)] == [1]


def test_bye_is_admitted_into_a_full_table() -> None:
    h = make_core(max_transactions=8)
    for n in range(4):
        h.feed(plain_invite(n))
    out = h.feed(in_dialog("BYE"))
    sent = to(DIALOG_PEER, out)
    assert [m.method for m in sent if isinstance(m, Request)] == ["BYE"]
    assert not [e for e in h.events if isinstance(e, Shed)]


# -- shedding for load -----------------------------------------------------------------------


def test_load_signal_sheds_new_non_emergency_requests_only() -> None:
    load = LoadSignal(max_lag=0.05, max_queue=100)
    h = make_core(overload=load.shed_reason)
    h.feed(plain_invite(1))
    assert h.core.transactions_in_flight == 2

    load.lag = 0.2
    assert_shed(h, plain_invite(2), "lag")
    load.lag, load.queue_depth = 0.0, 101
    message = plain_invite(3).replace(b"INVITE", b"MESSAGE")
    assert_shed(h, message, "queue")

    # Emergency INVITEs, BYE, in-dialog requests and OPTIONS to us still go through.
    assert to(SOFTSWITCH, h.feed(invite())) == []  # not refused; the 100 is held
    assert h.emergency().call_id == "call-1@192.0.2.10"
    out = h.feed(in_dialog("BYE"))
    assert [m.method for m in to(DIALOG_PEER, out) if isinstance(m, Request)] == ["BYE"]
    out = h.feed(in_dialog("INFO", 2))
    assert [m.method for m in to(DIALOG_PEER, out) if isinstance(m, Request)] == ["INFO"]
    options = (
        b"OPTIONS sip:192.0.2.1:5070 SIP/2.0\r\n"
        b"Via: SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bKopt\r\n"
        b"Max-Forwards: 70\r\n"
        b"From: <sip:ping@192.0.2.10>;tag=p\r\n"
        b"To: <sip:192.0.2.1:5070>\r\n"
        b"Call-ID: opt-1\r\n"
        b"CSeq: 1 OPTIONS\r\n"
        b"Content-Length: 0\r\n\r\n"
    )
    reply = only(SOFTSWITCH, h.feed(options))
    assert isinstance(reply, Response) and reply.status == 200

    load.queue_depth = 0
    h.feed(plain_invite(4))
    assert [e for e in h.events if isinstance(e, RequestRouted)][-1] == RequestRouted(
        "INVITE", Route.DEFAULT
    )


def test_transaction_count_sheds_new_calls_before_the_table_is_full() -> None:
    h = make_core(max_transactions=100, shed_transactions=4)
    h.feed(plain_invite(1))
    h.feed(plain_invite(2))
    assert_shed(h, plain_invite(3), "transactions")
    assert to(SOFTSWITCH, h.feed(invite())) == []  # not refused; the 100 is held
    assert h.emergency().call_id == "call-1@192.0.2.10"
    assert not [e for e in h.events if isinstance(e, Evicted)]


def test_load_signal_thresholds() -> None:
    load = LoadSignal(max_lag=0.1, max_queue=10, max_queue_delay=0.05)
    assert load.shed_reason() is None
    load.lag = 0.1
    assert load.shed_reason() is None
    load.lag = 0.11
    assert load.shed_reason() == "lag"
    load.queue_depth = 11
    assert load.shed_reason() == "queue"
    load.queue_delay = 0.05
    assert load.shed_reason() == "queue"
    load.queue_delay = 0.06
    assert load.shed_reason() == "queue_delay"
    load.lag, load.queue_depth = 0.0, 0
    assert load.shed_reason() == "queue_delay"
    load.queue_delay = 0.0
    assert load.shed_reason() is None


def test_the_queue_delay_sheds_only_once_it_has_stayed_over_its_bound() -> None:
    load = LoadSignal(max_lag=0.1, max_queue=10, max_queue_delay=0.05, queue_delay_sustain=0.2)
    load.queue_delay = 0.5
    load.queue_delay_over = 0.0  # the first datagram of the run over the bound
    assert load.shed_reason() is None
    load.queue_delay_over = 0.19
    assert load.shed_reason() is None
    load.queue_delay_over = 0.2
    assert load.shed_reason() == "queue_delay"
    # The run is measured on new work; this datagram itself waited less: it is served.
    load.queue_delay = 0.01
    assert load.shed_reason() is None


def test_without_a_delay_bound_the_queue_delay_sheds_nothing() -> None:
    load = LoadSignal(max_lag=0.1, max_queue=10)
    load.queue_delay = 3600.0
    assert load.shed_reason() is None


def test_a_request_that_waited_too_long_in_the_queue_is_shed_and_911_is_not() -> None:
    load = LoadSignal(max_lag=1.0, max_queue=10_000, max_queue_delay=0.1)
    h = make_core(overload=load.shed_reason)
    load.queue_delay = 0.25
    assert_shed(h, plain_invite(1), "queue_delay")
    assert to(SOFTSWITCH, h.feed(invite())) == []  # not refused; the 100 is held
    assert h.emergency().call_id == "call-1@192.0.2.10"
    load.queue_delay = 0.001
    h.feed(plain_invite(2))
    assert [e for e in h.events if isinstance(e, RequestRouted)][-1] == RequestRouted(
        "INVITE", Route.DEFAULT
    )


# -- the byte-level classifier agrees with the emergency policy -----------------------------

URIS = [
    "sip:911@192.0.2.1:5070;user=phone",
    "sip:911@192.0.2.1",
    "sip:933@192.0.2.1;user=phone",
    "sips:911@example.com",
    "tel:911",
    "tel:9-1-1",
    "sip:9.1.1@192.0.2.1",
    "sip:(911)@192.0.2.1",
    "sip:911;phone-context=+1@192.0.2.1;user=phone",
    "urn:service:sos",
    "URN:service:sos",
    "urn:service:sos.fire",
    "urn:service:sos.police",
    "urn:service:test.sos",
    "urn:service:test.sos.fire",
    "urn:service:sosx",
    "urn:service:counseling",
    "sip:9111@192.0.2.1",
    "sip:+1911@192.0.2.1",
    "sip:912@192.0.2.1",
    "sip:3215551234@192.0.2.1",
    "sip:192.0.2.1:5070",
    "tel:+13215551234",
    "sip:911@[2001:db8::1]:5060",
    "mailto:911@example.com",
    "sip:@192.0.2.1",
    "http://911",
]


def policy_number(ruri: str) -> str | None:
    try:
        return POLICY(parse_uri(ruri))
    except SipError:
        return None


@pytest.mark.parametrize("ruri", URIS)
def test_classifier_agrees_with_the_policy(ruri: str) -> None:
    expected = Priority.EMERGENCY if policy_number(ruri) is not None else Priority.NEW
    data = invite(ruri)
    assert classify(data, POLICY) is expected
    # And with what the core itself does with that INVITE.
    h = make_core()
    h.feed(data)
    routed = [e.route for e in h.events if isinstance(e, RequestRouted)]
    assert (Route.EMERGENCY in routed) == (expected is Priority.EMERGENCY)


@settings(max_examples=300, deadline=None)
@given(
    user=st.text(alphabet="0123456789+-.()#*abc", max_size=8),
    scheme=st.sampled_from(["sip", "sips", "tel"]),
    params=st.sampled_from(["", ";user=phone", ";phone-context=+1"]),
)
def test_classifier_agrees_with_the_policy_on_generated_numbers(
    user: str, scheme: str, params: str
) -> None:
    ruri = f"tel:{user}{params}" if scheme == "tel" else f"{scheme}:{user}@192.0.2.1{params}"
    expected = Priority.EMERGENCY if policy_number(ruri) is not None else Priority.NEW
    assert classify(invite(ruri), POLICY) is expected


def test_classifier_sorts_what_finishes_admitted_work_ahead_of_new_work() -> None:
    assert classify(response_to(invite(), 180, "Ringing"), POLICY) is Priority.ONGOING
    assert classify(b"\r\n" + response_to(invite(), 200, "OK"), POLICY) is Priority.ONGOING
    for method in ("ACK", "CANCEL", "BYE", "PRACK", "INFO", "UPDATE"):
        assert classify(in_dialog(method), POLICY) is Priority.ONGOING, method
    reinvite = in_dialog("INVITE")
    assert classify(reinvite, POLICY) is Priority.ONGOING
    compact = plain_invite(1).replace(
        b"\r\nTo: <sip:3215550000@192.0.2.1:5070>", b"\r\nt: <sip:x@y>;TAG=1"
    )
    assert classify(compact, POLICY) is Priority.ONGOING
    assert classify(plain_invite(1), POLICY) is Priority.NEW
    options = in_dialog("OPTIONS").replace(b";tag=uas-tag", b"")
    assert classify(options, POLICY) is Priority.NEW
    for junk in (b"", b"\r\n\r\n", b"garbage", b"INVITE", b"INVITE sip:911@x", b"\xff" * 40):
        assert classify(junk, POLICY) in (Priority.NEW, Priority.EMERGENCY)
    assert classify(b"INVITE sip:911@x SIP/2.0\r\n\r\n", POLICY) is Priority.EMERGENCY
