"""Trunk health on injected time: states, probe scheduling and call order."""

from __future__ import annotations

import pytest

from e911_sip.proxy.routing import LocalAddress
from e911_sip.proxy.trunks import ProbeOptions, TrunkChange, TrunkHealth, build_probe
from e911_sip.sip.message import Request, parse
from e911_sip.sip.uri import parse_uri

A, B, C = "sip:198.51.100.1:5060", "sip:198.51.100.2:5060", "sip:198.51.100.3:5060"
PROBED = ProbeOptions(interval=10.0, timeout=2.0, failures=2, successes=1)


def health(options: ProbeOptions = PROBED, trunks: tuple[str, ...] = (A, B, C)) -> TrunkHealth:
    return TrunkHealth(dict.fromkeys(trunks, options))


def test_every_trunk_starts_up_in_configured_order() -> None:
    h = health()
    assert h.order([A, B, C]) == [A, B, C]
    assert all(h.is_up(t) for t in (A, B, C))


def test_down_after_consecutive_failures_and_tried_last() -> None:
    h = health()
    assert h.record(A, False, "timeout", 1.0, probe=True) is None
    assert h.is_up(A)
    change = h.record(A, False, "timeout", 11.0, probe=True)
    assert change == TrunkChange(A, False, "timeout")
    assert h.order([A, B, C]) == [B, C, A]
    status = h.status(A)
    assert (status.up, status.since, status.failures, status.last_reason) == (
        False,
        11.0,
        2,
        "timeout",
    )


def test_a_success_between_failures_resets_the_count() -> None:
    h = health()
    h.record(A, False, "timeout", 1.0, probe=True)
    h.record(A, True, "ok", 2.0, probe=True)
    assert h.record(A, False, "timeout", 3.0, probe=True) is None
    assert h.is_up(A)


def test_up_again_after_the_configured_successes() -> None:
    h = health(ProbeOptions(interval=5.0, failures=1, successes=2))
    assert h.record(A, False, "503", 1.0, probe=True) == TrunkChange(A, False, "503")
    assert h.record(A, True, "ok", 2.0, probe=True) is None
    assert not h.is_up(A)
    assert h.record(A, True, "ok", 3.0, probe=True) == TrunkChange(A, True, "ok")
    assert h.order([A, B]) == [A, B]


def test_all_down_keeps_every_trunk_in_configured_order() -> None:
    h = health(ProbeOptions(interval=5.0, failures=1))
    for trunk in (C, A, B):
        h.record(trunk, False, "transport", 1.0, probe=False)
    assert h.order([A, B, C]) == [A, B, C]
    h.record(B, True, "ok", 2.0, probe=False)
    assert h.order([A, B, C]) == [B, A, C]


def test_unprobed_trunks_are_never_marked_down() -> None:
    h = health(ProbeOptions(interval=0.0, failures=1))
    assert h.record(A, False, "no_provisional", 1.0, probe=False) is None
    assert h.is_up(A)
    assert h.next_probe() is None
    assert h.due(100.0) == []
    assert not h.status(A).probed


def test_unknown_trunks_keep_their_place() -> None:
    h = health(trunks=(A,))
    h.record(A, False, "timeout", 1.0, probe=True)
    h.record(A, False, "timeout", 2.0, probe=True)
    assert h.order([A, "sip:203.0.113.9:5060"]) == ["sip:203.0.113.9:5060", A]
    assert h.record("sip:203.0.113.9:5060", False, "timeout", 3.0, probe=False) is None


def test_probe_schedule_one_in_flight_per_trunk() -> None:
    h = health(trunks=(A, B))
    assert h.next_probe() == 0.0
    assert h.due(100.0) == [A, B]
    assert h.next_probe() is None  # both in flight
    assert h.due(200.0) == []
    h.record(A, True, "ok", 100.5, probe=True)
    assert h.next_probe() == 110.0  # interval counted from when it was sent
    h.record(B, False, "timeout", 115.0, probe=True)  # took longer than the interval
    assert h.next_probe() == 110.0
    assert h.due(110.0) == [A]
    assert h.next_probe() == 115.0
    assert h.due(115.0) == [B]


def test_a_call_outcome_does_not_disturb_the_probe_in_flight() -> None:
    h = health(trunks=(A,))
    h.due(0.0)
    h.record(A, False, "no_provisional", 1.0, probe=False)
    assert h.next_probe() is None
    h.record(A, True, "ok", 1.5, probe=True)
    assert h.next_probe() == 10.0


def test_failure_statuses() -> None:
    h = health(ProbeOptions(interval=1.0, failure_statuses=frozenset({503})))
    assert h.is_failure_status(A, 503)
    assert not h.is_failure_status(A, 408)
    assert h.probe_timeout(A) == 2.0


@pytest.mark.parametrize(
    "kwargs",
    [{"interval": -1.0}, {"timeout": 0.0}, {"failures": 0}, {"successes": 0}],
)
def test_invalid_options(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        ProbeOptions(**kwargs)  # type: ignore[arg-type]


def test_probe_request_is_a_complete_options() -> None:
    local = LocalAddress("tcp", "192.0.2.1", 5070)
    request = build_probe(
        parse_uri("sip:198.51.100.1:5061;transport=tcp"),
        local,
        branch="z9hG4bKseed.1",
        tag="tag1",
        user_agent="e911-sip",
    )
    wire = parse(request.to_bytes(), datagram=False)
    assert isinstance(wire, Request)
    assert wire.method == "OPTIONS"
    assert wire.uri == "sip:198.51.100.1:5061;transport=tcp"
    assert wire.top_via.branch == "z9hG4bKseed.1"
    assert wire.top_via.transport.lower() == "tcp"
    assert wire.get("max-forwards") == "70"
    assert wire.from_tag == "tag1"
    assert wire.get("to") == "<sip:198.51.100.1:5061;transport=tcp>"
    assert wire.cseq == (1, "OPTIONS")
    assert wire.call_id.startswith("z9hG4bKseed.1@")
    assert wire.get("content-length") == "0"
    assert wire.get("user-agent") == "e911-sip"
