"""Calls finished by a process that did not set them up: another worker of the same edge, or
the edge after a restart, given the same dialog key.

Each test sets a call up on one core and sends the rest of it to a second core that holds
none of its state, as a worker killed in the middle of the call leaves it.
"""

from __future__ import annotations

import pytest

from e911_sip.proxy.core import Recovered
from e911_sip.sip.message import Request, Response, parse
from e911_sip.sip.peer import Peer
from tests.unit.proxy.test_core import (
    SOFTSWITCH,
    TRUNK1,
    TRUNK2,
    Harness,
    invite,
    make_core,
    only,
    response_to,
    start_emergency,
    to,
)
from tests.unit.proxy.test_trust import OUTSIDER, TRUSTED, reasons

pytestmark = pytest.mark.usefixtures("core_paths")

KEY = b"the workers' shared dialog key, 32+ bytes"
CALL = "call-1@192.0.2.10"
"""The Call-ID of every call here (test_core's ``invite``)."""


def core(key: bytes | None = KEY) -> Harness:
    return make_core(trusted=TRUSTED, dialog_key=key)


def trunk_bye(answer: bytes, *, call_id: str | None = None) -> bytes:
    """The trunk's BYE in the dialog its 2xx ``answer`` set up: its route set is the
    2xx's Record-Route (RFC 3261 §12.1.1), its target the softswitch's Contact."""
    ok = parse(answer)
    assert isinstance(ok, Response)
    routes = ", ".join(ok.values("record-route"))
    return (
        "BYE sip:3215551234@192.0.2.10:5060 SIP/2.0\r\n"
        "Via: SIP/2.0/UDP 198.51.100.1:5060;branch=z9hG4bKpsapbye\r\n"
        f"Route: {routes}\r\nMax-Forwards: 70\r\n"
        "From: <sip:911@198.51.100.1>;tag=uas-tag\r\n"
        "To: <sip:3215551234@192.0.2.10>;tag=uac-tag\r\n"
        f"Call-ID: {call_id or ok.call_id}\r\nCSeq: 7 BYE\r\nContent-Length: 0\r\n\r\n"
    ).encode()


def answered_elsewhere() -> bytes:
    """An emergency call answered through one core; the trunk's 200 as it sent it."""
    first = core()
    _, raw = start_emergency(first)
    ok = response_to(raw, 200, "OK")
    relayed = only(SOFTSWITCH, first.feed(ok, TRUNK1))
    assert isinstance(relayed, Response) and relayed.status == 200
    return ok


def test_the_trunk_hangs_up_a_call_another_worker_answered() -> None:
    ok = answered_elsewhere()
    second = core()
    sent = only(SOFTSWITCH, second.feed(trunk_bye(ok), TRUNK1))
    assert isinstance(sent, Request) and sent.method == "BYE"
    assert not sent.has("route")  # our entry popped; the softswitch is the target
    assert second.event(Recovered) == [Recovered("trunk_dialog", True, TRUNK1, CALL, "BYE")]
    assert reasons(second) == []
    # Remembered again: the next request in the dialog takes the table, not the stamp.
    again = trunk_bye(ok).replace(b"z9hG4bKpsapbye", b"z9hG4bKpsapbye2")
    assert to(SOFTSWITCH, second.feed(again, TRUNK1))
    assert len(second.event(Recovered)) == 1


def test_a_non_emergency_dialog_is_restored_as_one() -> None:
    first = core()
    out = first.feed(invite(ruri="sip:2125550100@192.0.2.1:5070"))
    raw = [o.data for o in out if o.peer.host == "203.0.113.5"][0]
    ok = response_to(raw, 200, "OK")
    first.feed(ok, Peer("udp", "203.0.113.5", 5060))
    second = core()
    default_trunk = Peer("udp", "203.0.113.5", 5060)
    bye = trunk_bye(ok).replace(b"198.51.100.1:5060;branch", b"203.0.113.5:5060;branch")
    assert to(SOFTSWITCH, second.feed(bye, default_trunk))
    assert second.event(Recovered) == [Recovered("trunk_dialog", False, default_trunk, CALL, "BYE")]


@pytest.mark.parametrize(
    "case",
    ["other key", "no stamp", "tampered", "other call", "outsider", "stamp not ours"],
)
def test_a_stamp_is_believed_only_as_written(case: str) -> None:
    ok = answered_elsewhere()
    bye = trunk_bye(ok)
    source = TRUNK1
    second = core(b"another edge's key" if case == "other key" else KEY)
    stamp = parse(ok).get("record-route").split(";dlg=")[1].rstrip(">")  # type: ignore[union-attr]
    if case == "no stamp":
        bye = bye.replace(f";dlg={stamp}".encode(), b"")
    elif case == "tampered":
        bye = bye.replace(stamp.encode(), ("o" + stamp[1:]).encode())
    elif case == "other call":
        bye = trunk_bye(ok, call_id="someone-else@192.0.2.10")
    elif case == "outsider":
        source = OUTSIDER
    elif case == "stamp not ours":
        # Our stamp on a Route entry naming someone else is not our Record-Route.
        bye = bye.replace(b"<sip:192.0.2.1:5070;lr;", b"<sip:203.0.113.200:5060;lr;")
    assert to(SOFTSWITCH, second.feed(bye, source)) == []
    assert second.event(Recovered) == []
    expected = "untrusted_source" if case == "outsider" else "untrusted_dialog"
    assert reasons(second) == [expected]


def test_a_2xx_to_an_invite_another_worker_sent_still_reaches_the_caller() -> None:
    first = core()
    _, raw = start_emergency(first)
    second = core()
    ok = response_to(raw, 200, "OK")
    relayed = only(SOFTSWITCH, second.feed(ok, TRUNK1))
    assert isinstance(relayed, Response) and relayed.status == 200
    assert [v.branch for v in relayed.vias] == ["z9hG4bKuac1"]  # our Via popped
    assert relayed.get("record-route") == parse(ok).get("record-route")
    # The stamp in the 2xx's Record-Route says it is an emergency call.
    assert second.event(Recovered) == [Recovered("late_2xx", True, TRUNK1, CALL, "INVITE")]
    assert second.core.transactions_in_flight == 0  # nothing kept
    # The caller's ACK follows the Record-Route through us to the trunk's Contact.
    ack = (
        "ACK sip:911@198.51.100.1:5060 SIP/2.0\r\n"
        "Via: SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bKack1\r\n"
        f"Route: {relayed.get('record-route')}\r\nMax-Forwards: 70\r\n"
        "From: <sip:3215551234@192.0.2.10>;tag=uac-tag\r\n"
        "To: <sip:911@192.0.2.1:5070>;tag=uas-tag\r\n"
        f"Call-ID: {relayed.call_id}\r\nCSeq: 1 ACK\r\nContent-Length: 0\r\n\r\n"
    ).encode()
    sent = only(TRUNK1, second.feed(ack))
    assert isinstance(sent, Request) and sent.method == "ACK"


def test_late_2xx_retransmissions_are_relayed_after_the_transaction_is_gone() -> None:
    h = core()
    _, raw = start_emergency(h)
    ok = response_to(raw, 200, "OK")
    assert to(SOFTSWITCH, h.feed(ok, TRUNK1))
    h.advance(64.0)  # Timer M: the client transaction is gone
    assert h.core.transactions_in_flight == 0
    assert to(SOFTSWITCH, h.feed(ok, TRUNK1))
    assert h.event(Recovered) == [Recovered("late_2xx", True, TRUNK1, CALL, "INVITE")]


@pytest.mark.parametrize(
    "case",
    ["other key", "outsider", "not a 2xx", "not an invite", "upstream outsider", "upstream us"],
)
def test_a_late_response_is_relayed_only_when_it_cannot_be_forged_or_misdirected(
    case: str,
) -> None:
    first = core()
    _, raw = start_emergency(first)
    second = core(b"another edge's key" if case == "other key" else KEY)
    status, reason = (180, "Ringing") if case == "not a 2xx" else (200, "OK")
    late = response_to(raw, status, reason)
    source = OUTSIDER if case == "outsider" else TRUNK1
    if case == "not an invite":
        late = late.replace(b" INVITE\r\n", b" INFO\r\n")
    elif case == "upstream us":
        late = late.replace(b"Via: SIP/2.0/UDP 192.0.2.10:5060", b"Via: SIP/2.0/UDP 192.0.2.1:5070")
    elif case == "upstream outsider":
        late = late.replace(
            b"Via: SIP/2.0/UDP 192.0.2.10:5060", b"Via: SIP/2.0/UDP 192.0.2.200:5060"
        )
    assert to(SOFTSWITCH, second.feed(late, source)) == []
    assert all(o.peer.host != "192.0.2.200" for o in second.sent)
    assert second.event(Recovered) == []
    assert reasons(second) == ["stray_response"]


def test_without_a_shared_key_a_restarted_process_recognises_nothing() -> None:
    # The default: a key per process (here, a core given another key stands for it).
    ok = answered_elsewhere()
    fresh = core(None)
    assert to(SOFTSWITCH, fresh.feed(trunk_bye(ok), TRUNK2)) == []
    assert reasons(fresh) == ["untrusted_dialog"]
