"""Faults bench/fuzz.py found in the proxy core, each driven here with injected time.

Every case must end with the peer answered (or the message dropped) and, once time has run
on, no transaction or response context left behind.
"""

from __future__ import annotations

import pytest

from e911_sip.proxy.core import Discarded
from e911_sip.sip.message import Request, Response, parse
from tests.unit.proxy.test_core import (
    DEFAULT,
    SOFTSWITCH,
    TRUNK1,
    Harness,
    invite,
    make_core,
    only,
    response_to,
    start_emergency,
    to,
)

pytestmark = pytest.mark.usefixtures("core_paths")


def in_dialog(*, ruri: str = "sip:911@198.51.100.1:5060", route: str | None, branch: str) -> bytes:
    lines = [
        f"BYE {ruri} SIP/2.0",
        f"Via: SIP/2.0/UDP 192.0.2.10:5060;branch={branch}",
        "Max-Forwards: 70",
        "From: <sip:3215551234@192.0.2.10>;tag=uac-tag",
        "To: <sip:911@192.0.2.1>;tag=uas-tag",
        "Call-ID: dialog@192.0.2.10",
        "CSeq: 2 BYE",
    ]
    if route is not None:
        lines.insert(2, f"Route: {route}")
    return ("\r\n".join([*lines, "Content-Length: 0"]) + "\r\n\r\n").encode()


def assert_drained(h: Harness) -> None:
    h.advance(3600.0)
    assert h.core.transactions_in_flight == 0
    assert h.core.contexts_in_flight == 0


def test_route_of_nothing_but_commas_is_answered_400_through_the_transaction() -> None:
    # It raised IndexError out of the core (an internal_error at the edge).
    h = make_core()
    out = h.feed(in_dialog(route=", ,", branch="z9hG4bKc1"))
    reply = only(SOFTSWITCH, out)
    assert isinstance(reply, Response) and reply.status == 400
    assert_drained(h)


def test_unreadable_route_leaves_no_transaction_behind() -> None:
    # The request was answered statelessly while its server transaction waited for ever.
    h = make_core()
    out = h.feed(in_dialog(route="<>", branch="z9hG4bKc2"))
    assert [m.status for m in to(SOFTSWITCH, out)] == [400]  # type: ignore[union-attr]
    assert_drained(h)


def test_unreadable_route_without_rfc3261_branch_leaves_nothing_behind() -> None:
    # An RFC 2543 key includes the whole Via, which stamping `received` changes.
    h = make_core()
    out = h.feed(in_dialog(route="<>", branch="old2543"), SOFTSWITCH._replace(host="192.0.2.99"))
    assert [m.status for m in to(SOFTSWITCH._replace(host="192.0.2.99"), out)] == [400]  # type: ignore[union-attr]
    assert_drained(h)


def test_in_dialog_request_to_a_tel_uri_is_answered_416() -> None:
    # It was sent to host '' port 5060.
    h = make_core()
    out = h.feed(in_dialog(ruri="tel:+13215551234", route=None, branch="z9hG4bKc3"))
    assert all(o.peer.host for o in out)
    reply = only(SOFTSWITCH, out)
    assert isinstance(reply, Response) and reply.status == 416
    assert_drained(h)


def test_route_to_a_urn_is_answered_416() -> None:
    h = make_core()
    out = h.feed(in_dialog(route="<urn:service:sos>", branch="z9hG4bKc4"))
    assert [o.peer for o in out] == [SOFTSWITCH]
    assert_drained(h)


def test_huge_max_forwards_is_answered_400_before_any_100_trying() -> None:
    h = make_core()
    request = in_dialog(route=None, branch="z9hG4bKc5").replace(
        b"Max-Forwards: 70", b"Max-Forwards: " + b"7" * 4400
    )
    out = h.feed(request)
    assert [m.status for m in to(SOFTSWITCH, out)] == [400]  # type: ignore[union-attr]
    assert h.core.transactions_in_flight == 0


def test_response_with_only_our_via_is_not_relayed() -> None:
    # With our Via popped, the 603 went upstream with no Via at all.
    h = make_core()
    _, raw = start_emergency(h)
    sent = parse(raw)
    assert isinstance(sent, Request)
    ours = [hd.raw for hd in sent.headers if hd.key == "via"][0]
    broken = response_to(raw, 603, "Decline").replace(
        b"\r\n" + [hd.raw for hd in sent.headers if hd.key == "via"][1].encode(), b""
    )
    assert broken.count(b"Via:") == 1 and ours.encode() in broken
    assert h.feed(broken, TRUNK1) == []
    assert "malformed" in [e.reason for e in h.event(Discarded)]  # type: ignore[union-attr]
    h.feed(response_to(raw, 200, "OK"), TRUNK1)
    assert_drained(h)


def test_cancel_never_answered_does_not_keep_the_call_for_ever() -> None:
    # Timer C cancelled the ringing branch, the trunk answered nothing, and the INVITE
    # transaction and its context stayed in memory for ever.
    h = make_core()
    out = h.feed(invite("sip:5551234@192.0.2.1:5070", call_id="silent@192.0.2.10"))
    forwarded = only(DEFAULT, out)
    assert isinstance(forwarded, Request) and forwarded.method == "INVITE"
    raw = [o.data for o in out if o.peer == DEFAULT][0]
    h.feed(response_to(raw, 180, "Ringing"), DEFAULT)
    out = h.advance(186.0)  # Timer C
    assert [m.method for m in to(DEFAULT, out) if isinstance(m, Request)][:1] == ["CANCEL"]
    out = h.advance(40.0)  # 64*T1 after the CANCEL
    finals = [m for m in to(SOFTSWITCH, out) if isinstance(m, Response) and m.status >= 200]
    assert finals and {m.status for m in finals} == {408}  # retransmitted by Timer G
    assert_drained(h)


def test_a_stray_2xx_with_our_branch_prefix_and_a_bare_rport_is_not_relayed() -> None:
    # Found when stray 2xx responses were relayed statelessly by branch prefix (a bare rport
    # below our Via sent one to port 0). Nothing is relayed without a transaction now.
    h = make_core()
    _, raw = start_emergency(h)
    sent = parse(raw)
    assert isinstance(sent, Request)
    ours = [hd.raw for hd in sent.headers if hd.key == "via"][0]
    late = (
        "SIP/2.0 200 OK\r\n"
        f"{ours}\r\n"
        "Via: SIP/2.0/UDP 192.0.2.10;branch=z9hG4bKold;rport\r\n"
        "From: <sip:3215551234@192.0.2.10>;tag=uac-tag\r\n"
        "To: <sip:911@192.0.2.1:5070>;tag=uas\r\n"
        "Call-ID: other@192.0.2.10\r\nCSeq: 3 INVITE\r\nContent-Length: 0\r\n\r\n"
    ).replace(sent.top_via.branch or "", (sent.top_via.branch or "") + "0")
    out = h.feed(late.encode(), TRUNK1)
    assert out == []
    assert [e.reason for e in h.event(Discarded)][-1] == "stray_response"  # type: ignore[union-attr]


def test_a_trunk_provisional_with_an_unreadable_to_leaves_no_state() -> None:
    # Found by the fuzz bench once trunks' dialogs were tracked: reading the To tag of a
    # 180 raised, and the client transaction lost its timer with the exception.
    h = make_core()
    out = h.feed(invite(ruri="sip:5551234@192.0.2.1:5070"))
    raw = [o.data for o in out if o.peer.host == DEFAULT.host][0]
    branch = parse(raw).vias[0].branch
    assert branch is not None
    bad = (
        f"SIP/2.0 180\r\nVia:SIP/2.0/UDP 192.0.2.1:5070;branch={branch}\r\n"
        "Via:SIP/2.0/UDP 1\r\nFrom:<>\r\nT:<>tag\r\nCall-ID:0\r\nCSeq:1 INVITE\r\n\r\n"
    ).encode()
    h.feed(bad, DEFAULT)
    h.advance(3600.0)
    assert h.core.transactions_in_flight == 0 and h.core.contexts_in_flight == 0


def test_a_request_with_an_unreadable_to_is_answered_400_without_raising() -> None:
    # Found by the fuzz bench: ending the request's context read its To tag again, inside
    # the handler of the error that tag had raised.
    h = make_core()
    out = h.feed(
        b"INVITE sip:a@192.0.2.1:5070 SIP/2.0\r\nT:<>tag\r\nf:<sip:x@192.0.2.10>;tag=1\r\n"
        b"Call-ID:0\r\ncseq:1 INVITE\r\nV:SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bKx\r\n\r\n"
    )
    assert [o.data[:12] for o in out if o.data.startswith(b"SIP/2.0 4")] == [b"SIP/2.0 400 "]
    h.advance(3600.0)
    assert h.core.transactions_in_flight == 0 and h.core.contexts_in_flight == 0
