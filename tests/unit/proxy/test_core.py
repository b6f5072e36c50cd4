"""The proxy core driven with raw messages and injected time: no sockets, no sleeping."""

from __future__ import annotations

import functools
import gc
import ipaddress
import random
import re
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from e911_sip.policy.emergency import emergency_number
from e911_sip.proxy.core import (
    CallCompleted,
    Discarded,
    EmergencyCall,
    EmergencyForwarded,
    Event,
    FailOpen,
    Failover,
    Outgoing,
    ProxyCore,
    ProxyOptions,
    RequestRouted,
    Route,
)
from e911_sip.proxy.routing import LocalAddress
from e911_sip.sip.message import Request, Response, parse
from e911_sip.sip.peer import Peer
from tests.unit.proxy import paths

pytestmark = pytest.mark.usefixtures("core_paths")

EDGE_UDP = LocalAddress("udp", "192.0.2.1", 5070)
EDGE_TCP = LocalAddress("tcp", "192.0.2.1", 5070)
SOFTSWITCH = Peer("udp", "192.0.2.10", 5060)
TRUNK1 = Peer("udp", "198.51.100.1", 5060)
TRUNK2 = Peer("udp", "198.51.100.2", 5060)
DEFAULT = Peer("udp", "203.0.113.5", 5060)


def is_our_record_route(value: str | None, *, emergency: bool, transport: str = "") -> bool:
    """Our Record-Route, loose, with the dialog's stamp (``e`` for an emergency call)."""
    kind = "e" if emergency else "o"
    pattern = rf"<sip:192\.0\.2\.1:5070{transport};lr;dlg={kind}[0-9a-f]{{18}}>"
    return value is not None and re.fullmatch(pattern, value) is not None


SDP = b"v=0\r\no=- 1 1 IN IP4 192.0.2.10\r\ns=-\r\nc=IN IP4 192.0.2.10\r\nt=0 0\r\n"


def invite(
    ruri: str = "sip:911@192.0.2.1:5070;user=phone",
    *,
    branch: str = "z9hG4bKuac1",
    call_id: str = "call-1@192.0.2.10",
    from_user: str = "3215551234",
    max_forwards: int = 70,
    extra: str = "",
    transport: str = "UDP",
) -> bytes:
    head = (
        f"INVITE {ruri} SIP/2.0\r\n"
        f"Via: SIP/2.0/{transport} 192.0.2.10:5060;branch={branch}\r\n"
        f"Max-Forwards: {max_forwards}\r\n"
        f"From: <sip:{from_user}@192.0.2.10>;tag=uac-tag\r\n"
        f"To: <{ruri.split(';')[0]}>\r\n"
        f"Call-ID: {call_id}\r\n"
        "CSeq: 1 INVITE\r\n"
        "Contact: <sip:3215551234@192.0.2.10:5060>\r\n"
        "Identity: aGVhZGVy.cGF5bG9hZA.c2ln;info=<https://cert.example.org/a.cer>;alg=ES256\r\n"
        f"{extra}"
        "Content-Type: application/sdp\r\n"
        f"Content-Length: {len(SDP)}\r\n\r\n"
    )
    return head.encode() + SDP


def response_to(request: bytes, status: int, reason: str, *, to_tag: str = "uas-tag") -> bytes:
    """What a UAS would answer to ``request`` (every Via copied, To tagged)."""
    message = parse(request)
    lines = [f"SIP/2.0 {status} {reason}"]
    for h in message.headers:
        if h.key in ("via", "from", "call-id", "cseq", "record-route"):
            lines.append(h.raw)
        elif h.key == "to":
            lines.append(h.raw if status == 100 else f"{h.raw};tag={to_tag}")
    if 200 <= status < 300:
        lines.append("Contact: <sip:911@198.51.100.1:5060>")
    lines.append("Content-Length: 0")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


@dataclass
class Harness:
    core: ProxyCore
    now: float = 0.0
    sent: list[Outgoing] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)

    def feed(self, data: bytes, source: Peer = SOFTSWITCH) -> list[Outgoing]:
        self.core.receive(data, source, self.now)
        return self.collect()

    def collect(self) -> list[Outgoing]:
        out = self.core.data_to_send()
        self.sent.extend(out)
        while (event := self.core.next_event()) is not None:
            self.events.append(event)
        return out

    def advance(self, seconds: float) -> list[Outgoing]:
        """Move the clock, firing every timer due on the way, in order."""
        target = self.now + seconds
        out: list[Outgoing] = []
        while (deadline := self.core.get_timer()) is not None and deadline <= target:
            self.now = max(self.now, deadline)
            self.core.handle_timer(self.now)
            out.extend(self.collect())
        self.now = target
        return out

    def event(self, kind: type[Event]) -> list[Event]:
        return [e for e in self.events if isinstance(e, kind)]

    def emergency(self) -> EmergencyCall:
        calls = [e for e in self.events if isinstance(e, EmergencyCall)]
        assert calls, "no EmergencyCall event"
        return calls[-1]


def make_core(
    *,
    emergency_trunks: tuple[str, ...] = ("sip:198.51.100.1:5060", "sip:198.51.100.2:5060"),
    default_trunks: tuple[str, ...] = ("sip:203.0.113.5:5060",),
    local: tuple[LocalAddress, ...] = (EDGE_UDP, EDGE_TCP),
    trusted: tuple[str, ...] = ("192.0.2.0/24", "203.0.113.77/32"),
    **extra: Any,
) -> Harness:
    options = ProxyOptions(
        fast_paths=paths.FAST,
        local=local,
        emergency_classifier=functools.partial(emergency_number, numbers=frozenset({"911", "933"})),
        emergency_trunks=emergency_trunks,
        default_trunks=default_trunks,
        provisional_timeout=2.0,
        fail_open_after=0.5,
        trusted_sources=tuple(ipaddress.ip_network(n) for n in trusted),
        **extra,
    )
    return Harness(ProxyCore(options=options, entropy=random.Random(1).randbytes))


def to(peer: Peer, out: list[Outgoing]) -> list[Request | Response]:
    return [parse(o.data) for o in out if (o.peer.host, o.peer.port) == (peer.host, peer.port)]


def only(peer: Peer, out: list[Outgoing]) -> Request | Response:
    messages = to(peer, out)
    assert len(messages) == 1, messages
    return messages[0]


def start_emergency(h: Harness, data: bytes | None = None) -> tuple[Request, bytes]:
    """Send an emergency INVITE, forward it unchanged, return what reached trunk 1 (the
    held 100 Trying follows it)."""
    first = h.feed(data or invite())
    assert to(SOFTSWITCH, first) == []  # the 100 waits for the INVITE to leave
    call = h.emergency()
    h.core.forward_emergency(call.call, call.request.replace("Priority", "emergency"), h.now)
    out = h.collect()
    sent = only(TRUNK1, out)
    assert isinstance(sent, Request)
    trying = only(SOFTSWITCH, out)
    assert isinstance(trying, Response) and trying.status == 100
    raw = [o.data for o in out if o.peer.host == TRUNK1.host][0]
    return sent, raw


# -- emergency routing -------------------------------------------------------------------


def test_emergency_invite_waits_for_the_owner_then_goes_to_the_first_trunk() -> None:
    h = make_core()
    assert h.feed(invite()) == []  # the 100 Trying waits for the INVITE to leave
    assert h.event(RequestRouted) == [RequestRouted("INVITE", Route.EMERGENCY)]
    call = h.emergency()
    assert call.number == "911" and call.call_id == "call-1@192.0.2.10"
    sent, _ = start_emergency_after(h, call)
    assert sent.uri == "sip:911@198.51.100.1:5060"
    assert sent.get("priority") == "emergency"
    top, below = sent.vias[0], sent.vias[1]
    assert (top.host, top.port, top.transport) == ("192.0.2.1", 5070, "UDP")
    assert top.branch is not None and top.branch.startswith("z9hG4bK")
    assert top.param("rport") == ""
    assert below.branch == "z9hG4bKuac1"
    assert sent.get("max-forwards") == "69"
    assert is_our_record_route(sent.get("record-route"), emergency=True)
    assert sent.body == SDP
    original = parse(invite())
    assert sent.get("identity") == original.get("identity")
    assert sent.get("from") == original.get("from") and sent.get("to") == original.get("to")
    forwarded = h.event(EmergencyForwarded)
    assert forwarded == [
        EmergencyForwarded(call.call, call.call_id, "sip:198.51.100.1:5060", 1, True)
    ]


def start_emergency_after(h: Harness, call: EmergencyCall) -> tuple[Request, list[Outgoing]]:
    h.core.forward_emergency(call.call, call.request.replace("Priority", "emergency"), h.now)
    out = h.collect()
    sent = only(TRUNK1, out)
    assert isinstance(sent, Request)
    return sent, out


@pytest.mark.parametrize(
    ("ruri", "number"),
    [
        ("sip:933@192.0.2.1:5070", "933"),
        ("tel:911", "911"),
        ("urn:service:sos", "911"),
        ("urn:service:sos.police", "911"),
    ],
)
def test_every_emergency_form_is_rewritten_to_the_trunk(ruri: str, number: str) -> None:
    h = make_core()
    h.feed(invite(ruri))
    sent, _ = start_emergency_after(h, h.emergency())
    assert sent.uri == f"sip:{number}@198.51.100.1:5060"


def test_fail_open_forwards_the_original_when_the_owner_is_silent() -> None:
    h = make_core()
    h.feed(invite())
    assert to(TRUNK1, h.sent) == []
    out = h.advance(0.6)
    sent = only(TRUNK1, out)
    assert isinstance(sent, Request) and sent.uri == "sip:911@198.51.100.1:5060"
    assert not sent.has("priority")
    assert len(h.event(FailOpen)) == 1
    assert h.event(EmergencyForwarded)[0].enriched is False  # type: ignore[union-attr]
    # A late answer from the owner changes nothing.
    call = h.emergency()
    h.core.forward_emergency(call.call, call.request, h.now)
    assert h.collect() == []


def test_failover_on_503_then_success_upstream() -> None:
    h = make_core()
    sent, raw = start_emergency(h)
    out = h.feed(response_to(raw, 503, "Service Unavailable"), TRUNK1)
    ack = only(TRUNK1, out)
    assert isinstance(ack, Request) and ack.method == "ACK"
    second = only(TRUNK2, out)
    assert isinstance(second, Request) and second.uri == "sip:911@198.51.100.2:5060"
    assert second.vias[0].branch != sent.vias[0].branch
    # Each branch adds the Record-Route to the template: one each, the same one.
    assert len(sent.values("record-route")) == len(second.values("record-route")) == 1
    assert second.get("record-route") == sent.get("record-route")
    assert is_our_record_route(second.get("record-route"), emergency=True)
    assert to(SOFTSWITCH, out) == []
    failover = h.event(Failover)
    assert [(f.trunk, f.reason) for f in failover] == [("sip:198.51.100.1:5060", "503")]  # type: ignore[union-attr]
    raw2 = [o.data for o in out if o.peer.host == TRUNK2.host][0]
    out = h.feed(response_to(raw2, 180, "Ringing"), TRUNK2)
    ringing = only(SOFTSWITCH, out)
    assert isinstance(ringing, Response) and ringing.status == 180
    assert [v.branch for v in ringing.vias] == ["z9hG4bKuac1"]
    out = h.feed(response_to(raw2, 200, "OK"), TRUNK2)
    ok = only(SOFTSWITCH, out)
    assert isinstance(ok, Response) and ok.status == 200
    assert is_our_record_route(ok.get("record-route"), emergency=True)
    completed = h.event(CallCompleted)
    assert completed == [
        CallCompleted("call-1@192.0.2.10", "INVITE", True, 200, "sip:198.51.100.2:5060")
    ]


@pytest.mark.parametrize("status", [408, 500, 503, 600, 603])
def test_failover_statuses(status: int) -> None:
    h = make_core()
    _, raw = start_emergency(h)
    out = h.feed(response_to(raw, status, "Failed"), TRUNK1)
    assert len(to(TRUNK2, out)) == 1


@pytest.mark.parametrize("status", [404, 486])
def test_other_failures_go_upstream_without_failover(status: int) -> None:
    h = make_core()
    _, raw = start_emergency(h)
    out = h.feed(response_to(raw, status, "No"), TRUNK1)
    assert to(TRUNK2, out) == []
    final = only(SOFTSWITCH, out)
    assert isinstance(final, Response) and final.status == status


def test_failover_when_the_first_trunk_is_silent() -> None:
    h = make_core()
    sent, raw = start_emergency(h)
    out = h.advance(1.9)
    assert to(TRUNK2, out) == []
    assert [m.method for m in to(TRUNK1, out)] == ["INVITE", "INVITE"]  # type: ignore[union-attr]
    out = h.advance(0.2)
    second = only(TRUNK2, out)
    assert isinstance(second, Request) and second.method == "INVITE"
    assert [(f.reason) for f in h.event(Failover)] == ["no_provisional"]  # type: ignore[union-attr]
    # The silent trunk wakes up: it is cancelled, never answered upstream.
    out = h.feed(response_to(raw, 180, "Ringing"), TRUNK1)
    cancel = only(TRUNK1, out)
    assert isinstance(cancel, Request) and cancel.method == "CANCEL"
    assert cancel.vias[0].branch == sent.vias[0].branch
    assert to(SOFTSWITCH, out) == []


def test_the_last_trunk_is_waited_for_until_timer_b() -> None:
    h = make_core(emergency_trunks=("sip:198.51.100.1:5060",))
    start_emergency(h)
    assert h.advance(31.0) and to(SOFTSWITCH, h.advance(0.5)) == []
    out = h.advance(1.0)
    finals = to(SOFTSWITCH, out)
    # The 408 and, over UDP, its Timer G retransmission until the caller ACKs.
    assert [m.status for m in finals] == [408, 408]  # type: ignore[union-attr]
    assert h.event(CallCompleted)[-1].status == 408  # type: ignore[union-attr]


def test_every_trunk_503_gives_500_upstream() -> None:
    h = make_core()
    _, raw = start_emergency(h)
    out = h.feed(response_to(raw, 503, "Unavailable"), TRUNK1)
    raw2 = [o.data for o in out if o.peer.host == TRUNK2.host][0]
    out = h.feed(response_to(raw2, 503, "Unavailable"), TRUNK2)
    final = only(SOFTSWITCH, out)
    assert isinstance(final, Response) and final.status == 500  # RFC 3261 §16.7 step 6


def test_transport_error_fails_over() -> None:
    h = make_core()
    sent, _ = start_emergency(h)
    h.core.transport_error(sent.vias[0].branch or "", h.now)
    out = h.collect()
    assert len(to(TRUNK2, out)) == 1
    assert [f.reason for f in h.event(Failover)] == ["transport"]  # type: ignore[union-attr]


def test_100_is_absorbed_and_stops_failover() -> None:
    h = make_core()
    _, raw = start_emergency(h)
    out = h.feed(response_to(raw, 100, "Trying"), TRUNK1)
    assert out == []
    assert to(TRUNK2, h.advance(5.0)) == []


def test_timer_c_cancels_a_branch_that_rings_forever() -> None:
    h = make_core()
    _, raw = start_emergency(h)
    h.feed(response_to(raw, 180, "Ringing"), TRUNK1)
    out = h.advance(184.0)
    assert [m for m in to(TRUNK1, out) if isinstance(m, Request)] == []
    out = h.advance(2.0)
    cancels = [m for m in to(TRUNK1, out) if isinstance(m, Request) and m.method == "CANCEL"]
    # One CANCEL transaction (retransmitted by Timer E while the trunk stays silent).
    assert cancels and len({c.top_via.branch for c in cancels}) == 1


def test_late_2xx_retransmission_is_forwarded() -> None:
    h = make_core()
    _, raw = start_emergency(h)
    ok = response_to(raw, 200, "OK")
    h.feed(ok, TRUNK1)
    out = h.feed(ok, TRUNK1)
    again = only(SOFTSWITCH, out)
    assert isinstance(again, Response) and again.status == 200


# -- CANCEL ------------------------------------------------------------------------------


def cancel_for(data: bytes) -> bytes:
    message = parse(data)
    lines = [f"CANCEL {message.uri} SIP/2.0"]  # type: ignore[union-attr]
    for h in message.headers:
        if h.key in ("via", "from", "to", "call-id", "max-forwards"):
            lines.append(h.raw)
    lines += ["CSeq: 1 CANCEL", "Content-Length: 0"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def test_cancel_after_ringing_reaches_the_trunk_and_487_comes_back() -> None:
    h = make_core()
    request = invite()
    _, raw = start_emergency(h, request)
    h.feed(response_to(raw, 180, "Ringing"), TRUNK1)
    out = h.feed(cancel_for(request))
    ok = only(SOFTSWITCH, out)
    assert isinstance(ok, Response) and (ok.status, ok.cseq[1]) == (200, "CANCEL")
    cancel = only(TRUNK1, out)
    assert isinstance(cancel, Request) and cancel.method == "CANCEL"
    out = h.feed(response_to(raw, 487, "Request Terminated"), TRUNK1)
    final = only(SOFTSWITCH, out)
    assert isinstance(final, Response) and final.status == 487
    ack = [m for m in to(TRUNK1, out) if isinstance(m, Request)]
    assert [m.method for m in ack] == ["ACK"]
    # The caller's ACK for the 487 is absorbed here (hop by hop).
    ack_up = cancel_for(request).replace(b"CANCEL sip", b"ACK sip").replace(b"1 CANCEL", b"1 ACK")
    assert h.feed(ack_up) == []


def test_cancel_before_the_lookup_finishes_answers_487_at_once() -> None:
    h = make_core()
    request = invite()
    h.feed(request)
    out = h.feed(cancel_for(request))
    statuses = sorted(m.status for m in to(SOFTSWITCH, out))  # type: ignore[union-attr]
    assert statuses == [200, 487]
    call = h.emergency()
    h.core.forward_emergency(call.call, call.request, h.now)
    assert h.collect() == []
    assert to(TRUNK1, h.advance(1.0)) == []


def test_cancel_without_a_transaction_is_not_routed_nowhere() -> None:
    h = make_core()
    out = h.feed(cancel_for(invite(branch="z9hG4bKunknown")))
    assert out == []
    assert [e.reason for e in h.event(Discarded)] == ["no_transaction"]  # type: ignore[union-attr]


# -- RFC 3261 proxy rules ----------------------------------------------------------------


def test_max_forwards_zero_is_answered_483() -> None:
    h = make_core()
    out = h.feed(invite(max_forwards=0))
    statuses = [m.status for m in to(SOFTSWITCH, out)]  # type: ignore[union-attr]
    assert statuses == [483]  # no 100 before a final response made at once
    assert to(TRUNK1, h.advance(1.0)) == []


def test_retransmitted_invite_is_absorbed() -> None:
    h = make_core()
    request = invite()
    _, _ = start_emergency(h, request)
    out = h.feed(request)
    assert to(TRUNK1, out) == []
    assert [m.status for m in to(SOFTSWITCH, out)] == [100]  # type: ignore[union-attr]
    assert len(h.event(EmergencyCall)) == 1


def test_non_emergency_invite_goes_to_the_default_trunk_unchanged() -> None:
    h = make_core()
    request = invite("sip:4075550100@192.0.2.1:5070;user=phone", extra="Priority: normal\r\n")
    out = h.feed(request)
    sent = only(DEFAULT, out)
    assert isinstance(sent, Request)
    assert sent.uri == "sip:4075550100@192.0.2.1:5070;user=phone"
    assert sent.get("priority") == "normal"
    assert not sent.has("geolocation")
    original = parse(request)
    kept = [h.raw for h in original.headers if h.key not in ("max-forwards",)]
    forwarded = [h.raw for h in sent.headers]
    for raw in kept:
        assert raw in forwarded
    assert h.event(RequestRouted) == [RequestRouted("INVITE", Route.DEFAULT)]
    assert h.event(EmergencyCall) == []


def test_options_to_the_edge_itself_is_answered_here() -> None:
    h = make_core()
    options = (
        b"OPTIONS sip:192.0.2.1:5070 SIP/2.0\r\n"
        b"Via: SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bKo1\r\n"
        b"Max-Forwards: 70\r\nFrom: <sip:ping@192.0.2.10>;tag=p1\r\nTo: <sip:192.0.2.1:5070>\r\n"
        b"Call-ID: ping-1\r\nCSeq: 7 OPTIONS\r\nContent-Length: 0\r\n\r\n"
    )
    out = h.feed(options)
    reply = only(SOFTSWITCH, out)
    assert isinstance(reply, Response) and reply.status == 200
    assert to(DEFAULT, out) == []


def test_in_dialog_bye_is_loose_routed_to_its_request_uri() -> None:
    h = make_core()
    bye = (
        b"BYE sip:911@198.51.100.1:5060 SIP/2.0\r\n"
        b"Via: SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bKbye1\r\n"
        b"Route: <sip:192.0.2.1:5070;lr>\r\nMax-Forwards: 70\r\n"
        b"From: <sip:3215551234@192.0.2.10>;tag=uac-tag\r\nTo: <sip:911@192.0.2.1>;tag=uas-tag\r\n"
        b"Call-ID: call-1@192.0.2.10\r\nCSeq: 2 BYE\r\nContent-Length: 0\r\n\r\n"
    )
    out = h.feed(bye)
    sent = only(TRUNK1, out)
    assert isinstance(sent, Request) and sent.method == "BYE"
    assert not sent.has("route")
    assert h.event(RequestRouted) == [RequestRouted("BYE", Route.IN_DIALOG)]
    raw = [o.data for o in out if o.peer.host == TRUNK1.host][0]
    out = h.feed(response_to(raw, 200, "OK"), TRUNK1)
    ok = only(SOFTSWITCH, out)
    assert isinstance(ok, Response) and ok.status == 200 and ok.cseq == (2, "BYE")


def test_ack_for_2xx_is_forwarded_statelessly_along_its_route() -> None:
    h = make_core()
    ack = (
        b"ACK sip:911@198.51.100.1:5060 SIP/2.0\r\n"
        b"Via: SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bKack1\r\n"
        b"Route: <sip:192.0.2.1:5070;lr>\r\nMax-Forwards: 70\r\n"
        b"From: <sip:3215551234@192.0.2.10>;tag=uac-tag\r\nTo: <sip:911@192.0.2.1>;tag=uas-tag\r\n"
        b"Call-ID: call-1@192.0.2.10\r\nCSeq: 1 ACK\r\nContent-Length: 0\r\n\r\n"
    )
    first = only(TRUNK1, h.feed(ack))
    again = only(TRUNK1, h.feed(ack))
    assert isinstance(first, Request) and isinstance(again, Request)
    assert first.vias[0].branch == again.vias[0].branch  # stateless: same branch each time
    assert h.core.transactions_in_flight == 0


def test_responses_to_tcp_requests_go_back_on_their_connection() -> None:
    h = make_core()
    source = Peer("tcp", "192.0.2.10", 40001, connection=7)
    h.feed(invite(transport="TCP"), source)
    call = h.emergency()
    h.core.forward_emergency(call.call, call.request, h.now)
    out = h.collect()
    assert [o.peer for o in out if o.data.startswith(b"SIP/2.0 100 ")] == [source]


def test_transport_change_writes_a_double_record_route() -> None:
    h = make_core(emergency_trunks=("sip:198.51.100.1:5060;transport=tcp",))
    h.feed(invite())
    call = h.emergency()
    h.core.forward_emergency(call.call, call.request, h.now)
    out = h.collect()
    sent = parse(out[0].data)
    assert out[0].peer.transport == "tcp"
    assert isinstance(sent, Request) and sent.uri == "sip:911@198.51.100.1:5060;transport=tcp"
    tcp, udp = sent.values("record-route")
    assert is_our_record_route(tcp, emergency=True, transport=";transport=tcp")
    assert is_our_record_route(udp, emergency=True)
    assert tcp.split(";dlg=")[1] == udp.split(";dlg=")[1]
    assert sent.vias[0].transport == "TCP"


def test_pass_through_transport_change_writes_a_double_record_route() -> None:
    h = make_core(default_trunks=("sip:203.0.113.5:5060;transport=tcp",))
    out = h.feed(invite("sip:3215550000@192.0.2.1:5070"))
    sent = [parse(o.data) for o in out if o.peer.host == "203.0.113.5"]
    assert len(sent) == 1 and isinstance(sent[0], Request)
    tcp, udp = sent[0].values("record-route")
    assert is_our_record_route(tcp, emergency=False, transport=";transport=tcp")
    assert is_our_record_route(udp, emergency=False)
    assert tcp.split(";dlg=")[1] == udp.split(";dlg=")[1]


def test_each_default_branch_writes_one_record_route() -> None:
    h = make_core(default_trunks=("sip:203.0.113.5:5060", "sip:203.0.113.6:5060"))
    out = h.feed(invite("sip:3215550000@192.0.2.1:5070"))
    first = [o.data for o in out if o.peer.host == "203.0.113.5"][0]
    out = h.feed(response_to(first, 503, "Service Unavailable"), Peer("udp", "203.0.113.5", 5060))
    second = [parse(o.data) for o in out if o.peer.host == "203.0.113.6"]
    assert len(second) == 1 and isinstance(second[0], Request)
    sent = parse(first)
    assert isinstance(sent, Request)
    assert sent.values("record-route") == second[0].values("record-route")
    assert len(sent.values("record-route")) == 1
    assert is_our_record_route(sent.get("record-route"), emergency=False)


def test_rport_and_received_are_stamped_on_the_callers_via() -> None:
    h = make_core()
    nat = Peer("udp", "203.0.113.77", 31000)
    data = invite().replace(b"branch=z9hG4bKuac1", b"branch=z9hG4bKuac1;rport")
    h.feed(data, nat)
    out = h.advance(0.2)  # the held 100 Trying goes at its deadline
    trying = parse(out[0].data)
    assert isinstance(trying, Response) and trying.status == 100
    assert out[0].peer == Peer("udp", "203.0.113.77", 31000)
    assert trying.top_via.param("received") == "203.0.113.77"
    assert trying.top_via.param("rport") == "31000"


def test_malformed_request_is_answered_400_and_garbage_dropped() -> None:
    h = make_core()
    bad = invite().replace(b"CSeq: 1 INVITE", b"CSeq: x INVITE")
    out = h.feed(bad)
    assert len(out) == 1 and out[0].peer == SOFTSWITCH
    # The reply copies the broken CSeq as received, so it is checked as bytes.
    assert out[0].data.startswith(b"SIP/2.0 400 ")
    assert b"CSeq: x INVITE\r\n" in out[0].data
    assert h.feed(b"\x00\x01garbage") == []
    reasons = [e.reason for e in h.event(Discarded)]  # type: ignore[union-attr]
    assert reasons == ["malformed", "unparsable"]


def test_stray_response_is_discarded() -> None:
    h = make_core()
    stray = response_to(invite(branch="z9hG4bKnotours"), 200, "OK")
    assert h.feed(stray, TRUNK1) == []
    assert [e.reason for e in h.event(Discarded)] == ["stray_response"]  # type: ignore[union-attr]


def test_state_is_released_after_a_call() -> None:
    h = make_core()
    request = invite()
    _, raw = start_emergency(h, request)
    h.feed(response_to(raw, 200, "OK"), TRUNK1)
    h.advance(40.0)
    assert h.core.transactions_in_flight == 0
    assert h.core.contexts_in_flight == 0


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300), st.integers(min_value=0, max_value=500))
def test_receive_never_raises(noise: bytes, cut: int) -> None:
    h = make_core()
    data = invite()
    h.feed(data[:cut] + noise + data[cut + len(noise) :])
    h.advance(1.0)


def test_calls_leave_no_reference_cycles() -> None:
    """The edge freezes surviving objects out of the garbage collector's reach (app.py),
    which is only safe while everything the core drops is freed by reference counting."""
    h = make_core()
    gc.collect()
    gc.disable()
    try:
        for n in range(20):
            request = invite(branch=f"z9hG4bKcycle{n}", call_id=f"cycle-{n}@192.0.2.10")
            _, raw = start_emergency(h, request)
            if n % 4 == 0:
                h.feed(response_to(raw, 503, "Unavailable"), TRUNK1)  # failover branch
                raw = [o.data for o in h.sent if o.peer.host == TRUNK2.host][-1]
                h.feed(response_to(raw, 180, "Ringing"), TRUNK2)
                h.feed(cancel_for(request))
                h.feed(response_to(raw, 487, "Request Terminated"), TRUNK2)
            else:
                h.feed(response_to(raw, 180, "Ringing"), TRUNK1)
                h.feed(response_to(raw, 200, "OK"), TRUNK1)
        h.advance(70.0)
        assert h.core.transactions_in_flight == 0 and h.core.contexts_in_flight == 0
        h.sent.clear()
        h.events.clear()
        unreachable = gc.collect()
    finally:
        gc.enable()
    assert unreachable == 0


def test_emergency_invite_with_a_preloaded_route_still_goes_to_the_emergency_trunk() -> None:
    h = make_core()
    routes = "Route: <sip:192.0.2.1:5070;lr>, <sip:203.0.113.99:5060;lr>\r\n"
    h.feed(invite(extra=routes))
    assert h.event(RequestRouted) == [RequestRouted("INVITE", Route.EMERGENCY)]
    sent, _ = start_emergency_after(h, h.emergency())
    assert sent.uri == "sip:911@198.51.100.1:5060"
    assert not sent.has("route")


def test_initial_request_with_a_preloaded_route_follows_it_and_record_routes() -> None:
    h = make_core()
    routes = "Route: <sip:192.0.2.1:5070;lr>, <sip:203.0.113.99:5060;lr>\r\n"
    out = h.feed(invite("sip:4075550100@192.0.2.1:5070", extra=routes))
    sent = only(Peer("udp", "203.0.113.99", 5060), out)
    assert isinstance(sent, Request)
    assert sent.values("route") == ["<sip:203.0.113.99:5060;lr>"]
    assert is_our_record_route(sent.get("record-route"), emergency=False)
    assert h.event(RequestRouted) == [RequestRouted("INVITE", Route.ROUTE_SET)]
    # Its answer is reported, so a drain waits for the dialog's BYE as for any other call.
    raw = [o.data for o in out if o.peer == Peer("udp", "203.0.113.99", 5060)][0]
    h.feed(response_to(raw, 200, "OK"), Peer("udp", "203.0.113.99", 5060))
    (completed,) = h.event(CallCompleted)
    assert (completed.method, completed.emergency, completed.status) == ("INVITE", False, 200)


def test_transport_error_on_an_in_dialog_request_answers_408() -> None:
    h = make_core()
    bye = (
        b"BYE sip:911@198.51.100.1:5060 SIP/2.0\r\n"
        b"Via: SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bKbye9\r\n"
        b"Route: <sip:192.0.2.1:5070;lr>\r\nMax-Forwards: 70\r\n"
        b"From: <sip:3215551234@192.0.2.10>;tag=uac-tag\r\nTo: <sip:911@192.0.2.1>;tag=uas-tag\r\n"
        b"Call-ID: call-9@192.0.2.10\r\nCSeq: 2 BYE\r\nContent-Length: 0\r\n\r\n"
    )
    sent = only(TRUNK1, h.feed(bye))
    assert isinstance(sent, Request)
    h.core.transport_error(sent.vias[0].branch or "", h.now)
    final = only(SOFTSWITCH, h.collect())
    assert isinstance(final, Response) and (final.status, final.cseq[1]) == (408, "BYE")


def test_a_424_retries_the_same_trunk_without_our_location_and_never_goes_upstream() -> None:
    h = make_core()
    h.feed(invite())
    call = h.emergency()
    enriched = (
        call.request.replace("Priority", "emergency")
        .append("Geolocation", "<https://emergency.bandwidth.com/locations/5555555/e1>")
        .append("Geolocation-Routing", "no")
    )
    h.core.forward_emergency(call.call, enriched, h.now)
    out = h.collect()
    first = only(TRUNK1, out)
    assert first.has("geolocation")
    raw = [o.data for o in out if o.peer.host == TRUNK1.host][0]
    out = h.feed(response_to(raw, 424, "Bad Location Information"), TRUNK1)
    again = [m for m in to(TRUNK1, out) if isinstance(m, Request) and m.method == "INVITE"]
    assert len(again) == 1
    assert not again[0].has("geolocation") and not again[0].has("geolocation-routing")
    assert again[0].get("priority") == "emergency"
    upstream = [m for m in to(SOFTSWITCH, out) if isinstance(m, Response) and m.status >= 300]
    assert upstream == []
    assert [e.reason for e in h.event(Failover)] == ["424"]  # type: ignore[union-attr]
    # Refused again, now without any location: the caller gets 500, never a 424.
    raw = [o.data for o in out if o.peer.host == TRUNK1.host and o.data.startswith(b"INVITE")][0]
    out = h.feed(response_to(raw, 424, "Bad Location Information"), TRUNK1)
    final = [m for m in to(SOFTSWITCH, out) if isinstance(m, Response) and m.status >= 300]
    assert [m.status for m in final] == [500]  # type: ignore[union-attr]


def test_has_data_to_send_says_whether_data_to_send_would_give_anything() -> None:
    h = make_core()
    core = h.core
    assert not core.has_data_to_send()
    core.receive(invite(), SOFTSWITCH, h.now)
    assert not core.has_data_to_send()  # the 100 Trying is held for the INVITE
    assert core.data_to_send() == []
    events = []
    while (event := core.next_event()) is not None:
        events.append(event)
        assert not core.has_data_to_send()  # handing events over queues nothing
    call = [e for e in events if isinstance(e, EmergencyCall)][0]
    core.forward_emergency(call.call, call.request, h.now)
    assert core.has_data_to_send()
    out = core.data_to_send()
    assert [o.peer.host for o in out] == [TRUNK1.host, SOFTSWITCH.host]  # INVITE, then 100
    assert not core.has_data_to_send() and core.data_to_send() == []
    core.receive(response_to(out[0].data, 100, "Trying"), TRUNK1, h.now)
    assert not core.has_data_to_send()  # a 100 from the trunk goes nowhere
    core.receive(response_to(out[0].data, 180, "Ringing"), TRUNK1, h.now)
    assert core.has_data_to_send()
    assert len(core.data_to_send()) == 1


def test_events_come_out_in_order_when_more_arrive_before_all_are_collected() -> None:
    h = make_core()
    core = h.core
    core.receive(invite(), SOFTSWITCH, h.now)
    first = core.next_event()
    assert isinstance(first, RequestRouted) and first.route is Route.EMERGENCY
    core.receive(invite(branch="z9hG4bKuac2", call_id="call-2@192.0.2.10"), SOFTSWITCH, h.now)
    rest = []
    while (event := core.next_event()) is not None:
        rest.append(event)
    assert [type(e) for e in rest] == [EmergencyCall, RequestRouted, EmergencyCall]
    assert [e.call_id for e in rest if isinstance(e, EmergencyCall)] == [
        "call-1@192.0.2.10",
        "call-2@192.0.2.10",
    ]
    assert core.next_event() is None
    core.receive(b"garbage\r\n\r\n", SOFTSWITCH, h.now)
    assert isinstance(core.next_event(), Discarded) and core.next_event() is None
