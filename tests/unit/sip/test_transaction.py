"""RFC 3261 §17 / RFC 6026 transaction machines, driven with injected time."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from e911_sip.sip import transaction as transaction_module
from e911_sip.sip.errors import TransactionStateError
from e911_sip.sip.message import Request, Response, parse
from e911_sip.sip.transaction import (
    TRANSITIONS,
    ClientInviteTransaction,
    ClientNonInviteTransaction,
    Effect,
    Kind,
    PassUp,
    ServerInviteTransaction,
    ServerNonInviteTransaction,
    State,
    Terminated,
    Timeout,
    TimerSettings,
    Transmit,
    TransportFailure,
    client_key,
    server_key,
    via_branch,
    via_sent_by,
)
from e911_sip.sip.uri import parse_via

BRANCH = "z9hG4bK-proxy-1"
UPSTREAM_BRANCH = "z9hG4bK-phone-1"
TOP_VIA = f"SIP/2.0/UDP 198.51.100.5:5060;branch={BRANCH};rport"
PHONE_VIA = f"SIP/2.0/UDP 192.0.2.10:5062;branch={UPSTREAM_BRANCH};received=192.0.2.10"


# -- raw wire messages ------------------------------------------------------------------------


def request(
    method: str = "INVITE",
    *,
    uri: str = "sip:911@trunk.example.net",
    via: str = TOP_VIA,
    extra_via: str | None = PHONE_VIA,
    cseq: int = 7,
    call_id: str = "call-1@192.0.2.10",
    from_tag: str = "ft-1",
    to_tag: str | None = None,
    routes: tuple[str, ...] = (),
) -> Request:
    to = "<sip:911@example.net>" + (f";tag={to_tag}" if to_tag else "")
    lines = [f"{method} {uri} SIP/2.0", f"Via: {via}"]
    if extra_via:
        lines.append(f"Via: {extra_via}")
    lines += [f"Route: {route}" for route in routes]
    lines += [
        "Max-Forwards: 69",
        f'From: "Front Desk" <sip:2125550100@example.net>;tag={from_tag}',
        f"To: {to}",
        f"Call-ID: {call_id}",
        f"CSeq: {cseq} {method}",
        "Contact: <sip:2125550100@192.0.2.10:5062>",
        "Content-Length: 0",
    ]
    message = parse(("\r\n".join(lines) + "\r\n\r\n").encode())
    assert isinstance(message, Request)
    return message


def response(
    status: int,
    *,
    method: str = "INVITE",
    branch: str = BRANCH,
    to_tag: str | None = "tt-9",
    cseq: int = 7,
    reason: str = "Reason",
) -> Response:
    to = "<sip:911@example.net>" + (f";tag={to_tag}" if to_tag else "")
    text = "\r\n".join(
        [
            f"SIP/2.0 {status} {reason}",
            f"Via: SIP/2.0/UDP 198.51.100.5:5060;branch={branch};rport=5060",
            f"Via: {PHONE_VIA}",
            'From: "Front Desk" <sip:2125550100@example.net>;tag=ft-1',
            f"To: {to}",
            "Call-ID: call-1@192.0.2.10",
            f"CSeq: {cseq} {method}",
            "Content-Length: 0",
        ]
    )
    message = parse((text + "\r\n\r\n").encode())
    assert isinstance(message, Response)
    return message


def fire(t: Any) -> tuple[float, list[Effect]]:
    """Advance to the transaction's next deadline and fire it."""
    due = t.get_timer()
    assert due is not None, "no timer is pending"
    return due, t.handle_timer(due)


def retransmissions_until_end(t: Any) -> tuple[list[float], float, list[Effect]]:
    """Fire timers until one yields something other than a single Transmit."""
    times: list[float] = []
    while True:
        due, effects = fire(t)
        if len(effects) == 1 and isinstance(effects[0], Transmit):
            times.append(due)
            continue
        return times, due, effects


def started_client_invite(*, reliable: bool = False, **kw: Any) -> ClientInviteTransaction:
    t = ClientInviteTransaction(request("INVITE", **kw), reliable=reliable)
    t.start(0.0)
    return t


def started_client_non_invite(
    method: str = "OPTIONS", *, reliable: bool = False
) -> ClientNonInviteTransaction:
    t = ClientNonInviteTransaction(request(method), reliable=reliable)
    t.start(0.0)
    return t


# -- timer settings -----------------------------------------------------------------------------


def test_timer_settings_defaults_and_derived_values() -> None:
    timers = TimerSettings()
    assert (timers.t1, timers.t2, timers.t4) == (0.5, 4.0, 5.0)
    for value in (
        timers.timer_b,
        timers.timer_f,
        timers.timer_h,
        timers.timer_j,
        timers.timer_l,
        timers.timer_m,
    ):
        assert value == 32.0
    assert timers.timer_d == 32.0
    assert timers.timer_i == timers.timer_k == 5.0


def test_timer_d_is_at_least_32_seconds_and_at_least_64_t1() -> None:
    assert TimerSettings(t1=0.1).timer_d == 32.0
    assert TimerSettings(t1=1.0, t2=4.0).timer_d == 64.0


@pytest.mark.parametrize(
    "kwargs", [{"t1": 0.0}, {"t1": -1.0}, {"t1": 2.0, "t2": 1.0}, {"t4": -0.1}]
)
def test_timer_settings_reject_nonsense(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        TimerSettings(**kwargs)


# -- client INVITE --------------------------------------------------------------------------


def test_client_invite_start_transmits_the_request() -> None:
    invite = request("INVITE")
    t = ClientInviteTransaction(invite, reliable=False)
    assert t.state is State.CALLING
    assert t.get_timer() is None
    assert t.start(0.0) == [Transmit(invite)]
    assert t.key == (BRANCH, "INVITE")
    assert t.request is invite and t.reliable is False


def test_client_invite_timer_a_doubles_without_cap_then_timer_b_times_out() -> None:
    t = started_client_invite()
    times, due, effects = retransmissions_until_end(t)
    assert times == [0.5, 1.5, 3.5, 7.5, 15.5, 31.5]
    assert due == 32.0
    assert effects == [Timeout("B"), Terminated()]
    assert t.state is State.TERMINATED
    assert t.get_timer() is None


def test_client_invite_timer_a_retransmits_the_invite_itself() -> None:
    t = started_client_invite()
    _, effects = fire(t)
    assert effects == [Transmit(t.request)]
    assert t.state is State.CALLING


def test_client_invite_timer_b_follows_t1() -> None:
    t = ClientInviteTransaction(request(), reliable=True, timers=TimerSettings(t1=0.25))
    t.start(10.0)
    assert fire(t) == (26.0, [Timeout("B"), Terminated()])


def test_client_invite_reliable_has_no_timer_a() -> None:
    t = started_client_invite(reliable=True)
    assert t.get_timer() == 32.0
    assert t.handle_timer(31.9) == []
    assert fire(t) == (32.0, [Timeout("B"), Terminated()])


def test_client_invite_handle_timer_before_deadline_does_nothing() -> None:
    t = started_client_invite()
    assert t.handle_timer(0.49) == []
    assert t.get_timer() == 0.5
    assert t.state is State.CALLING


def test_client_invite_late_timer_a_is_rearmed_from_when_it_fired() -> None:
    t = started_client_invite()
    assert t.handle_timer(0.9) == [Transmit(t.request)]
    assert t.get_timer() == pytest.approx(1.9)


def test_client_invite_overdue_timer_b_wins_over_a_due_retransmission() -> None:
    t = started_client_invite()
    assert t.handle_timer(100.0) == [Timeout("B"), Terminated()]


def test_client_invite_provisional_stops_timers_a_and_b() -> None:
    t = started_client_invite()
    ringing = response(180)
    assert t.receive(ringing, 0.2) == [PassUp(ringing)]
    assert t.state is State.PROCEEDING
    assert t.get_timer() is None
    assert t.handle_timer(1000.0) == []


def test_client_invite_every_provisional_is_passed_up() -> None:
    t = started_client_invite()
    t.receive(response(100, to_tag=None), 0.1)
    progress = response(183)
    assert t.receive(progress, 0.3) == [PassUp(progress)]
    assert t.state is State.PROCEEDING


def test_client_invite_2xx_enters_accepted_and_arms_timer_m() -> None:
    t = started_client_invite()
    t.receive(response(180), 1.0)
    ok = response(200)
    assert t.receive(ok, 2.0) == [PassUp(ok)]
    assert t.state is State.ACCEPTED
    assert t.get_timer() == 34.0
    assert fire(t) == (34.0, [Terminated()])
    assert t.state is State.TERMINATED


def test_client_invite_2xx_in_calling_stops_timer_a() -> None:
    t = started_client_invite()
    t.receive(response(200), 0.1)
    assert t.get_timer() == pytest.approx(32.1)
    assert fire(t)[1] == [Terminated()]


def test_client_invite_2xx_retransmissions_in_accepted_are_passed_up_without_ack() -> None:
    t = started_client_invite()
    t.receive(response(200), 1.0)
    again = response(200)
    other_fork = response(200, to_tag="tt-other")
    assert t.receive(again, 2.0) == [PassUp(again)]
    assert t.receive(other_fork, 3.0) == [PassUp(other_fork)]
    assert t.get_timer() == 33.0  # Timer M is not restarted
    assert t.state is State.ACCEPTED


def test_client_invite_timer_m_follows_t1() -> None:
    t = ClientInviteTransaction(request(), reliable=True, timers=TimerSettings(t1=0.125))
    t.start(0.0)
    t.receive(response(200), 1.0)
    assert t.get_timer() == 9.0


def test_client_invite_stray_responses_in_accepted_are_absorbed() -> None:
    t = started_client_invite()
    t.receive(response(200), 1.0)
    assert t.receive(response(180), 2.0) == []
    assert t.receive(response(486), 2.0) == []
    assert t.state is State.ACCEPTED


def test_client_invite_non_2xx_is_acked_passed_up_and_arms_timer_d() -> None:
    t = started_client_invite()
    t.receive(response(180), 1.0)
    busy = response(486)
    effects = t.receive(busy, 2.0)
    assert len(effects) == 2
    ack, passed = effects
    assert isinstance(ack, Transmit) and ack.message.start_line().startswith("ACK ")
    assert passed == PassUp(busy)
    assert t.state is State.COMPLETED
    assert t.get_timer() == 34.0
    assert fire(t) == (34.0, [Terminated()])


def test_client_invite_non_2xx_in_calling_stops_timer_a() -> None:
    t = started_client_invite()
    t.receive(response(503), 0.2)
    assert t.get_timer() == pytest.approx(32.2)  # only Timer D remains


def test_client_invite_timer_d_uses_at_least_64_t1() -> None:
    t = ClientInviteTransaction(request(), reliable=False, timers=TimerSettings(t1=1.0))
    t.start(0.0)
    t.receive(response(404), 0.0)
    assert t.get_timer() == 64.0


def test_client_invite_retransmitted_final_resends_the_same_ack_only() -> None:
    t = started_client_invite()
    first = t.receive(response(486), 1.0)[0]
    assert t.receive(response(486), 1.5) == [first]
    assert t.receive(response(486), 2.5) == [first]
    assert t.state is State.COMPLETED


def test_client_invite_responses_in_completed_other_than_300_699_are_absorbed() -> None:
    t = started_client_invite()
    t.receive(response(486), 1.0)
    assert t.receive(response(200), 1.5) == []
    assert t.receive(response(180), 1.5) == []


def test_client_invite_reliable_non_2xx_terminates_at_once() -> None:
    t = started_client_invite(reliable=True)
    busy = response(486)
    effects = t.receive(busy, 1.0)
    assert len(effects) == 3
    assert isinstance(effects[0], Transmit)
    assert effects[1:] == [PassUp(busy), Terminated()]
    assert t.state is State.TERMINATED
    assert t.get_timer() is None


def test_client_invite_ack_headers_follow_rfc3261_17_1_1_3() -> None:
    invite = request(
        "INVITE",
        routes=("<sip:edge1.example.net;lr>", "<sip:edge2.example.net;lr>, <sip:core;lr>"),
    )
    t = ClientInviteTransaction(invite, reliable=False)
    t.start(0.0)
    effect = t.receive(response(486, to_tag="busy-tag"), 1.0)[0]
    assert isinstance(effect, Transmit)
    ack = effect.message
    assert isinstance(ack, Request)
    assert ack.method == "ACK"
    assert ack.uri == invite.uri
    assert ack.get_all("via") == [TOP_VIA]
    assert ack.get_all("route") == invite.get_all("route")
    assert ack.get("max-forwards") == "70"
    assert ack.get("from") == invite.get("from")
    assert ack.get("to") == "<sip:911@example.net>;tag=busy-tag"
    assert ack.get("call-id") == invite.get("call-id")
    assert ack.get("cseq") == "7 ACK"
    assert ack.get("content-length") == "0"
    assert ack.body == b""
    assert ack.get("contact") is None
    reparsed = parse(ack.to_bytes())
    assert isinstance(reparsed, Request)
    assert server_key(reparsed) == server_key(invite)


def test_client_invite_ack_has_only_the_top_via_of_a_combined_via_line() -> None:
    invite = request("INVITE", via=f"{TOP_VIA}, {PHONE_VIA}", extra_via=None)
    t = ClientInviteTransaction(invite, reliable=False)
    t.start(0.0)
    effect = t.receive(response(600), 1.0)[0]
    assert isinstance(effect, Transmit)
    assert effect.message.values("via") == [TOP_VIA]


def test_client_invite_ack_without_routes_has_none() -> None:
    t = started_client_invite()
    effect = t.receive(response(486), 1.0)[0]
    assert isinstance(effect, Transmit)
    assert not effect.message.has("route")


@pytest.mark.parametrize("status", [180, 200])
def test_client_invite_transport_error_while_outstanding_fails_the_transaction(
    status: int,
) -> None:
    t = started_client_invite()
    assert t.transport_error(0.1) == [TransportFailure(), Terminated()]
    assert t.state is State.TERMINATED and t.get_timer() is None
    t = started_client_invite()
    t.receive(response(180), 0.1)
    assert t.transport_error(0.2) == [TransportFailure(), Terminated()]
    assert t.receive(response(status), 0.3) == []


def test_client_invite_transport_error_after_a_final_is_ignored() -> None:
    t = started_client_invite()
    t.receive(response(486), 1.0)
    assert t.transport_error(1.1) == []
    assert t.state is State.COMPLETED
    t = started_client_invite()
    t.receive(response(200), 1.0)
    assert t.transport_error(1.1) == []
    assert t.state is State.ACCEPTED


def test_client_invite_anything_after_termination_is_absorbed() -> None:
    t = started_client_invite(reliable=True)
    t.transport_error(0.0)
    assert t.receive(response(200), 1.0) == []
    assert t.receive(response(486), 1.0) == []
    assert t.transport_error(1.0) == []
    assert t.handle_timer(99.0) == []


def test_client_invite_status_outside_100_699_is_absorbed() -> None:
    t = started_client_invite()
    assert t.receive(response(700), 1.0) == []
    assert t.state is State.CALLING


def test_client_invite_start_twice_raises_naming_state_and_event() -> None:
    t = started_client_invite()
    with pytest.raises(TransactionStateError) as info:
        t.start(1.0)
    message = str(info.value)
    assert "CALLING" in message and "start" in message
    assert info.value.state == "CALLING" and info.value.event == "start"
    assert info.value.kind == "client INVITE"


def test_client_invite_start_after_termination_raises() -> None:
    t = started_client_invite()
    t.transport_error(0.1)
    with pytest.raises(TransactionStateError, match="TERMINATED"):
        t.start(0.2)


def test_client_invite_rejects_other_methods_and_missing_branch() -> None:
    with pytest.raises(ValueError):
        ClientInviteTransaction(request("OPTIONS"), reliable=False)
    with pytest.raises(ValueError, match="branch"):
        ClientInviteTransaction(
            request("INVITE", via="SIP/2.0/UDP 198.51.100.5:5060"), reliable=False
        )


# -- client non-INVITE ----------------------------------------------------------------------


def test_client_non_invite_start_transmits_and_keys_by_method() -> None:
    bye = request("BYE", to_tag="tt-9")
    t = ClientNonInviteTransaction(bye, reliable=False)
    assert t.state is State.TRYING
    assert t.start(0.0) == [Transmit(bye)]
    assert t.key == (BRANCH, "BYE")


def test_client_non_invite_timer_e_caps_at_t2_then_timer_f_times_out() -> None:
    t = started_client_non_invite()
    times, due, effects = retransmissions_until_end(t)
    assert times == [0.5, 1.5, 3.5, 7.5, 11.5, 15.5, 19.5, 23.5, 27.5, 31.5]
    assert due == 32.0
    assert effects == [Timeout("F"), Terminated()]
    assert t.state is State.TERMINATED


def test_client_non_invite_timer_e_every_t2_in_proceeding_and_f_still_runs() -> None:
    t = started_client_non_invite()
    fire(t)  # 0.5; next at 1.5
    trying = response(100, method="OPTIONS", to_tag=None)
    assert t.receive(trying, 0.7) == [PassUp(trying)]
    assert t.state is State.PROCEEDING
    times, due, effects = retransmissions_until_end(t)
    assert times == [1.5, 5.5, 9.5, 13.5, 17.5, 21.5, 25.5, 29.5]
    assert (due, effects) == (32.0, [Timeout("F"), Terminated()])


def test_client_non_invite_reliable_has_no_timer_e() -> None:
    t = started_client_non_invite(reliable=True)
    assert t.get_timer() == 32.0
    assert fire(t) == (32.0, [Timeout("F"), Terminated()])


def test_client_non_invite_final_enters_completed_and_timer_k_ends_it() -> None:
    t = started_client_non_invite()
    ok = response(200, method="OPTIONS")
    assert t.receive(ok, 2.0) == [PassUp(ok)]
    assert t.state is State.COMPLETED
    assert t.get_timer() == 7.0  # K = T4, Timer E stopped
    assert fire(t) == (7.0, [Terminated()])


@pytest.mark.parametrize("status", [200, 302, 404, 503, 603])
def test_client_non_invite_any_final_completes_from_proceeding(status: int) -> None:
    t = started_client_non_invite()
    t.receive(response(180, method="OPTIONS"), 0.1)
    final = response(status, method="OPTIONS")
    assert t.receive(final, 0.2) == [PassUp(final)]
    assert t.state is State.COMPLETED


def test_client_non_invite_timer_k_follows_t4() -> None:
    t = ClientNonInviteTransaction(request("BYE"), reliable=False, timers=TimerSettings(t4=2.5))
    t.start(0.0)
    t.receive(response(481, method="BYE"), 1.0)
    assert t.get_timer() == 3.5


def test_client_non_invite_response_retransmissions_in_completed_are_absorbed() -> None:
    t = started_client_non_invite()
    t.receive(response(200, method="OPTIONS"), 1.0)
    assert t.receive(response(200, method="OPTIONS"), 1.5) == []
    assert t.receive(response(180, method="OPTIONS"), 1.5) == []


def test_client_non_invite_reliable_final_terminates_at_once() -> None:
    t = started_client_non_invite(reliable=True)
    ok = response(200, method="OPTIONS")
    assert t.receive(ok, 1.0) == [PassUp(ok), Terminated()]
    assert t.state is State.TERMINATED
    assert t.get_timer() is None


def test_client_non_invite_transport_errors() -> None:
    t = started_client_non_invite()
    assert t.transport_error(0.1) == [TransportFailure(), Terminated()]
    t = started_client_non_invite()
    t.receive(response(100, method="OPTIONS", to_tag=None), 0.1)
    assert t.transport_error(0.2) == [TransportFailure(), Terminated()]
    t = started_client_non_invite()
    t.receive(response(200, method="OPTIONS"), 0.1)
    assert t.transport_error(0.2) == []
    assert t.state is State.COMPLETED


def test_client_non_invite_start_twice_raises() -> None:
    t = started_client_non_invite()
    with pytest.raises(TransactionStateError, match="TRYING.*start"):
        t.start(0.5)


@pytest.mark.parametrize("method", ["INVITE", "ACK"])
def test_client_non_invite_rejects_invite_and_ack(method: str) -> None:
    with pytest.raises(ValueError):
        ClientNonInviteTransaction(request(method), reliable=False)


# -- server INVITE --------------------------------------------------------------------------


def server_invite(*, reliable: bool = False) -> tuple[ServerInviteTransaction, Request]:
    invite = request("INVITE", via=PHONE_VIA, extra_via=None)
    return ServerInviteTransaction(invite, reliable=reliable), invite


def phone_response(status: int, *, to_tag: str | None = "tt-9") -> Response:
    return response(status, branch=UPSTREAM_BRANCH, to_tag=to_tag)


def phone_ack(*, branch: str = UPSTREAM_BRANCH, to_tag: str = "tt-9") -> Request:
    return request(
        "ACK", via=PHONE_VIA.replace(UPSTREAM_BRANCH, branch), extra_via=None, to_tag=to_tag
    )


def test_server_invite_starts_in_proceeding_without_timers() -> None:
    t, invite = server_invite()
    assert t.state is State.PROCEEDING
    assert t.get_timer() is None
    assert t.last_response is None
    assert t.key == (UPSTREAM_BRANCH, "192.0.2.10:5062", "INVITE")
    assert t.request is invite


def test_server_invite_retransmission_before_any_response_is_absorbed() -> None:
    t, invite = server_invite()
    assert t.receive(invite, 0.1) == []
    assert t.state is State.PROCEEDING


def test_server_invite_retransmission_in_proceeding_resends_latest_provisional() -> None:
    t, invite = server_invite()
    trying = phone_response(100, to_tag=None)
    ringing = phone_response(180)
    assert t.send_response(trying, 0.0) == [Transmit(trying)]
    assert t.receive(invite, 0.5) == [Transmit(trying)]
    assert t.send_response(ringing, 1.0) == [Transmit(ringing)]
    assert t.last_response is ringing
    assert t.receive(invite, 1.5) == [Transmit(ringing)]
    assert t.state is State.PROCEEDING
    assert t.get_timer() is None


def test_server_invite_2xx_enters_accepted_and_timer_l_ends_it() -> None:
    t, _ = server_invite()
    ok = phone_response(200)
    assert t.send_response(ok, 3.0) == [Transmit(ok)]
    assert t.state is State.ACCEPTED
    assert t.get_timer() == 35.0
    assert fire(t) == (35.0, [Terminated()])
    assert t.state is State.TERMINATED


def test_server_invite_further_2xx_in_accepted_are_transmitted() -> None:
    t, _ = server_invite()
    t.send_response(phone_response(200), 3.0)
    again = phone_response(200)
    other_fork = phone_response(200, to_tag="tt-other")
    assert t.send_response(again, 4.0) == [Transmit(again)]
    assert t.send_response(other_fork, 5.0) == [Transmit(other_fork)]
    assert t.get_timer() == 35.0  # Timer L is not restarted


def test_server_invite_accepted_absorbs_invite_and_passes_ack_up() -> None:
    t, invite = server_invite()
    t.send_response(phone_response(200), 3.0)
    assert t.receive(invite, 3.5) == []
    ack = phone_ack(branch="z9hG4bK-2xx-ack")
    assert t.receive(ack, 4.0) == [PassUp(ack)]
    assert t.state is State.ACCEPTED


def test_server_invite_timer_g_caps_at_t2_then_timer_h_times_out() -> None:
    t, _ = server_invite()
    busy = phone_response(486)
    assert t.send_response(busy, 0.0) == [Transmit(busy)]
    assert t.state is State.COMPLETED
    times = []
    for _ in range(10):
        due, effects = fire(t)
        assert effects == [Transmit(busy)]
        times.append(due)
    assert times == [0.5, 1.5, 3.5, 7.5, 11.5, 15.5, 19.5, 23.5, 27.5, 31.5]
    assert fire(t) == (32.0, [Timeout("H"), Terminated()])
    assert t.state is State.TERMINATED


def test_server_invite_timer_h_runs_on_reliable_transports_without_g() -> None:
    t, _ = server_invite(reliable=True)
    t.send_response(phone_response(486), 1.0)
    assert t.get_timer() == 33.0
    assert fire(t) == (33.0, [Timeout("H"), Terminated()])


def test_server_invite_retransmission_in_completed_resends_the_final() -> None:
    t, invite = server_invite()
    t.send_response(phone_response(180), 0.0)
    busy = phone_response(486)
    t.send_response(busy, 1.0)
    assert t.receive(invite, 1.2) == [Transmit(busy)]
    assert t.state is State.COMPLETED


def test_server_invite_ack_in_completed_confirms_and_arms_timer_i() -> None:
    t, invite = server_invite()
    t.send_response(phone_response(486), 0.0)
    fire(t)  # one Timer G retransmission at 0.5
    assert t.receive(phone_ack(), 0.8) == []
    assert t.state is State.CONFIRMED
    assert t.get_timer() == pytest.approx(5.8)  # Timer I only: G and H stopped
    assert t.receive(invite, 1.0) == []
    assert t.receive(phone_ack(), 1.0) == []
    assert t.handle_timer(5.0) == []
    assert fire(t)[1] == [Terminated()]
    assert t.state is State.TERMINATED


def test_server_invite_reliable_ack_terminates_at_once() -> None:
    t, _ = server_invite(reliable=True)
    t.send_response(phone_response(486), 0.0)
    assert t.receive(phone_ack(), 0.3) == [Terminated()]
    assert t.state is State.TERMINATED
    assert t.get_timer() is None


def test_server_invite_stray_requests_are_absorbed() -> None:
    t, _ = server_invite()
    assert t.receive(phone_ack(), 0.1) == []  # ACK before any final
    cancel = request("CANCEL", via=PHONE_VIA, extra_via=None)
    assert t.receive(cancel, 0.1) == []
    assert t.state is State.PROCEEDING


def test_server_invite_transport_error_per_rfc6026_figure_7() -> None:
    t, _ = server_invite()
    assert t.transport_error(0.1) == [TransportFailure()]
    assert t.state is State.PROCEEDING
    t.send_response(phone_response(200), 0.2)
    assert t.transport_error(0.3) == [TransportFailure()]
    assert t.state is State.ACCEPTED
    assert t.get_timer() == pytest.approx(32.2)

    t, _ = server_invite()
    t.send_response(phone_response(486), 0.0)
    assert t.transport_error(0.1) == [TransportFailure(), Terminated()]
    assert t.state is State.TERMINATED and t.get_timer() is None

    t, _ = server_invite()
    t.send_response(phone_response(486), 0.0)
    t.receive(phone_ack(), 0.1)
    assert t.transport_error(0.2) == []
    assert t.state is State.CONFIRMED


@pytest.mark.parametrize(
    ("first", "then", "state", "event"),
    [
        (486, 180, "COMPLETED", "send 1xx"),
        (486, 200, "COMPLETED", "send 2xx"),
        (486, 500, "COMPLETED", "send 300-699"),
        (200, 180, "ACCEPTED", "send 1xx"),
        (200, 486, "ACCEPTED", "send 300-699"),
    ],
)
def test_server_invite_illegal_tu_responses_raise_naming_state_and_event(
    first: int, then: int, state: str, event: str
) -> None:
    t, _ = server_invite()
    t.send_response(phone_response(first), 0.0)
    with pytest.raises(TransactionStateError) as info:
        t.send_response(phone_response(then), 1.0)
    assert f"state {state}" in str(info.value)
    assert f"event {event}" in str(info.value)
    assert info.value.kind == "server INVITE"


def test_server_invite_send_after_termination_raises() -> None:
    t, _ = server_invite(reliable=True)
    t.send_response(phone_response(486), 0.0)
    t.receive(phone_ack(), 0.1)
    with pytest.raises(TransactionStateError, match="TERMINATED"):
        t.send_response(phone_response(200), 0.2)


def test_server_invite_illegal_send_leaves_state_alone() -> None:
    t, _ = server_invite()
    busy = phone_response(486)
    t.send_response(busy, 0.0)
    with pytest.raises(TransactionStateError):
        t.send_response(phone_response(200), 0.1)
    assert t.last_response is busy
    assert t.state is State.COMPLETED


@pytest.mark.parametrize("status", [700, 99])
def test_server_send_of_impossible_status_raises_value_error(status: int) -> None:
    t, _ = server_invite()
    bogus = Response(status, "Bogus", phone_response(200).headers)
    with pytest.raises(ValueError):
        t.send_response(bogus, 0.0)


def test_server_invite_rejects_other_methods() -> None:
    with pytest.raises(ValueError):
        ServerInviteTransaction(request("OPTIONS"), reliable=False)


# -- server non-INVITE ----------------------------------------------------------------------


def server_non_invite(
    method: str = "OPTIONS", *, reliable: bool = False
) -> tuple[ServerNonInviteTransaction, Request]:
    req = request(method, via=PHONE_VIA, extra_via=None)
    return ServerNonInviteTransaction(req, reliable=reliable), req


def phone_reply(status: int, method: str = "OPTIONS") -> Response:
    return response(status, method=method, branch=UPSTREAM_BRANCH)


def test_server_non_invite_trying_absorbs_retransmissions() -> None:
    t, req = server_non_invite()
    assert t.state is State.TRYING
    assert t.key == (UPSTREAM_BRANCH, "192.0.2.10:5062", "OPTIONS")
    assert t.receive(req, 0.2) == []
    assert t.get_timer() is None


def test_server_non_invite_provisional_then_retransmission_resends_it() -> None:
    t, req = server_non_invite()
    trying = phone_reply(100)
    assert t.send_response(trying, 0.1) == [Transmit(trying)]
    assert t.state is State.PROCEEDING
    assert t.receive(req, 0.6) == [Transmit(trying)]
    ringing = phone_reply(180)
    assert t.send_response(ringing, 0.7) == [Transmit(ringing)]
    assert t.receive(req, 0.8) == [Transmit(ringing)]


def test_server_non_invite_final_arms_timer_j_and_answers_retransmissions() -> None:
    t, req = server_non_invite()
    ok = phone_reply(200)
    assert t.send_response(ok, 1.0) == [Transmit(ok)]
    assert t.state is State.COMPLETED
    assert t.get_timer() == 33.0
    assert t.receive(req, 2.0) == [Transmit(ok)]
    assert fire(t) == (33.0, [Terminated()])
    assert t.state is State.TERMINATED
    assert t.receive(req, 34.0) == []


def test_server_non_invite_final_after_provisional_completes() -> None:
    t, req = server_non_invite()
    t.send_response(phone_reply(100), 0.0)
    forbidden = phone_reply(403)
    assert t.send_response(forbidden, 0.5) == [Transmit(forbidden)]
    assert t.state is State.COMPLETED
    assert t.receive(req, 0.6) == [Transmit(forbidden)]


def test_server_non_invite_reliable_final_terminates_at_once() -> None:
    t, _ = server_non_invite(reliable=True)
    ok = phone_reply(200)
    assert t.send_response(ok, 1.0) == [Transmit(ok), Terminated()]
    assert t.state is State.TERMINATED
    assert t.get_timer() is None


def test_server_non_invite_ignores_ack_and_other_methods() -> None:
    t, _ = server_non_invite()
    t.send_response(phone_reply(200), 0.0)
    assert t.receive(phone_ack(), 0.1) == []
    assert t.receive(request("BYE", via=PHONE_VIA, extra_via=None), 0.1) == []


@pytest.mark.parametrize(
    ("then", "event"), [(180, "send 1xx"), (200, "send 2xx"), (500, "send 300-699")]
)
def test_server_non_invite_send_after_final_raises(then: int, event: str) -> None:
    t, _ = server_non_invite()
    t.send_response(phone_reply(404), 0.0)
    with pytest.raises(TransactionStateError) as info:
        t.send_response(phone_reply(then), 0.1)
    assert "COMPLETED" in str(info.value) and event in str(info.value)
    assert info.value.kind == "server non-INVITE"


def test_server_non_invite_transport_errors() -> None:
    t, _ = server_non_invite()
    assert t.transport_error(0.0) == []  # nothing sent yet
    assert t.state is State.TRYING
    t.send_response(phone_reply(100), 0.1)
    assert t.transport_error(0.2) == [TransportFailure(), Terminated()]
    assert t.state is State.TERMINATED
    t, _ = server_non_invite()
    t.send_response(phone_reply(200), 0.1)
    assert t.transport_error(0.2) == [TransportFailure(), Terminated()]
    assert t.get_timer() is None


@pytest.mark.parametrize("method", ["INVITE", "ACK"])
def test_server_non_invite_rejects_invite_and_ack(method: str) -> None:
    with pytest.raises(ValueError):
        ServerNonInviteTransaction(request(method), reliable=False)


# -- matching -----------------------------------------------------------------------------------


def test_server_key_is_branch_sent_by_and_method() -> None:
    options = request("OPTIONS", via="SIP/2.0/UDP PBX.Example.NET;branch=z9hG4bK-a1")
    assert server_key(options) == ("z9hG4bK-a1", "pbx.example.net:5060", "OPTIONS")


def test_server_key_maps_ack_to_invite() -> None:
    invite = request("INVITE", via=PHONE_VIA, extra_via=None)
    ack = phone_ack()
    assert server_key(ack) == server_key(invite)
    assert server_key(ack)[2] == "INVITE"


def test_server_key_method_override_finds_the_invite_a_cancel_targets() -> None:
    invite = request("INVITE", via=PHONE_VIA, extra_via=None)
    cancel = request("CANCEL", via=PHONE_VIA, extra_via=None)
    assert server_key(cancel) != server_key(invite)
    assert server_key(cancel)[2] == "CANCEL"
    assert server_key(cancel, "INVITE") == server_key(invite)


def test_server_key_differs_by_branch_and_sent_by() -> None:
    base = server_key(request("OPTIONS", via="SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bK-1"))
    other_branch = server_key(request("OPTIONS", via="SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bK-2"))
    other_host = server_key(request("OPTIONS", via="SIP/2.0/UDP 192.0.2.2:5060;branch=z9hG4bK-1"))
    other_port = server_key(request("OPTIONS", via="SIP/2.0/UDP 192.0.2.1:5070;branch=z9hG4bK-1"))
    assert len({base, other_branch, other_host, other_port}) == 4


OLD_VIA = "SIP/2.0/UDP 203.0.113.7:5060;branch=1234abcd"
BARE_VIA = "SIP/2.0/UDP 203.0.113.7:5060"


@pytest.mark.parametrize("via", [OLD_VIA, BARE_VIA])
def test_server_key_rfc2543_fallback_matches_retransmission_ack_and_cancel(via: str) -> None:
    invite = request("INVITE", via=via, extra_via=None)
    key = server_key(invite)
    assert not key[0].startswith("z9hG4bK")
    assert key[1:] == ("203.0.113.7:5060", "INVITE")
    assert server_key(request("INVITE", via=via, extra_via=None)) == key
    ack = request("ACK", via=via, extra_via=None, to_tag="added-by-us")
    assert server_key(ack) == key
    cancel = request("CANCEL", via=via, extra_via=None)
    assert server_key(cancel, "INVITE") == key
    assert server_key(cancel) != key


@pytest.mark.parametrize(
    "change",
    [
        {"cseq": 8},
        {"call_id": "another@203.0.113.7"},
        {"from_tag": "ft-other"},
        {"uri": "sip:911@other.example.net"},
        {"via": "SIP/2.0/UDP 203.0.113.7:5060;branch=1234abcd;received=10.0.0.1"},
    ],
)
def test_server_key_rfc2543_fallback_separates_other_requests(change: dict[str, Any]) -> None:
    base = server_key(request("INVITE", via=OLD_VIA, extra_via=None))
    fields: dict[str, Any] = {"via": OLD_VIA, "extra_via": None} | change
    assert server_key(request("INVITE", **fields)) != base


def test_server_key_rfc2543_never_collides_with_a_cookie_branch() -> None:
    old = server_key(request("INVITE", via=OLD_VIA, extra_via=None))
    assert old[0].startswith("rfc2543 ")


def test_client_key_is_branch_and_cseq_method() -> None:
    assert client_key(response(180)) == (BRANCH, "INVITE")
    assert client_key(response(200, method="CANCEL")) == (BRANCH, "CANCEL")
    t = started_client_invite()
    assert client_key(response(486)) == t.key
    cancel_txn = ClientNonInviteTransaction(request("CANCEL"), reliable=False)
    assert client_key(response(200, method="CANCEL")) == cancel_txn.key != t.key


# -- the table and the module -------------------------------------------------------------------


def test_terminated_has_no_way_out() -> None:
    assert not [key for key in TRANSITIONS if key[1] is State.TERMINATED]


def test_each_machine_only_uses_its_own_states() -> None:
    allowed = {
        Kind.CLIENT_INVITE: {"CALLING", "PROCEEDING", "COMPLETED", "ACCEPTED", "TERMINATED"},
        Kind.CLIENT_NON_INVITE: {"TRYING", "PROCEEDING", "COMPLETED", "TERMINATED"},
        Kind.SERVER_INVITE: {"PROCEEDING", "COMPLETED", "ACCEPTED", "CONFIRMED", "TERMINATED"},
        Kind.SERVER_NON_INVITE: {"TRYING", "PROCEEDING", "COMPLETED", "TERMINATED"},
    }
    for (kind, state, _), nxt in TRANSITIONS.items():
        assert state.name in allowed[kind]
        assert nxt.name in allowed[kind]


def test_module_is_sans_io() -> None:
    # The source file, not inspect.getsource: a compiled module has no source to show.
    name = transaction_module.__name__.replace(".", "/")
    source = Path(__file__).resolve().parents[3] / "src" / f"{name}.py"
    tree = ast.parse(source.read_text(encoding="utf-8"))
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert not imported & {"asyncio", "socket", "ssl", "time", "threading", "selectors"}


def test_transactions_use_slots() -> None:
    for t in (
        started_client_invite(),
        started_client_non_invite(),
        server_invite()[0],
        server_non_invite()[0],
    ):
        assert not hasattr(t, "__dict__")


# -- nothing a peer sends can make a transaction raise ------------------------------------------

_INCOMING_RESPONSES = [100, 180, 183, 200, 202, 302, 404, 486, 487, 500, 503, 603, 700]


@st.composite
def network_script(draw: st.DrawFn) -> list[tuple[str, int, float]]:
    steps = draw(
        st.lists(
            st.tuples(
                st.sampled_from(["response", "request", "ack", "timer", "transport"]),
                st.sampled_from(_INCOMING_RESPONSES),
                st.floats(min_value=0.0, max_value=20.0),
            ),
            max_size=25,
        )
    )
    return steps


def _run_script(
    t: Any, request: Request, script: list[tuple[str, int, float]], server: bool
) -> None:
    # ``request`` is the transaction's own: a finished transaction no longer holds it.
    now = 0.0
    was_terminated = t.state is State.TERMINATED
    method = request.method
    for what, status, delta in script:
        now += delta
        if what == "response" and not server:
            effects = t.receive(response(status, method=method), now)
        elif what == "request" and server:
            effects = t.receive(request, now)
        elif what == "ack" and server:
            effects = t.receive(phone_ack(), now)
        elif what == "timer":
            due = t.get_timer()
            effects = t.handle_timer(now if due is None else max(now, due))
            now = now if due is None else max(now, due)
        elif what == "transport":
            effects = t.transport_error(now)
        else:
            continue
        ended = Terminated() in effects
        assert ended == (not was_terminated and t.state is State.TERMINATED)
        was_terminated = t.state is State.TERMINATED
        if was_terminated:
            assert t.get_timer() is None


@settings(max_examples=150, deadline=None)
@given(script=network_script(), reliable=st.booleans())
def test_client_transactions_never_raise_on_network_input(
    script: list[tuple[str, int, float]], reliable: bool
) -> None:
    sent = request("INVITE")
    invite = ClientInviteTransaction(sent, reliable=reliable)
    invite.start(0.0)
    _run_script(invite, sent, script, server=False)
    sent = request("OPTIONS")
    options = ClientNonInviteTransaction(sent, reliable=reliable)
    options.start(0.0)
    _run_script(options, sent, script, server=False)


@settings(max_examples=150, deadline=None)
@given(
    script=network_script(),
    reliable=st.booleans(),
    answer=st.sampled_from([None, 180, 200, 486]),
)
def test_server_transactions_never_raise_on_network_input(
    script: list[tuple[str, int, float]], reliable: bool, answer: int | None
) -> None:
    invite_txn, invite = server_invite(reliable=reliable)
    options_txn, options = server_non_invite(reliable=reliable)
    if answer is not None:
        invite_txn.send_response(phone_response(answer), 0.0)
        options_txn.send_response(phone_reply(answer), 0.0)
    _run_script(invite_txn, invite, script, server=True)
    _run_script(options_txn, options, script, server=True)


# -- a finished transaction keeps only what it still reads ----------------------------------


@pytest.mark.parametrize("status", [200, 486])
def test_finished_client_invite_lets_go_of_its_request(status: int) -> None:
    t = ClientInviteTransaction(request("INVITE"), reliable=False)
    t.start(0.0)
    assert not t.finished
    t.receive(response(180), 0.1)
    assert t.request is not None and not t.finished
    final = response(status)
    effects = t.receive(final, 0.2)
    assert t.finished and t.request is None
    if status == 200:
        assert t.receive(final, 0.3) == [PassUp(final)]  # 2xx retransmissions still go up
    else:
        ack = effects[0]
        assert isinstance(ack, Transmit) and isinstance(ack.message, Request)
        assert ack.message.method == "ACK"
        assert t.receive(final, 0.3) == [ack]  # the same ACK answers a retransmission
        with pytest.raises(TransactionStateError):
            t.build_ack(final)


def test_finished_client_non_invite_lets_go_of_its_request() -> None:
    t = ClientNonInviteTransaction(request("BYE"), reliable=False)
    t.start(0.0)
    assert t.receive(response(100, method="BYE"), 0.1)
    assert t.request is not None and not t.finished
    t.receive(response(200, method="BYE"), 0.2)
    assert t.finished and t.request is None and t.method == "BYE"
    assert t.receive(response(200, method="BYE"), 0.3) == []
    assert t.handle_timer(0.2 + t.timers.timer_k) == [Terminated()]


@pytest.mark.parametrize("status", [200, 486])
def test_finished_server_invite_lets_go_of_its_request_and_still_answers(status: int) -> None:
    t, invite = server_invite()
    t.send_response(phone_response(180), 0.0)
    assert t.request is invite and not t.finished
    final = phone_response(status)
    t.send_response(final, 0.1)
    assert t.finished and t.request is None
    # A 2xx is not kept: nothing in ACCEPTED is answered with it. A 486 answers retransmissions.
    assert t.last_response is (None if status == 200 else final)
    if status == 200:
        assert t.receive(invite, 0.2) == []  # absorbed in Accepted (RFC 6026 §7.1)
        ack = phone_ack()
        assert t.receive(ack, 0.3) == [PassUp(ack)]  # the ACK of a 2xx still goes up
        again = phone_response(200)
        assert t.send_response(again, 0.4) == [Transmit(again)]  # and further 2xx go down
    else:
        assert t.handle_timer(0.6) == [Transmit(final)]  # Timer G
        assert t.receive(invite, 0.7) == [Transmit(final)]
        assert t.receive(phone_ack(), 0.8) == []
        assert t.state is State.CONFIRMED and t.finished


def test_finished_server_non_invite_lets_go_of_its_request_and_still_answers() -> None:
    t, req = server_non_invite("BYE")
    ok = phone_reply(200, "BYE")
    t.send_response(ok, 0.0)
    assert t.finished and t.request is None
    assert t.receive(req, 0.5) == [Transmit(ok)]
    assert t.receive(request("OPTIONS", via=PHONE_VIA, extra_via=None), 0.6) == []


@pytest.mark.parametrize(
    "value",
    [
        "SIP/2.0/UDP 192.0.2.1:5070;branch=z9hG4bKa1;rport",
        "SIP/2.0/TCP host.example;rport=5062;received=192.0.2.9",
        "SIP/2.0/UDP [2001:db8::1]:5080;BRANCH=old;ttl=1",
    ],
)
def test_the_keys_read_a_via_as_its_own_properties_do(value: str) -> None:
    via = parse_via(value)
    assert via_branch(via) == via.branch
    assert via_sent_by(via) == via.sent_by
