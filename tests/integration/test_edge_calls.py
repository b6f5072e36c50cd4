"""Calls through the real edge process: SIPp caller → edge → SIPp trunks, real redis-server.

Every trunk scenario checks the headers it receives and fails the call when one is missing or
wrong, so a passing call here means Bandwidth would have received the right INVITE.
"""

from __future__ import annotations

import signal
import socket
import time
from collections.abc import Callable
from typing import Any

from tests.integration.harness import (
    DEFAULT_CALLER,
    DEFAULT_ENDPOINT,
    DEFAULT_PAI,
    EdgeProcess,
    RedisServer,
    SilentUdpPeer,
    Sipp,
    edge_config,
    free_port,
    trunk_uri,
)

EdgeFactory = Callable[..., EdgeProcess]


def provision(redis_server: RedisServer, line: str, endpoint: str, **extra: str) -> None:
    """Write a line record the way provisioning does (the documented schema)."""
    redis_server.client().hset(
        f"e911:line:{line}",
        mapping={"provider_endpoint": endpoint, "updated_at": "2026-11-01T12:00:00Z", **extra},
    )


def start_edge(
    edge_factory: EdgeFactory,
    *,
    trunks: list[str],
    default: list[str] | None = None,
    store_url: str = "memory://",
    **overrides: Any,
) -> EdgeProcess:
    config = edge_config(
        sip_port=free_port("both"),
        http_port=free_port("tcp"),
        emergency_trunks=trunks,
        default_trunks=default or [trunk_uri(free_port("udp"))],
        store_url=store_url,
        **overrides,
    )
    return edge_factory(config)


PATIENT_LOOKUP = {"lookup_timeout": 10.0, "fail_open_after": 20.0}
"""``[emergency]`` bounds for a test whose calls must be enriched from Redis: the 50 ms
default lookup is missed whenever the host leaves the edge unscheduled that long, and the
call then goes out without its location. A live Redis answers at once; a killed one is
refused at once, so neither bound is waited out."""


def outcome(edge: EdgeProcess, name: str) -> float:
    return edge.metric("e911_sip_emergency_calls_total", outcome=name) or 0.0


def test_enriched_911_call(
    edge_factory: EdgeFactory, sipp: Sipp, redis_server: RedisServer
) -> None:
    provision(redis_server, DEFAULT_CALLER, DEFAULT_ENDPOINT)
    trunk = free_port("udp")
    uas = sipp.uas("uas_emergency.xml", port=trunk)
    edge = start_edge(
        edge_factory,
        trunks=[trunk_uri(trunk), trunk_uri(free_port("udp"))],
        store_url=redis_server.url,
    )
    caller = sipp.uac("uac_911.xml", edge.sip_target)
    assert caller.ok, caller.summary()
    trunk_result = uas.wait()
    assert trunk_result.ok, trunk_result.summary()
    assert outcome(edge, "enriched") == 1
    assert edge.metric("e911_sip_emergency_enrich_seconds_count") == 1
    assert edge.metric("e911_sip_store_lookup_seconds_count", source="store") == 1
    assert edge.metric("e911_sip_requests_total", method="INVITE", route="emergency") == 1
    assert edge.metric("e911_sip_emergency_results_total", status_class="2xx") == 1


def test_933_call_identified_by_pai(
    edge_factory: EdgeFactory, sipp: Sipp, redis_server: RedisServer
) -> None:
    provision(redis_server, DEFAULT_PAI, "555555/e911pai0000000001")
    trunk = free_port("udp")
    uas = sipp.uas(
        "uas_emergency.xml",
        port=trunk,
        keys={
            "expected_ruser": "933",
            "expected_endpoint": "555555/e911pai0000000001",
            "expected_callback": DEFAULT_PAI,
        },
    )
    edge = start_edge(edge_factory, trunks=[trunk_uri(trunk)], store_url=redis_server.url)
    caller = sipp.uac("uac_911_pai.xml", edge.sip_target, service="933")
    assert caller.ok, caller.summary()
    assert uas.wait().ok


def test_urn_service_sos_goes_out_as_911(
    edge_factory: EdgeFactory, sipp: Sipp, redis_server: RedisServer
) -> None:
    provision(redis_server, DEFAULT_CALLER, DEFAULT_ENDPOINT)
    trunk = free_port("udp")
    uas = sipp.uas("uas_emergency.xml", port=trunk)
    edge = start_edge(edge_factory, trunks=[trunk_uri(trunk)], store_url=redis_server.url)
    caller = sipp.uac("uac_sos.xml", edge.sip_target)
    assert caller.ok, caller.summary()
    assert uas.wait().ok


def test_unprovisioned_911_still_completes_without_geolocation(
    edge_factory: EdgeFactory, sipp: Sipp, redis_server: RedisServer
) -> None:
    trunk = free_port("udp")
    uas = sipp.uas("uas_no_location.xml", port=trunk)
    edge = start_edge(edge_factory, trunks=[trunk_uri(trunk)], store_url=redis_server.url)
    caller = sipp.uac("uac_911.xml", edge.sip_target)
    assert caller.ok, caller.summary()
    assert uas.wait().ok
    assert outcome(edge, "no_location") == 1
    assert "emergency call without location" in edge.log_text()
    assert DEFAULT_CALLER in edge.log_text()


def test_non_emergency_call_passes_through_unchanged(
    edge_factory: EdgeFactory, sipp: Sipp, redis_server: RedisServer
) -> None:
    provision(redis_server, DEFAULT_CALLER, DEFAULT_ENDPOINT)
    default_trunk = free_port("udp")
    uas = sipp.uas("uas_passthrough.xml", port=default_trunk)
    with SilentUdpPeer() as emergency_trunk:
        edge = start_edge(
            edge_factory,
            trunks=[emergency_trunk.uri],
            default=[trunk_uri(default_trunk)],
            store_url=redis_server.url,
        )
        caller = sipp.uac("uac_911.xml", edge.sip_target, service="2125550100")
        assert caller.ok, caller.summary()
        assert uas.wait().ok
        assert emergency_trunk.count == 0
    assert edge.metric("e911_sip_requests_total", method="INVITE", route="default") == 1
    assert outcome(edge, "enriched") == 0


def test_cancel_gets_487(edge_factory: EdgeFactory, sipp: Sipp) -> None:
    trunk = free_port("udp")
    uas = sipp.uas("uas_ring_then_487.xml", port=trunk)
    edge = start_edge(edge_factory, trunks=[trunk_uri(trunk)])
    caller = sipp.uac("uac_cancel.xml", edge.sip_target)
    assert caller.ok, caller.summary()
    assert uas.wait().ok


def test_failover_when_the_first_trunk_answers_503(
    edge_factory: EdgeFactory, sipp: Sipp, redis_server: RedisServer
) -> None:
    provision(redis_server, DEFAULT_CALLER, DEFAULT_ENDPOINT)
    first, second = free_port("udp"), free_port("udp")
    failing = sipp.uas("uas_503.xml", port=first)
    working = sipp.uas("uas_emergency.xml", port=second)
    edge = start_edge(
        edge_factory, trunks=[trunk_uri(first), trunk_uri(second)], store_url=redis_server.url
    )
    caller = sipp.uac("uac_911.xml", edge.sip_target)
    assert caller.ok, caller.summary()
    assert failing.wait().ok
    assert working.wait().ok
    assert outcome(edge, "failover") == 1
    failovers = edge.metric(
        "e911_sip_trunk_failovers_total", route="emergency", trunk=trunk_uri(first), reason="503"
    )
    assert failovers == 1


def test_failover_when_the_first_trunk_stays_silent(
    edge_factory: EdgeFactory, sipp: Sipp, redis_server: RedisServer
) -> None:
    provision(redis_server, DEFAULT_CALLER, DEFAULT_ENDPOINT)
    second = free_port("udp")
    working = sipp.uas("uas_emergency.xml", port=second)
    with SilentUdpPeer() as silent:
        edge = start_edge(
            edge_factory,
            trunks=[silent.uri, trunk_uri(second)],
            store_url=redis_server.url,
            emergency={"provisional_timeout": 1.0},
        )
        caller = sipp.uac("uac_911.xml", edge.sip_target)
        assert caller.ok, caller.summary()
        assert working.wait().ok
        assert silent.count >= 1  # it got the INVITE (and UDP retransmissions) first
    failovers = edge.metric(
        "e911_sip_trunk_failovers_total", route="emergency", reason="no_provisional"
    )
    assert failovers == 1


def test_every_trunk_failing_is_counted_and_logged_critical(
    edge_factory: EdgeFactory, sipp: Sipp
) -> None:
    first, second = free_port("udp"), free_port("udp")
    one = sipp.uas("uas_503.xml", port=first)
    two = sipp.uas("uas_503.xml", port=second)
    edge = start_edge(edge_factory, trunks=[trunk_uri(first), trunk_uri(second)])
    caller = sipp.uac("uac_911_rejected.xml", edge.sip_target, keys={"expected_status": "500"})
    assert caller.ok, caller.summary()
    assert one.wait().ok and two.wait().ok
    assert outcome(edge, "failed") == 1
    assert '"level":"CRITICAL"' in edge.log_text()


def test_911_call_while_redis_is_stopped_is_enriched_from_memory(
    edge_factory: EdgeFactory, sipp: Sipp, redis_server: RedisServer
) -> None:
    provision(redis_server, DEFAULT_CALLER, DEFAULT_ENDPOINT)
    trunk = free_port("udp")
    edge = start_edge(edge_factory, trunks=[trunk_uri(trunk)], store_url=redis_server.url)
    status, body = edge.http_get("/readyz")
    assert status == 200 and '"loaded": true' in body and '"records": 1' in body
    redis_server.stop()
    uas = sipp.uas("uas_emergency.xml", port=trunk)
    caller = sipp.uac("uac_911.xml", edge.sip_target)
    assert caller.ok, caller.summary()
    assert uas.wait().ok
    assert outcome(edge, "enriched") == 1
    deadline = time.monotonic() + 10
    while not edge.metric("e911_sip_location_sync_age_seconds"):
        assert time.monotonic() < deadline, "the sync age never moved"
        time.sleep(0.05)
    status, body = edge.http_get("/readyz")
    assert status == 200 and '"in_sync": false' in body


def test_911_call_while_redis_is_stopped_without_the_mirror(
    edge_factory: EdgeFactory, sipp: Sipp, redis_server: RedisServer
) -> None:
    provision(redis_server, DEFAULT_CALLER, DEFAULT_ENDPOINT)
    trunk = free_port("udp")
    edge = start_edge(
        edge_factory,
        trunks=[trunk_uri(trunk)],
        store_url=redis_server.url,
        store={"mirror": False},
    )
    redis_server.stop()
    uas = sipp.uas("uas_no_location.xml", port=trunk)
    caller = sipp.uac("uac_911.xml", edge.sip_target)
    assert caller.ok, caller.summary()
    assert uas.wait().ok
    assert outcome(edge, "store_error") == 1
    status, body = edge.http_get("/readyz")
    assert status == 200 and '"store": "degraded"' in body


def test_cached_location_is_used_while_redis_is_down_without_the_mirror(
    edge_factory: EdgeFactory, sipp: Sipp, redis_server: RedisServer
) -> None:
    provision(redis_server, DEFAULT_CALLER, DEFAULT_ENDPOINT)
    trunk = free_port("udp")
    edge = start_edge(
        edge_factory,
        trunks=[trunk_uri(trunk)],
        store_url=redis_server.url,
        store={"mirror": False},
        emergency=PATIENT_LOOKUP,
    )
    first = sipp.uas("uas_emergency.xml", port=trunk)
    assert sipp.uac("uac_911.xml", edge.sip_target).ok
    assert first.wait().ok
    redis_server.kill()
    second = sipp.uas("uas_emergency.xml", port=trunk)
    caller = sipp.uac("uac_911.xml", edge.sip_target)
    assert caller.ok, caller.summary()
    assert second.wait().ok
    assert outcome(edge, "cached") == 1


def test_an_operator_change_in_redis_reaches_the_next_call(
    edge_factory: EdgeFactory, sipp: Sipp, redis_server: RedisServer
) -> None:
    provision(redis_server, DEFAULT_CALLER, "5555555/before")
    trunk = free_port("udp")
    edge = start_edge(edge_factory, trunks=[trunk_uri(trunk)], store_url=redis_server.url)
    # redis-cli HSET, as far as Redis can tell: nothing tells the edge but Redis itself.
    redis_server.client().hset(f"e911:line:{DEFAULT_CALLER}", "provider_endpoint", "5555555/after")
    deadline = time.monotonic() + 10
    while not edge.metric("e911_sip_location_updates_total"):
        assert time.monotonic() < deadline, "the change never reached the edge"
        time.sleep(0.02)
    uas = sipp.uas("uas_emergency.xml", port=trunk, keys={"expected_endpoint": "5555555/after"})
    caller = sipp.uac("uac_911.xml", edge.sip_target)
    assert caller.ok, caller.summary()
    assert uas.wait().ok


def test_enriched_call_over_tcp(
    edge_factory: EdgeFactory, sipp: Sipp, redis_server: RedisServer
) -> None:
    provision(redis_server, DEFAULT_CALLER, DEFAULT_ENDPOINT)
    trunk = free_port("tcp")
    uas = sipp.uas("uas_emergency.xml", port=trunk, transport="t1")
    edge = start_edge(edge_factory, trunks=[trunk_uri(trunk, "tcp")], store_url=redis_server.url)
    caller = sipp.uac("uac_911.xml", edge.sip_target, transport="t1")
    assert caller.ok, caller.summary()
    assert uas.wait().ok
    assert outcome(edge, "enriched") == 1


def _udp_exchange(port: int, data: bytes) -> bytes:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(5.0)
        sock.sendto(data, ("127.0.0.1", port))
        reply, _ = sock.recvfrom(65535)
        return reply


def test_options_keepalive_and_malformed_requests(edge_factory: EdgeFactory) -> None:
    edge = start_edge(edge_factory, trunks=[trunk_uri(free_port("udp"))])
    options = (
        f"OPTIONS sip:127.0.0.1:{edge.sip_port} SIP/2.0\r\n"
        "Via: SIP/2.0/UDP 127.0.0.1:5999;branch=z9hG4bKkeepalive1;rport\r\n"
        "Max-Forwards: 70\r\nFrom: <sip:portasip@127.0.0.1>;tag=k1\r\n"
        f"To: <sip:127.0.0.1:{edge.sip_port}>\r\nCall-ID: keepalive-1\r\n"
        "CSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n"
    ).encode()
    assert _udp_exchange(edge.sip_port, options).startswith(b"SIP/2.0 200 OK\r\n")
    broken = options.replace(b"CSeq: 1 OPTIONS", b"CSeq: one OPTIONS").replace(
        b"keepalive1", b"keepalive2"
    )
    assert _udp_exchange(edge.sip_port, broken).startswith(b"SIP/2.0 400 ")
    assert edge.metric("e911_sip_messages_discarded_total", reason="malformed") == 1


def test_sigterm_keeps_routing_an_answered_911_call_until_its_bye(
    edge_factory: EdgeFactory, sipp: Sipp
) -> None:
    trunk = free_port("udp")
    uas = sipp.uas("uas_no_location.xml", port=trunk)
    edge = start_edge(edge_factory, trunks=[trunk_uri(trunk)])
    caller = sipp.start_uac("uac_911.xml", edge.sip_target, keys={"hold_ms": "3000"})
    deadline = time.monotonic() + 10
    while not edge.metric("e911_sip_emergency_results_total", status_class="2xx"):
        assert time.monotonic() < deadline, "the call was not answered"
        time.sleep(0.02)
    edge.signal(signal.SIGTERM)
    deadline = time.monotonic() + 10
    while (ready := edge.http_get("/readyz"))[0] != 503:
        assert time.monotonic() < deadline, "readiness never turned false"
        time.sleep(0.02)
    assert "draining" in ready[1]
    result = caller.wait(timeout=30)
    assert result.ok, result.summary()  # the BYE went through the draining edge
    assert uas.wait().ok
    assert edge.wait(timeout=15) == 0


def test_metrics_and_health_endpoints(edge_factory: EdgeFactory) -> None:
    edge = start_edge(edge_factory, trunks=[trunk_uri(free_port("udp"))])
    assert edge.http_get("/healthz")[0] == 200
    status, body = edge.http_get("/readyz")
    assert status == 200 and '"listeners": "bound"' in body
    text = edge.metrics()
    for name in (
        "e911_sip_emergency_calls_total",
        "e911_sip_transactions_in_flight",
        "e911_sip_emergency_enrich_seconds_bucket",
        "e911_sip_store_up",
    ):
        assert name in text
