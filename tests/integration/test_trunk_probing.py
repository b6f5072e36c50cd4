"""Trunk health through the real edge: OPTIONS probes to real (SIPp) and silent trunks.

Nothing here asserts on timing: the tests wait, bounded, for what /metrics and /readyz report,
then check where the INVITE went.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from tests.integration.harness import (
    EdgeProcess,
    SilentUdpPeer,
    Sipp,
    edge_config,
    free_port,
    trunk_uri,
)

EdgeFactory = Callable[..., EdgeProcess]

# Short probes so that a silent trunk is reported down within a second or two.
PROBES = {"probe_interval": 0.5, "probe_timeout": 0.4, "probe_failures": 2}


def start_edge(edge_factory: EdgeFactory, trunks: list[str], **overrides: Any) -> EdgeProcess:
    emergency = {**PROBES, **overrides.pop("emergency", {})}
    config = edge_config(
        sip_port=free_port("both"),
        http_port=free_port("tcp"),
        emergency_trunks=trunks,
        default_trunks=[trunk_uri(free_port("udp"))],
        emergency=emergency,
        **overrides,
    )
    return edge_factory(config)


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    """Poll ``condition`` until it holds; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.05)


def trunk_up(edge: EdgeProcess, trunk: str) -> float | None:
    return edge.metric("e911_sip_trunk_up", trunk=trunk, route="emergency")


def readiness(edge: EdgeProcess) -> tuple[int, dict[str, Any]]:
    status, body = edge.http_get("/readyz")
    details = json.loads(body)
    assert isinstance(details, dict)
    return status, details


def invites(peer: SilentUdpPeer) -> list[bytes]:
    return [data for data, _ in list(peer.received) if data.startswith(b"INVITE ")]


def test_a_silent_primary_is_probed_down_and_the_call_goes_to_the_secondary(
    edge_factory: EdgeFactory, sipp: Sipp
) -> None:
    secondary_port = free_port("udp")
    secondary_uri = trunk_uri(secondary_port)
    secondary = sipp.uas("uas_probed.xml", port=secondary_port, calls=10_000, timeout=120)
    with SilentUdpPeer() as primary:
        edge = start_edge(edge_factory, [primary.uri, secondary_uri])
        wait_for(lambda: trunk_up(edge, primary.uri) == 0, "the primary to be reported down")
        assert trunk_up(edge, secondary_uri) == 1
        status, details = readiness(edge)
        assert status == 200
        assert details["emergency_trunks"] == "degraded"
        assert details["trunks"]["emergency"][primary.uri]["state"] == "down"
        assert details["trunks"]["emergency"][secondary_uri]["state"] == "up"
        assert primary.count >= 2  # the probes reached it
        probes_ok = edge.metric("e911_sip_trunk_probes_total", trunk=secondary_uri, result="ok")
        assert probes_ok is not None and probes_ok >= 1

        caller = sipp.uac("uac_911.xml", edge.sip_target)
        assert caller.ok, caller.summary()
        assert invites(primary) == []  # the down primary was not tried first
    answered = secondary.stop()
    assert answered.failed == 0, answered.summary()  # the probes' and the INVITE's checks
    assert "INVITE sip:911@" in answered.message_log
    assert edge.metric("e911_sip_trunk_failovers_total") is None
    log = edge.log_text()
    assert "trunk is down; tried last until it answers" in log
    forwarded = [
        json.loads(line) for line in log.splitlines() if '"emergency call forwarded"' in line
    ]
    assert [(f["trunk"], f["attempt"]) for f in forwarded] == [(secondary_uri, 1)]


def test_with_every_trunk_down_the_call_is_still_tried_on_each(
    edge_factory: EdgeFactory, sipp: Sipp
) -> None:
    with SilentUdpPeer() as first, SilentUdpPeer() as second:
        edge = start_edge(
            edge_factory,
            [first.uri, second.uri],
            emergency={"provisional_timeout": 0.5},
            # A short T1 so the last trunk's Timer B (64*T1) ends the call in seconds.
            sip={"t1": 0.1, "t2": 0.4},
        )
        wait_for(
            lambda: readiness(edge)[1]["emergency_trunks"] == "all_down",
            "every emergency trunk to be reported down",
        )
        status, details = readiness(edge)
        assert status == 200 and details["status"] == "ready"  # calls are still attempted
        caller = sipp.uac("uac_911_rejected.xml", edge.sip_target, keys={"expected_status": "408"})
        assert caller.ok, caller.summary()
        assert len(invites(first)) >= 1
        assert len(invites(second)) >= 1
    # Configured order: the first trunk was tried first and failed over to the second.
    failovers = edge.metric(
        "e911_sip_trunk_failovers_total",
        route="emergency",
        trunk=first.uri,
        reason="no_provisional",
    )
    assert failovers == 1
    assert edge.metric("e911_sip_emergency_calls_total", outcome="failed") == 1
