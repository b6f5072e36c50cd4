"""The header changes RFC 3261 §16 obliges a proxy to make."""

from __future__ import annotations

import base64
import os
import random

import pytest

from e911_sip.proxy.routing import (
    BranchFactory,
    LocalAddress,
    Tokens,
    add_record_route,
    add_via,
    decrement_max_forwards,
    next_hop,
    own_routes,
    own_via,
    pop_own_routes,
    route_stamp,
    stamp_received,
)
from e911_sip.sip.errors import MalformedMessage, TooManyHops
from e911_sip.sip.message import Request, parse
from e911_sip.sip.peer import Peer

UDP = LocalAddress("udp", "192.0.2.1", 5070)
TCP = LocalAddress("tcp", "192.0.2.1", 5070)


def request(*extra: str, via: str = "SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bKa") -> Request:
    lines = [
        "BYE sip:911@198.51.100.1:5060 SIP/2.0",
        f"Via: {via}",
        "From: <sip:a@b>;tag=1",
        "To: <sip:c@d>;tag=2",
        "Call-ID: r",
        "CSeq: 2 BYE",
        *extra,
        "Content-Length: 0",
    ]
    message = parse(("\r\n".join(lines) + "\r\n\r\n").encode())
    assert isinstance(message, Request)
    return message


def test_max_forwards_is_decremented_or_added() -> None:
    assert decrement_max_forwards(request("Max-Forwards: 70")).get("max-forwards") == "69"
    assert decrement_max_forwards(request()).get("max-forwards") == "70"
    with pytest.raises(TooManyHops):
        decrement_max_forwards(request("Max-Forwards: 0"))
    with pytest.raises(MalformedMessage):
        # parse() refuses this already; a request built in code is still checked here.
        decrement_max_forwards(request().append("Max-Forwards", "many"))


def test_max_forwards_keeps_the_header_spelling() -> None:
    out = decrement_max_forwards(request("max-forwards:   9"))
    assert [h.raw for h in out.headers if h.key == "max-forwards"] == ["max-forwards: 8"]


def test_received_and_rport() -> None:
    source = Peer("udp", "203.0.113.9", 40000)
    out = stamp_received(request(via="SIP/2.0/UDP 10.0.0.5:5060;branch=z9hG4bKa;rport"), source)
    via = out.top_via
    assert (via.param("received"), via.param("rport"), via.branch) == (
        "203.0.113.9",
        "40000",
        "z9hG4bKa",
    )
    same = request()
    assert stamp_received(same, Peer("udp", "192.0.2.10", 5060)) is same


def test_received_keeps_further_via_values() -> None:
    via = "SIP/2.0/UDP 10.0.0.5;branch=z9hG4bKa, SIP/2.0/UDP 10.0.0.6;branch=z9hG4bKb"
    out = stamp_received(request(via=via), Peer("udp", "203.0.113.9", 5060))
    assert [v.host for v in out.vias] == ["10.0.0.5", "10.0.0.6"]
    assert out.vias[0].param("received") == "203.0.113.9"


def test_our_via_goes_on_top_with_a_unique_branch() -> None:
    branches = BranchFactory(Tokens(os.urandom))
    first, second = branches.new(), branches.new()
    assert first != second and first.startswith("z9hG4bK")
    out = add_via(request(), UDP, first)
    assert out.vias[0].branch == first and out.vias[0].sent_by == "192.0.2.1:5070"


def test_branches_carry_96_random_bits_and_nothing_shared() -> None:
    # Two processes seeded alike would share nothing: every branch is fresh entropy, with no
    # common prefix or counter a peer could learn from one and use on the next.
    tokens = Tokens(random.Random(7).randbytes)
    branches = BranchFactory(tokens)
    seen = [branches.new()[len("z9hG4bK") :] for _ in range(2000)]
    assert len(set(seen)) == len(seen)
    assert all(len(b) == 24 for b in seen)  # 96 random bits, then a 48-bit keyed digest
    assert len({b[:4] for b in seen}) > 1000
    assert all(c.isalnum() or c in "-_" for b in seen for c in b)


def test_tokens_read_entropy_in_blocks() -> None:
    calls: list[int] = []

    def entropy(n: int) -> bytes:
        calls.append(n)
        return os.urandom(n)

    tokens = Tokens(entropy)
    values = {tokens.token() for _ in range(1000)}
    assert len(values) == 1000
    assert len(calls) <= 4


def test_stateless_branch_is_stable_per_request_and_keyed() -> None:
    branches = BranchFactory(Tokens(os.urandom))
    assert branches.stateless(request()) == branches.stateless(request())
    other = request(via="SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bKz")
    assert branches.stateless(request()) != branches.stateless(other)
    # Another process (another key) derives another branch from the same request.
    assert BranchFactory(Tokens(os.urandom)).stateless(request()) != branches.stateless(request())


def test_record_route_single_and_double() -> None:
    assert add_record_route(request(), UDP, UDP).values("record-route") == [
        "<sip:192.0.2.1:5070;lr>"
    ]
    assert add_record_route(request(), UDP, TCP).values("record-route") == [
        "<sip:192.0.2.1:5070;transport=tcp;lr>",
        "<sip:192.0.2.1:5070;lr>",
    ]


def test_loose_routing_pops_only_our_entries() -> None:
    routes = "Route: <sip:192.0.2.1:5070;transport=tcp;lr>, <sip:192.0.2.1:5070;lr>"
    for own in (None, own_routes((UDP, TCP))):
        edit = request(routes, "Route: <sip:198.51.100.9;lr>").edit()
        first = pop_own_routes(edit, (UDP, TCP), own)
        assert first == "<sip:198.51.100.9;lr>"
        assert edit.done().values("route") == ["<sip:198.51.100.9;lr>"]
        assert next_hop(edit, first).host == "198.51.100.9"
        edit = request(routes).edit()
        first = pop_own_routes(edit, (UDP, TCP), own)
        assert first is None
        assert next_hop(edit, first).host == "198.51.100.1"


def test_own_routes_are_our_record_routes_as_written() -> None:
    assert own_routes((UDP, TCP)) == {
        "<sip:192.0.2.1:5070;lr>",
        "<sip:192.0.2.1:5070;transport=tcp;lr>",
    }


def test_max_forwards_with_non_ascii_digits_is_malformed() -> None:
    # "²".isdigit() is True but int() refuses it: a peer must not be able to crash the core.
    with pytest.raises(MalformedMessage):
        decrement_max_forwards(request().append("Max-Forwards", "\u00b270"))


def test_local_tags_are_recognised_without_state_and_not_forgeable() -> None:
    branches = BranchFactory(Tokens(os.urandom))
    tags = {branches.tag() for _ in range(500)}
    assert len(tags) == 500
    assert all(branches.is_local_tag(t) for t in tags)
    other = BranchFactory(Tokens(os.urandom))
    assert not any(other.is_local_tag(t) for t in tags)
    tag = next(iter(tags))
    assert not branches.is_local_tag(tag[:-1] + ("A" if tag[-1] != "A" else "B"))
    for junk in (None, "", "x" * 16, "uas-tag", "!!!!!!!!!!!!!!!!", "é" * 16, "x" * 24):
        assert not branches.is_local_tag(junk)
    assert not branches.is_local_tag(tag.upper()) or tag.upper() == tag


def test_tags_and_stamps_cannot_spell_a_header_name() -> None:
    # Lowercase hex: a parser that finds the CSeq by searching a response for "CSeq" (SIPp's
    # method check) took a stamp or a tag that spelt it for the header and failed the call.
    branches = BranchFactory(Tokens(os.urandom))
    for n in range(200):
        for text in (branches.tag(), branches.dialog_stamp(f"call-{n}", emergency=n % 2 == 0)):
            assert set(text) <= set("0123456789abcdefo"), text


def test_the_base64_tags_and_stamps_of_earlier_releases_are_still_recognised() -> None:
    # The form before hex, made here with the factory's own keyed digest: an ACK to an
    # earlier release's response, or a BYE in a call it set up, reaches an upgraded process.
    key = b"shared by the workers of one edge"
    factory = BranchFactory(Tokens(os.urandom), key)
    nonce = bytes(range(6))
    legacy_tag = base64.urlsafe_b64encode(nonce + factory._digest(nonce, 6)).decode()
    assert len(legacy_tag) == 16 and factory.is_local_tag(legacy_tag)
    digest = factory._digest(b"e|call-1@192.0.2.10", 9)
    legacy_stamp = "e" + base64.urlsafe_b64encode(digest).decode()
    assert len(legacy_stamp) == 13
    assert factory.check_dialog_stamp("call-1@192.0.2.10", legacy_stamp) is True
    assert factory.check_dialog_stamp("call-2@192.0.2.10", legacy_stamp) is None


def test_branches_are_recognised_by_any_factory_with_the_same_key() -> None:
    key = b"shared by the workers of one edge"
    first = BranchFactory(Tokens(os.urandom), key)
    second = BranchFactory(Tokens(os.urandom), key)
    branches = [first.new() for _ in range(200)]
    assert all(second.is_local_branch(b) and first.is_local_branch(b) for b in branches)
    assert not any(BranchFactory(Tokens(os.urandom)).is_local_branch(b) for b in branches)
    branch = branches[0]
    assert not second.is_local_branch(branch[:-1] + ("A" if branch[-1] != "A" else "B"))
    for junk in (None, "", "z9hG4bK", "z9hG4bKuac1", "z9hG4bK" + "x" * 24, "y" * 31):
        assert not second.is_local_branch(junk)
    # Tags and stateless branches are the same under one key, whoever makes them.
    assert second.is_local_tag(first.tag())
    assert first.stateless(request()) == second.stateless(request())


def test_dialog_stamps_bind_the_call_id_and_the_kind() -> None:
    key = b"shared by the workers of one edge"
    factory = BranchFactory(Tokens(os.urandom), key)
    stamp = factory.dialog_stamp("call-1@192.0.2.10", emergency=True)
    other = factory.dialog_stamp("call-1@192.0.2.10", emergency=False)
    assert stamp[0] == "e" and other[0] == "o" and len(stamp) == 19
    assert all(c.isalnum() or c in "-_" for c in stamp)  # a SIP token: fits a URI parameter
    again = BranchFactory(Tokens(os.urandom), key)
    assert again.check_dialog_stamp("call-1@192.0.2.10", stamp) is True
    assert again.check_dialog_stamp("call-1@192.0.2.10", other) is False
    assert again.check_dialog_stamp("call-2@192.0.2.10", stamp) is None
    assert again.check_dialog_stamp("call-1@192.0.2.10", "o" + stamp[1:]) is None
    assert BranchFactory(Tokens(os.urandom)).check_dialog_stamp("call-1@192.0.2.10", stamp) is None
    for junk in ("", "e", "x" * 13, "é" * 13, "x" * 19, stamp + "A", stamp.upper()):
        assert again.check_dialog_stamp("call-1@192.0.2.10", junk) is None


def test_record_route_carries_the_stamp_and_route_stamp_reads_it() -> None:
    out = add_record_route(request(), UDP, TCP, "eABCDEFGHIJKL")
    assert out.values("record-route") == [
        "<sip:192.0.2.1:5070;transport=tcp;lr;dlg=eABCDEFGHIJKL>",
        "<sip:192.0.2.1:5070;lr;dlg=eABCDEFGHIJKL>",
    ]
    assert route_stamp("<sip:192.0.2.1:5070;lr;dlg=eABCDEFGHIJKL>") == "eABCDEFGHIJKL"
    assert route_stamp("<sip:192.0.2.1:5070;dlg=oX;lr>") == "oX"
    assert route_stamp("<sip:192.0.2.1:5070;lr>") is None
    # A stamped Route is still ours for loose routing.
    stamped = request("Route: <sip:192.0.2.1:5070;lr;dlg=eABCDEFGHIJKL>, <sip:198.51.100.9;lr>")
    for own in (None, own_routes((UDP, TCP))):
        edit = stamped.edit()
        assert pop_own_routes(edit, (UDP, TCP), own) == "<sip:198.51.100.9;lr>"
        assert edit.done().values("route") == ["<sip:198.51.100.9;lr>"]


def test_our_via_is_written_for_the_address_given_whichever_was_given_last() -> None:
    udp = LocalAddress("udp", "Edge.Example.COM", 5070)
    tls = LocalAddress("tls", "10.1.2.3", 5061)
    for local, expected in [
        (udp, "SIP/2.0/UDP Edge.Example.COM:5070;branch=z9hG4bK1;rport"),
        (tls, "SIP/2.0/TLS 10.1.2.3:5061;branch=z9hG4bK1;rport"),
        (udp, "SIP/2.0/UDP Edge.Example.COM:5070;branch=z9hG4bK1;rport"),
        (LocalAddress("udp", "::1", 5070), "SIP/2.0/UDP [::1]:5070;branch=z9hG4bK1;rport"),
    ]:
        assert own_via(local, "z9hG4bK1") == expected
