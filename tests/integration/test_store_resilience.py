"""Location lookups under bursts and hiccups, against a real redis-server.

Through ``RedisStore`` and ``ResilientLookup`` directly (the pool, per-record errors, the
circuit breaker against a stopped and restarted server), and through the real edge process
with a SIPp burst of emergency calls from distinct provisioned lines.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from e911_sip.store.base import InvalidRecord, LocationRecord
from e911_sip.store.breaker import BreakerOptions, BreakerState
from e911_sip.store.redis import MAX_IN_FLIGHT, RedisStore
from e911_sip.store.resilient import LookupOptions, LookupSource, ResilientLookup
from tests.integration.harness import (
    SCENARIO_DIR,
    EdgeProcess,
    RedisServer,
    Sipp,
    edge_config,
    free_port,
    trunk_uri,
)

EdgeFactory = Callable[..., EdgeProcess]

# Generous bounds: these tests are about which lookups succeed, not how fast, on a shared
# and loaded machine. The burst itself still finishes in well under a second.
BOUND = 5.0


def line(i: int) -> str:
    return f"321{7000000 + i:07d}"


def endpoint(i: int) -> str:
    return f"555555/e911burst{i:05d}"


def provision_many(redis_server: RedisServer, count: int) -> None:
    client = redis_server.client()
    pipe = client.pipeline(transaction=False)
    for i in range(count):
        pipe.hset(
            f"e911:line:{line(i)}",
            mapping={"provider_endpoint": endpoint(i), "updated_at": "2026-11-01T12:00:00Z"},
        )
    pipe.execute()


def resilient(
    store: RedisStore, failures: list[str], states: list[BreakerState], **breaker: float
) -> ResilientLookup:
    return ResilientLookup(
        store,
        options=LookupOptions(timeout=BOUND, breaker=BreakerOptions(**breaker)),  # type: ignore[arg-type]
        on_failure=failures.append,
        on_breaker=states.append,
    )


async def test_300_concurrent_lookups_on_4_connections_all_find_their_own_record(
    redis_server: RedisServer,
) -> None:
    provision_many(redis_server, 300)
    store = RedisStore(url=redis_server.url, pool_size=4)
    failures: list[str] = []
    states: list[BreakerState] = []
    lookup = resilient(store, failures, states)
    try:
        for _ in range(3):
            results = await asyncio.gather(*(lookup.lookup(line(i)) for i in range(300)))
            wrong = [
                (i, r)
                for i, r in enumerate(results)
                if r.source is not LookupSource.STORE
                or r.record is None
                or r.record.provider_endpoint != endpoint(i)
            ]
            assert wrong == []
        assert failures == [] and states == []
        # More lookups than the pool has connections: the server saw 4 lookup
        # connections, not one per lookup.
        clients = redis_server.client().client_list()
        assert len([c for c in clients if c["cmd"] == "hgetall"]) == 4
    finally:
        await store.close()


async def test_a_bad_record_fails_its_own_line_only(redis_server: RedisServer) -> None:
    provision_many(redis_server, 50)
    client = redis_server.client()
    wrongtype, not_utf8 = "3218880001", "3218880002"
    client.set(f"e911:line:{wrongtype}", "not a hash")
    client.hset(f"e911:line:{not_utf8}", mapping={"provider_endpoint": b"555555/\xff\xfe\x80"})
    store = RedisStore(url=redis_server.url, pool_size=2)
    failures: list[str] = []
    states: list[BreakerState] = []
    # A breaker that opens on two failures in a window: it must not see these as failures.
    lookup = resilient(store, failures, states, min_lookups=2, failure_ratio=0.01)
    try:
        with pytest.raises(InvalidRecord, match="WRONGTYPE"):
            await store.lookup(wrongtype)
        with pytest.raises(InvalidRecord, match="not UTF-8"):
            await store.lookup(not_utf8)
        for _ in range(5):
            # The bad lines in the same pipelines as good ones, on the same connections.
            lines = [wrongtype, *(line(i) for i in range(25)), not_utf8]
            lines += [line(i) for i in range(25, 50)]
            results = dict(
                zip(lines, await asyncio.gather(*(lookup.lookup(n) for n in lines)), strict=True)
            )
            for bad in (wrongtype, not_utf8):
                assert (results[bad].source, results[bad].failure) == (
                    LookupSource.INVALID,
                    "invalid_record",
                )
            for i in range(50):
                record = results[line(i)].record
                assert record is not None and record.provider_endpoint == endpoint(i)
        assert lookup.state is BreakerState.CLOSED and states == []
        assert failures == ["invalid_record"] * 10
        # Provisioning's resync reads past them too.
        assert set(await store.all_lines()) == {line(i) for i in range(50)}
    finally:
        await store.close()


async def test_only_an_unchanged_record_is_deleted(redis_server: RedisServer) -> None:
    # Provisioning's prune of orphan lines against a real server: the Lua check and the
    # DEL are one step, so a record another host rewrote after the read stays.
    store = RedisStore(url=redis_server.url, pool_size=1)
    read = LocationRecord("555555/orphan", "3215550000", "2026-11-01T12:00:00Z")
    try:
        await store.put_records({n: read for n in ("3210000001", "3210000002", "3210000003")})
        client = redis_server.client()
        client.hset("e911:line:3210000002", "provider_endpoint", "555555/claimed")
        client.hset("e911:line:3210000003", "extra", "a field the read did not see")
        deleted = await store.delete_unchanged(
            {n: read for n in ("3210000001", "3210000002", "3210000003", "3210000004")}
        )
        assert deleted == frozenset({"3210000001"})
        assert set(await store.all_lines()) == {"3210000002", "3210000003"}
        assert client.hget("e911:line:3210000002", "provider_endpoint") == "555555/claimed"
    finally:
        await store.close()


async def test_stopped_redis_opens_the_breaker_and_a_restart_closes_it(
    redis_server: RedisServer,
) -> None:
    provision_many(redis_server, 3)
    store = RedisStore(url=redis_server.url, pool_size=2)
    failures: list[str] = []
    states: list[BreakerState] = []
    lookup = resilient(store, failures, states, open_for=3600.0, trial_lookups=2)
    try:
        assert (await lookup.lookup(line(0))).source is LookupSource.STORE
        redis_server.stop()
        first = await lookup.lookup(line(0))
        assert first.source is LookupSource.CACHE
        assert first.record == LocationRecord(endpoint(0), None, "2026-11-01T12:00:00Z")
        assert first.failure == "connection"
        # That was the pooled connection dropping: one event, not proof the store is down.
        assert lookup.state is BreakerState.CLOSED
        second = await lookup.lookup(line(1))
        assert (second.source, second.failure) == (LookupSource.NONE, "connection")
        assert lookup.state is BreakerState.OPEN  # a refused connection is evidence enough
        skipped = await lookup.lookup(line(1))
        assert (skipped.source, skipped.failure) == (LookupSource.NONE, None)
        assert "store skipped" in (skipped.error or "")
        assert not await store.ping()
        redis_server.start()
        assert await store.ping()
        lookup.health(True)  # what the edge's health check does when Redis answers again
        assert lookup.state is BreakerState.HALF_OPEN
        for i in range(2):
            assert (await lookup.lookup(line(i))).source is LookupSource.STORE
        assert lookup.state is BreakerState.CLOSED
        assert states == [BreakerState.OPEN, BreakerState.HALF_OPEN, BreakerState.CLOSED]
        assert failures == ["connection", "connection"]
    finally:
        await store.close()


async def test_a_paused_redis_costs_the_waiting_lookups_only(redis_server: RedisServer) -> None:
    """CLIENT PAUSE holds every other client's commands. On one connection, the lookups it
    can carry are sent and time out; the rest wait for room and run out of pool wait. The
    late replies that come after the pause are dropped, not handed to later lookups."""
    provision_many(redis_server, 300)
    store = RedisStore(url=redis_server.url, pool_size=1, socket_timeout=10.0)
    failures: list[str] = []
    lookup = ResilientLookup(
        store,
        # The breaker is kept out of this test: it is about the connection, not the verdict.
        options=LookupOptions(timeout=0.2, breaker=BreakerOptions(min_lookups=100_000)),
        on_failure=failures.append,
    )
    try:
        assert (await lookup.lookup(line(0))).source is LookupSource.STORE
        redis_server.client().execute_command("CLIENT", "PAUSE", "5000", "ALL")
        try:
            results = await asyncio.gather(*(lookup.lookup(line(i)) for i in range(300)))
        finally:
            redis_server.client().execute_command("CLIENT", "UNPAUSE")
        kinds = [r.failure for r in results]
        assert kinds.count("timeout") == MAX_IN_FLIGHT
        assert kinds.count("pool_wait") == 300 - MAX_IN_FLIGHT
        assert results[0].source is LookupSource.CACHE  # line 0 was found before the pause
        # The same connection, with the replies of the timed-out lookups still coming in.
        later = await asyncio.gather(*(lookup.lookup(line(i)) for i in range(299, 99, -1)))
        for i, result in zip(range(299, 99, -1), later, strict=True):
            assert result.source is LookupSource.STORE, result
            assert result.record is not None and result.record.provider_endpoint == endpoint(i)
        assert sorted(set(failures)) == ["pool_wait", "timeout"]
    finally:
        await store.close()


async def test_connections_killed_by_the_server_are_reopened_without_opening_the_breaker(
    redis_server: RedisServer,
) -> None:
    provision_many(redis_server, 20)
    store = RedisStore(url=redis_server.url, pool_size=2)
    failures: list[str] = []
    states: list[BreakerState] = []
    lookup = resilient(store, failures, states)
    try:
        await asyncio.gather(*(lookup.lookup(line(i)) for i in range(20)))
        client = redis_server.client()
        lookups = [c for c in client.client_list() if c["cmd"] == "hgetall"]
        assert lookups
        for connection in lookups:
            client.execute_command("CLIENT", "KILL", "ID", connection["id"])
        found = 0
        for attempt in range(20):
            result = await lookup.lookup(line(attempt))
            if result.source is LookupSource.STORE:
                found += 1
        # At most the lookups already on a killed connection fail (a dropped connection is
        # one event, not proof the store is down); the rest go out on new connections.
        assert found >= 20 - len(lookups)
        assert set(failures) <= {"connection"} and states == []
        assert lookup.state is BreakerState.CLOSED
    finally:
        await store.close()


def test_edge_reports_the_breaker_while_redis_is_down_and_closes_it_when_back(
    edge_factory: EdgeFactory, sipp: Sipp, redis_server: RedisServer
) -> None:
    provision_many(redis_server, 1)
    trunk = free_port("udp")
    config = edge_config(
        sip_port=free_port("both"),
        http_port=free_port("tcp"),
        emergency_trunks=[trunk_uri(trunk)],
        default_trunks=[trunk_uri(free_port("udp"))],
        store_url=redis_server.url,
        store={"mirror": False},  # the breaker guards direct lookups
    )
    edge = edge_factory(config)
    redis_server.stop()
    uas = sipp.uas("uas_no_location.xml", port=trunk, keys={"expected_callback": line(0)})
    caller = sipp.uac("uac_911.xml", edge.sip_target, keys={"caller": line(0)})
    assert caller.ok, caller.summary()
    assert uas.wait().ok
    assert edge.metric("e911_sip_emergency_calls_total", outcome="store_error") == 1
    # Either the call's own lookup was refused, or a failed health check had opened the
    # breaker first and the lookup was skipped.
    refused = edge.metric("e911_sip_store_lookup_failures_total", kind="connection") or 0
    assert refused + (edge.metric("e911_sip_store_lookups_skipped_total") or 0) == 1
    assert edge.metric("e911_sip_store_breaker_state", state="open") == 1
    status, body = edge.http_get("/readyz")
    assert status == 200 and '"store": "degraded"' in body
    redis_server.start()
    deadline = time.monotonic() + 20.0
    while '"store": "ok"' not in edge.http_get("/readyz")[1]:
        assert time.monotonic() < deadline, "the breaker never closed after Redis came back"
        time.sleep(0.1)
    assert edge.metric("e911_sip_store_breaker_state", state="closed") == 1
    assert edge.metric("e911_sip_store_breaker_transitions_total", state="closed") == 1
    assert edge.metric("e911_sip_store_up") == 1


def _burst_scenario(tmp_path: Path) -> Path:
    """uac_load.xml with the caller taken from an injection file, one line per call."""
    text = (SCENARIO_DIR / "uac_load.xml").read_text(encoding="iso-8859-1")
    text = text.replace("[caller]", "[field0]")
    path = tmp_path / "uac_burst.xml"
    path.write_text(text, encoding="iso-8859-1")
    return path


_PAI = re.compile(r"^P-Asserted-Identity:\s*<sip:(\d{10})@", re.MULTILINE | re.IGNORECASE)
_GEO = re.compile(r"^Geolocation:\s*<[^>]*/(555555/e911burst\d{5})>", re.MULTILINE | re.IGNORECASE)


def test_burst_of_911_calls_from_distinct_lines_all_reach_the_trunk_enriched(
    edge_factory: EdgeFactory, sipp: Sipp, redis_server: RedisServer, tmp_path: Path
) -> None:
    """300 INVITEs at once from 300 provisioned lines: every one reaches the trunk with its
    own caller's location.

    What is asserted is the INVITE each trunk call received and the edge's counters, not
    that every dialog completes: on a loaded 2-core host the edge can be slow enough to
    retransmit an INVITE to the trunk before it reads the trunk's 100 Trying (Timer A), and
    SIPp's load trunk aborts such a call when it expects the ACK. Dialog completion is
    test_edge_calls.py's subject."""
    calls = 300
    provision_many(redis_server, calls)
    callers = tmp_path / "callers.csv"
    callers.write_text("SEQUENTIAL\n" + "".join(f"{line(i)};\n" for i in range(calls)))
    trunk = free_port("udp")
    uas = sipp.uas("uas_load.xml", port=trunk, calls=calls, timeout=60.0)
    config = edge_config(
        sip_port=free_port("both"),
        http_port=free_port("tcp"),
        emergency_trunks=[trunk_uri(trunk)],
        default_trunks=[trunk_uri(free_port("udp"))],
        store_url=redis_server.url,
        # A small pool, so the burst has far more lookups than connections. The bounds are
        # loose so that a loaded test machine cannot turn this into a timing test.
        # Direct lookups (no copy in memory): the pipelined path is the subject here.
        store={"pool_size": 4, "mirror": False},
        emergency={"lookup_timeout": 1.0, "fail_open_after": 3.0},
    )
    edge = edge_factory(config)
    caller = sipp.uac(
        str(_burst_scenario(tmp_path)),
        edge.sip_target,
        keys={"hold_ms": "100"},
        calls=calls,
        rate=10_000,  # as fast as SIPp can send: the INVITEs arrive together
        timeout=60.0,
        extra=["-inf", str(callers), "-l", str(calls)],
    )
    assert caller.successful + caller.failed == calls, caller.summary()
    trunk_result = uas.wait(timeout=60.0)
    assert edge.metric("e911_sip_emergency_calls_total", outcome="enriched") == calls
    assert edge.metric("e911_sip_requests_total", method="INVITE", route="emergency") == calls
    for kind in ("timeout", "connection", "pool_wait", "invalid_record", "error"):
        assert not edge.metric("e911_sip_store_lookup_failures_total", kind=kind), kind
    assert edge.metric("e911_sip_store_breaker_state", state="closed") == 1
    # Each INVITE the trunk received carries its own caller's location.
    invites = [
        block
        for block in trunk_result.message_log.replace("\r\n", "\n").split("\n\n")
        if re.search(r"^INVITE ", block, re.MULTILINE)
    ]
    seen: dict[str, set[str]] = {}
    for block in invites:
        pai = _PAI.search(block)
        assert pai is not None, block
        geo = _GEO.search(block)
        seen.setdefault(pai.group(1), set()).add(geo.group(1) if geo else "no Geolocation")
    assert seen == {line(i): {endpoint(i)} for i in range(calls)}
