"""The trust domain: who may have what relayed, and which responses are believed."""

from __future__ import annotations

import ipaddress

import pytest

from e911_sip.proxy.core import Discarded, EmergencyCall, RequestRouted
from e911_sip.proxy.trust import TrunkDialogs, Trust, TrustPolicy
from e911_sip.sip.message import Request, Response, parse
from e911_sip.sip.peer import Peer
from tests.unit.proxy.test_core import (
    DEFAULT,
    SOFTSWITCH,
    TRUNK1,
    TRUNK2,
    invite,
    make_core,
    only,
    response_to,
    start_emergency,
    to,
)

pytestmark = pytest.mark.usefixtures("core_paths")

OUTSIDER = Peer("udp", "192.0.2.200", 5060)
"""An address outside the trust domain (the tests trust 192.0.2.0/25 only)."""
TRUSTED = ("192.0.2.0/25",)


def reasons(h: object) -> list[str]:
    return [e.reason for e in h.event(Discarded)]  # type: ignore[attr-defined]


def in_dialog(
    method: str,
    *,
    ruri: str = "sip:3215551234@192.0.2.10:5060",
    call_id: str = "call-1@192.0.2.10",
    via_host: str = "198.51.100.1",
    extra: str = "",
) -> bytes:
    return (
        f"{method} {ruri} SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP {via_host}:5060;branch=z9hG4bK{method.lower()}in\r\n"
        "Route: <sip:192.0.2.1:5070;lr>\r\nMax-Forwards: 70\r\n"
        "From: <sip:911@198.51.100.1>;tag=uas-tag\r\n"
        "To: <sip:3215551234@192.0.2.10>;tag=uac-tag\r\n"
        f"Call-ID: {call_id}\r\nCSeq: 7 {method}\r\n{extra}Content-Length: 0\r\n\r\n"
    ).encode()


# -- sources outside the trust domain -----------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        invite(),
        invite(ruri="sip:2125550100@192.0.2.1:5070", extra="Route: <sip:203.0.113.200;lr>\r\n"),
        in_dialog("MESSAGE", ruri="sip:x@203.0.113.200:5060", via_host="192.0.2.200"),
        in_dialog("ACK", ruri="sip:x@203.0.113.200:5060", via_host="192.0.2.200"),
        in_dialog("CANCEL", ruri="sip:x@203.0.113.200:5060", via_host="192.0.2.200"),
        invite(ruri="sip:192.0.2.1:5070").replace(b"INVITE", b"OPTIONS"),
    ],
    ids=["911", "routed-invite", "message", "ack", "cancel", "options"],
)
def test_nothing_from_an_outsider_is_relayed_or_answered(data: bytes) -> None:
    h = make_core(trusted=TRUSTED)
    assert h.feed(data, OUTSIDER) == []
    assert reasons(h) == ["untrusted_source"]
    assert h.core.transactions_in_flight == 0 and h.core.contexts_in_flight == 0
    assert not h.event(EmergencyCall) and not h.event(RequestRouted)
    assert h.advance(64.0) == []  # no retransmission cycle either


def test_reject_answers_403_once_to_the_source_without_a_transaction() -> None:
    h = make_core(trusted=TRUSTED, reject_untrusted=True)
    out = h.feed(invite(), OUTSIDER)
    assert len(out) == 1 and out[0].peer == OUTSIDER
    reply = parse(out[0].data)
    assert isinstance(reply, Response) and reply.status == 403
    assert h.core.transactions_in_flight == 0
    assert h.advance(64.0) == []
    # An ACK is never answered.
    assert h.feed(in_dialog("ACK", via_host="192.0.2.200"), OUTSIDER) == []


def test_reject_tags_are_fresh_each_time() -> None:
    h = make_core(trusted=TRUSTED, reject_untrusted=True)
    tags = set()
    for n in range(20):
        out = h.feed(invite(branch=f"z9hG4bKx{n}", call_id=f"c{n}"), OUTSIDER)
        tags.add(parse(out[0].data).to_tag)
    assert len(tags) == 20


def test_the_trust_domain_itself_is_served() -> None:
    h = make_core(trusted=TRUSTED)
    sent, _ = start_emergency(h)
    assert sent.method == "INVITE"
    assert reasons(h) == []


# -- trunks -------------------------------------------------------------------------------


def answered_call(h: object) -> None:
    _, raw = start_emergency(h)  # type: ignore[arg-type]
    h.feed(response_to(raw, 200, "OK"), TRUNK1)  # type: ignore[attr-defined]


def test_a_trunk_may_send_in_a_dialog_it_answered_without_identity_headers() -> None:
    h = make_core(trusted=TRUSTED)
    answered_call(h)
    bye = in_dialog(
        "BYE",
        extra=(
            "P-Asserted-Identity: <sip:3215551000@198.51.100.1>\r\nPrivacy: id\r\n"
            "Geolocation: <https://attacker.example/loc>\r\nGeolocation-Routing: yes\r\n"
            "X-Other: kept\r\n"
        ),
    )
    sent = only(SOFTSWITCH, h.feed(bye, TRUNK1))
    assert isinstance(sent, Request) and sent.method == "BYE"
    for name in ("p-asserted-identity", "privacy", "geolocation", "geolocation-routing"):
        assert not sent.has(name), name
    assert sent.get("x-other") == "kept"


def test_a_trunk_may_not_send_in_a_dialog_it_did_not_answer() -> None:
    h = make_core(trusted=TRUSTED)
    answered_call(h)
    assert to(SOFTSWITCH, h.feed(in_dialog("BYE"), TRUNK2)) == []
    assert to(SOFTSWITCH, h.feed(in_dialog("BYE", call_id="other-call"), TRUNK1)) == []
    assert reasons(h) == ["untrusted_dialog", "untrusted_dialog"]


def test_a_trunk_in_dialog_request_is_not_followed_off_the_trust_domain() -> None:
    h = make_core(trusted=TRUSTED)
    answered_call(h)
    out = h.feed(in_dialog("INFO", ruri="sip:victim@203.0.113.200:5060"), TRUNK1)
    assert to(Peer("udp", "203.0.113.200", 5060), out) == []
    assert reasons(h) == ["untrusted_target"]


def test_a_trunk_may_not_start_a_call_but_may_ping_us() -> None:
    h = make_core(trusted=TRUSTED)
    assert h.feed(invite(), TRUNK1) == []
    assert reasons(h) == ["untrusted_initial"]
    ping = (
        b"OPTIONS sip:192.0.2.1:5070 SIP/2.0\r\n"
        b"Via: SIP/2.0/UDP 198.51.100.1:5060;branch=z9hG4bKping\r\nMax-Forwards: 70\r\n"
        b"From: <sip:ping@198.51.100.1>;tag=p\r\nTo: <sip:192.0.2.1:5070>\r\n"
        b"Call-ID: ping-1\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n"
    )
    reply = only(TRUNK1, h.feed(ping, TRUNK1))
    assert isinstance(reply, Response) and reply.status == 200


def test_a_dialog_that_failed_or_ended_closes_to_the_trunk() -> None:
    h = make_core(trusted=TRUSTED)
    _, raw = start_emergency(h)
    h.feed(response_to(raw, 180, "Ringing"), TRUNK1)
    h.feed(response_to(raw, 486, "Busy Here"), TRUNK1)
    assert to(SOFTSWITCH, h.feed(in_dialog("BYE"), TRUNK1)) == []
    assert reasons(h) == ["untrusted_dialog"]


# -- responses ----------------------------------------------------------------------------


def test_a_forged_response_from_elsewhere_does_not_end_the_call() -> None:
    h = make_core(trusted=TRUSTED)
    _, raw = start_emergency(h)
    forged = response_to(raw, 503, "Service Unavailable")
    for source in (OUTSIDER, Peer("udp", TRUNK1.host, 40000), Peer("tcp", TRUNK1.host, 5060)):
        assert h.feed(forged, source) == []
    assert reasons(h) == ["response_source"] * 3
    assert to(TRUNK2, h.collect()) == []  # no failover happened
    ok = only(SOFTSWITCH, h.feed(response_to(raw, 200, "OK"), TRUNK1))
    assert isinstance(ok, Response) and ok.status == 200


def test_a_response_with_our_branch_prefix_is_never_relayed_statelessly() -> None:
    h = make_core(trusted=TRUSTED)
    _, raw = start_emergency(h)
    branch = parse(raw).vias[0].branch
    assert branch is not None
    guessed = response_to(raw, 200, "OK").replace(branch.encode(), branch[:-1].encode() + b"Z")
    assert h.feed(guessed, TRUNK1) == []
    assert reasons(h) == ["stray_response"]


def test_default_trunk_responses_are_checked_too() -> None:
    h = make_core(trusted=TRUSTED)
    out = h.feed(invite(ruri="sip:2125550100@192.0.2.1:5070"))
    raw = [o.data for o in out if o.peer.host == DEFAULT.host][0]
    assert h.feed(response_to(raw, 486, "Busy"), TRUNK1) == []
    busy = only(SOFTSWITCH, h.feed(response_to(raw, 486, "Busy"), DEFAULT))
    assert isinstance(busy, Response) and busy.status == 486


# -- the caller's own location ------------------------------------------------------------


DEVICE_LOCATION = "Geolocation: <https://attacker.example/loc/1>\r\nGeolocation-Routing: yes\r\n"


def test_a_location_we_did_not_write_is_removed_before_enrichment() -> None:
    h = make_core()
    h.feed(invite(extra=DEVICE_LOCATION))
    call = h.emergency()
    assert not call.request.has("geolocation")
    assert not call.request.has("geolocation-routing")
    assert call.removed_geolocation == ("<https://attacker.example/loc/1>",)
    # Even if the owner never answers, the fail-open copy does not carry it.
    out = h.advance(0.6)  # past the fail-open deadline, before Timer A
    sent = only(TRUNK1, out)
    assert not sent.has("geolocation") and not sent.has("geolocation-routing")


def test_device_location_is_kept_when_configured() -> None:
    h = make_core(keep_device_geolocation=True)
    h.feed(invite(extra=DEVICE_LOCATION))
    call = h.emergency()
    assert call.request.get("geolocation") == "<https://attacker.example/loc/1>"
    assert call.removed_geolocation == ()


# -- the pure parts -----------------------------------------------------------------------


def test_trust_policy_levels() -> None:
    policy = TrustPolicy(
        trusted_sources=[ipaddress.ip_network("10.1.0.0/16"), ipaddress.ip_network("fd00::/8")],
        trunk_hosts=["198.51.100.1", "[2001:db8::5]"],
    )
    assert policy.classify("10.1.2.3") is Trust.SOFTSWITCH
    assert policy.classify("::ffff:10.1.2.3") is Trust.SOFTSWITCH
    assert policy.classify("fd00::1") is Trust.SOFTSWITCH
    assert policy.classify("198.51.100.1") is Trust.TRUNK
    assert policy.classify("2001:db8::5") is Trust.TRUNK
    assert policy.classify("10.2.0.1") is Trust.OUTSIDER
    assert policy.classify("pbx.example.com") is Trust.OUTSIDER
    assert policy.is_trusted("10.1.0.1") and not policy.is_trusted("198.51.100.1")
    assert policy.may_receive("198.51.100.1") and not policy.may_receive("203.0.113.1")


def test_trust_policy_cache_is_bounded() -> None:
    policy = TrustPolicy(cache_size=16)
    for n in range(1000):
        assert policy.classify(f"203.0.113.{n % 250}") is Trust.OUTSIDER
    assert len(policy._cache) <= 16
    assert policy.classify("127.0.0.1") is Trust.SOFTSWITCH


def test_trunk_dialogs_are_bounded_and_emergency_ones_go_last() -> None:
    table = TrunkDialogs(max_entries=3, max_age=100.0)
    table.add("e1", "t", 0.0, emergency=True)
    table.add("o1", "t", 0.0, emergency=False)
    table.add("o2", "t", 0.0, emergency=False)
    table.add("o3", "t", 0.0, emergency=False)
    assert len(table) == 3 and table.evicted == 1
    assert table.allows("e1", "t", 1.0) and not table.allows("o1", "t", 1.0)
    table.add("e2", "t", 1.0, emergency=True)
    table.add("e3", "t", 1.0, emergency=True)
    assert len(table) == 3
    assert all(table.allows(c, "t", 2.0) for c in ("e1", "e2", "e3"))


def test_trunk_dialogs_age_out_and_end() -> None:
    table = TrunkDialogs(max_entries=10, max_age=100.0)
    table.add("a", "t", 0.0, emergency=False)
    assert not table.allows("a", "other-host", 1.0)
    assert table.allows("a", "t", 50.0)  # refreshed
    assert table.allows("a", "t", 140.0)
    assert not table.allows("a", "t", 300.0)
    table.add("b", "t", 300.0, emergency=False)
    table.end("b")
    assert not table.allows("b", "t", 301.0)
    table.add("c", "t", 1000.0, emergency=False)
    assert len(table) == 1  # "a" expired on the way


def test_an_outsider_is_not_even_parsed_but_a_response_from_anywhere_is_matched() -> None:
    h = make_core(trusted=TRUSTED)
    for junk in (b"\x00\xff garbage", b"INVITE sip:911@x SIP/2.0\r\nContent-Length: 9" * 3):
        assert h.feed(junk, OUTSIDER) == []
    assert reasons(h) == ["untrusted_source", "untrusted_source"]
    # The same garbage from the softswitch is parsed, and answered where it can be.
    out = h.feed(invite().replace(b"CSeq: 1 INVITE", b"CSeq: one INVITE"))
    assert [o.data[:12] for o in out] == [b"SIP/2.0 400 "]
    # A response from an outsider still reaches matching: it is dropped there, by address.
    _, raw = start_emergency(h)
    assert h.feed(response_to(raw, 503, "Forged"), OUTSIDER) == []
    assert reasons(h)[-1] == "response_source"


def test_a_psap_callback_marking_is_not_relayed() -> None:
    h = make_core()
    out = h.feed(invite(ruri="sip:2125550100@192.0.2.1:5070", extra="Priority: psap-callback\r\n"))
    sent = only(DEFAULT, out)
    assert not sent.has("priority")
    out = h.feed(
        invite(
            ruri="sip:2125550101@192.0.2.1:5070",
            branch="z9hG4bKu2",
            call_id="c2",
            extra="Priority: urgent\r\n",
        )
    )
    assert only(DEFAULT, out).get("priority") == "urgent"
