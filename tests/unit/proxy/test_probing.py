"""OPTIONS probing of trunks by the proxy core, with injected time."""

from __future__ import annotations

import functools
import ipaddress
import random

import pytest

from e911_sip.policy.emergency import emergency_number
from e911_sip.proxy.core import (
    Discarded,
    Failover,
    Outgoing,
    ProxyCore,
    ProxyOptions,
    TrunkProbed,
    TrunkStateChanged,
)
from e911_sip.proxy.trunks import ProbeOptions
from e911_sip.sip.message import Request, Response, parse
from e911_sip.sip.peer import Peer
from tests.unit.proxy import paths
from tests.unit.proxy.test_core import (
    EDGE_TCP,
    EDGE_UDP,
    SOFTSWITCH,
    TRUNK1,
    TRUNK2,
    Harness,
    invite,
    response_to,
    to,
)

pytestmark = pytest.mark.usefixtures("core_paths")

T1_URI, T2_URI = "sip:198.51.100.1:5060", "sip:198.51.100.2:5060"
PROBE = ProbeOptions(interval=10.0, timeout=2.0, failures=2, successes=1)


def make_core(
    *,
    emergency_trunks: tuple[str, ...] = (T1_URI, T2_URI),
    probe: ProbeOptions = PROBE,
    default_probe: ProbeOptions | None = None,
) -> Harness:
    options = ProxyOptions(
        fast_paths=paths.FAST,
        local=(EDGE_UDP, EDGE_TCP),
        emergency_classifier=functools.partial(emergency_number, numbers=frozenset({"911"})),
        emergency_trunks=emergency_trunks,
        default_trunks=("sip:203.0.113.5:5060",),
        provisional_timeout=2.0,
        emergency_probe=probe,
        default_probe=default_probe or ProbeOptions(),
        trusted_sources=(ipaddress.ip_network("192.0.2.0/24"),),
    )
    return Harness(ProxyCore(options=options, entropy=random.Random(1).randbytes))


def probes(peer: Peer, out: list[Outgoing]) -> list[tuple[Request, bytes]]:
    found = []
    for o in out:
        if (o.peer.host, o.peer.port) != (peer.host, peer.port):
            continue
        message = parse(o.data)
        if isinstance(message, Request) and message.method == "OPTIONS":
            found.append((message, o.data))
    return found


def invites(peer: Peer, out: list[Outgoing]) -> list[Request]:
    return [m for m in to(peer, out) if isinstance(m, Request) and m.method == "INVITE"]


def answer_probes(h: Harness, peer: Peer, out: list[Outgoing], status: int = 200) -> None:
    for _, raw in probes(peer, out):
        h.feed(response_to(raw, status, "Whatever"), peer)


def place_911(h: Harness, call_id: str) -> list[Outgoing]:
    h.feed(invite(call_id=call_id, branch=f"z9hG4bK{call_id}"))
    call = h.emergency()
    h.core.forward_emergency(call.call, call.request, h.now)
    return h.collect()


def take_down_trunk1(h: Harness) -> None:
    """Trunk 2 answers its probes, trunk 1 stays silent until it is down."""
    for _ in range(2):
        out = h.advance(0.0) if h.now == 0.0 else h.advance(10.0 - h.now % 10.0)
        answer_probes(h, TRUNK2, out)
        h.advance(2.5)
    changes = h.event(TrunkStateChanged)
    assert changes == [TrunkStateChanged(T1_URI, False, "timeout")]


def test_probes_go_at_once_to_every_probed_trunk() -> None:
    h = make_core()
    assert h.core.get_timer() == 0.0
    out = h.advance(0.0)
    ((probe, _),) = probes(TRUNK1, out)
    assert len(probes(TRUNK2, out)) == 1
    assert probes(Peer("udp", "203.0.113.5", 5060), out) == []  # default route not probed
    assert probe.uri == T1_URI
    assert probe.top_via.host == EDGE_UDP.host and probe.top_via.branch
    assert probe.get("max-forwards") == "70"
    assert probe.from_tag and probe.cseq == (1, "OPTIONS")
    assert all(o.branch == probe.top_via.branch for o in out if o.peer.host == TRUNK1.host)


def test_answered_probes_keep_the_trunk_up_and_repeat_each_interval() -> None:
    h = make_core()
    out = h.advance(0.0)
    answer_probes(h, TRUNK1, out)
    answer_probes(h, TRUNK2, out)
    assert [(p.trunk, p.ok, p.result) for p in h.event(TrunkProbed)] == [  # type: ignore[union-attr]
        (T1_URI, True, "ok"),
        (T2_URI, True, "ok"),
    ]
    assert h.event(TrunkStateChanged) == []
    assert probes(TRUNK1, h.advance(9.9)) == []
    assert len(probes(TRUNK1, h.advance(0.1))) == 1


def test_a_silent_trunk_goes_down_and_a_911_call_tries_it_last() -> None:
    h = make_core()
    take_down_trunk1(h)
    assert not h.core.trunk_health.is_up(T1_URI)
    results = [(p.trunk, p.result) for p in h.event(TrunkProbed) if p.trunk == T1_URI]  # type: ignore[union-attr]
    assert results == [(T1_URI, "timeout"), (T1_URI, "timeout")]
    out = place_911(h, "after-down")
    assert len(invites(TRUNK2, out)) == 1
    assert invites(TRUNK1, out) == []
    # Trunk 2 stays silent too: the down trunk is still tried, after it.
    out = h.advance(2.1)
    assert len(invites(TRUNK1, out)) == 1


def test_the_down_trunk_comes_back_up_on_one_answered_probe() -> None:
    h = make_core()
    take_down_trunk1(h)
    out = h.advance(10.0 - h.now % 10.0)
    answer_probes(h, TRUNK1, out)
    assert h.event(TrunkStateChanged)[-1] == TrunkStateChanged(T1_URI, True, "ok")
    out = place_911(h, "after-up")
    assert len(invites(TRUNK1, out)) == 1


def test_every_trunk_down_still_tries_every_one_in_configured_order() -> None:
    h = make_core()
    h.advance(0.0)
    h.advance(12.5)  # nobody answers: two failures each
    assert sorted((c.trunk, c.up) for c in h.event(TrunkStateChanged)) == [  # type: ignore[union-attr]
        (T1_URI, False),
        (T2_URI, False),
    ]
    out = place_911(h, "all-down")
    assert len(invites(TRUNK1, out)) == 1 and invites(TRUNK2, out) == []
    out = h.advance(2.1)
    assert len(invites(TRUNK2, out)) == 1
    assert [f.trunk for f in h.event(Failover)] == [T1_URI]  # type: ignore[union-attr]


def test_408_and_503_to_a_probe_are_failures() -> None:
    h = make_core(probe=ProbeOptions(interval=10.0, failures=1))
    out = h.advance(0.0)
    answer_probes(h, TRUNK1, out, 503)
    answer_probes(h, TRUNK2, out, 404)  # any other final shows the trunk is there
    assert [(p.trunk, p.ok, p.result) for p in h.event(TrunkProbed)] == [  # type: ignore[union-attr]
        (T1_URI, False, "503"),
        (T2_URI, True, "ok"),
    ]
    assert h.event(TrunkStateChanged) == [TrunkStateChanged(T1_URI, False, "503")]


def test_a_transport_error_fails_the_probe() -> None:
    h = make_core(probe=ProbeOptions(interval=10.0, failures=1))
    out = h.advance(0.0)
    ((probe, _),) = probes(TRUNK1, out)
    assert probe.top_via.branch is not None
    h.core.transport_error(probe.top_via.branch, h.now)
    h.collect()
    assert h.event(TrunkStateChanged) == [TrunkStateChanged(T1_URI, False, "transport")]


def test_a_tcp_trunk_is_probed_over_tcp() -> None:
    h = make_core(emergency_trunks=("sip:198.51.100.1:5061;transport=tcp",))
    out = h.advance(0.0)
    ((probe, _),) = probes(Peer("tcp", "198.51.100.1", 5061), out)
    assert probe.uri == "sip:198.51.100.1:5061;transport=tcp"
    assert probe.top_via.transport.upper() == "TCP"
    assert [o.peer.transport for o in out] == ["tcp"]  # reliable: no retransmission either


def test_a_late_answer_after_the_probe_timeout_is_dropped() -> None:
    h = make_core()
    out = h.advance(0.0)
    h.advance(2.5)
    assert h.core.transactions_in_flight == 0  # abandoned at the probe timeout
    for _, raw in probes(TRUNK1, out):
        h.feed(response_to(raw, 503, "Late"), TRUNK1)
        h.feed(response_to(raw, 200, "Late"), TRUNK1)
    reasons = [d.reason for d in h.event(Discarded)]  # type: ignore[union-attr]
    assert reasons == ["stray_response", "stray_response"]
    assert len([p for p in h.event(TrunkProbed) if p.trunk == T1_URI]) == 1  # type: ignore[union-attr]


def test_calls_feed_the_health_of_a_probed_trunk() -> None:
    h = make_core(probe=ProbeOptions(interval=10.0, failures=1))
    out = h.advance(0.0)
    answer_probes(h, TRUNK1, out)
    answer_probes(h, TRUNK2, out)
    out = place_911(h, "call-silent")
    h.advance(2.1)  # trunk 1 sends no provisional: the call moves on, trunk 1 is down
    assert h.event(TrunkStateChanged) == [TrunkStateChanged(T1_URI, False, "no_provisional")]
    # Trunk 2 answers the call: a response is a success (it was up already: no change).
    out = h.collect() + h.sent
    (second,) = [o.data for o in out if o.peer.host == TRUNK2.host and o.data.startswith(b"INVITE")]
    h.feed(response_to(second, 180, "Ringing"), TRUNK2)
    assert len(h.event(TrunkStateChanged)) == 1
    assert [m for m in to(SOFTSWITCH, h.sent) if isinstance(m, Response) and m.status == 180]


def test_unprobed_trunks_are_not_marked_down_by_calls() -> None:
    h = make_core(probe=ProbeOptions())
    assert h.core.get_timer() is None
    place_911(h, "no-probe")
    h.advance(2.1)
    assert h.event(TrunkStateChanged) == []
    assert h.core.trunk_health.is_up(T1_URI)
