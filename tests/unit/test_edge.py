"""The asyncio edge around the core, with the recording transport and the memory store."""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import random
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from e911_sip.callrecords.recorder import CallRecorder
from e911_sip.callrecords.stream import LocalHandoff
from e911_sip.edge import Edge, EdgeOptions, Enricher
from e911_sip.metrics import Metrics
from e911_sip.notify.event import CallEvent
from e911_sip.policy.emergency import emergency_number
from e911_sip.policy.enrich import Enrichment, EnrichOptions, enrich
from e911_sip.proxy.admission import LoadSignal
from e911_sip.proxy.core import (
    FailOpen,
    ProxyCore,
    ProxyOptions,
    Recovered,
)
from e911_sip.proxy.routing import LocalAddress
from e911_sip.sip.message import Request, make_response, parse
from e911_sip.sip.peer import Peer
from e911_sip.store.base import LocationRecord, LocationStore
from e911_sip.store.memory import MemoryStore
from e911_sip.store.resilient import LookupOptions, ResilientLookup
from e911_sip.transport.recording import RecordingTransport

DATA = Path(__file__).resolve().parents[1] / "data" / "valid"
SOFTSWITCH = Peer("udp", "192.0.2.10", 5060)
RECORD = LocationRecord("5555555/e911abc123def456")
BASE = "https://emergency.bandwidth.com/locations/"


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait for ``condition``, bounded; it fails the test rather than hang."""
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.001)


def build(
    store: LocationStore,
    *,
    provisional_timeout: float = 2.0,
    lookup_timeout: float = 0.05,
    notify: Callable[[CallEvent], None] | None = None,
    recorder: CallRecorder | None = None,
    overload: Callable[[], str | None] = lambda: None,
    enricher: Enricher | None = None,
) -> tuple[Edge, RecordingTransport, Metrics]:
    options = ProxyOptions(
        local=(LocalAddress("udp", "192.0.2.1", 5070),),
        emergency_classifier=functools.partial(emergency_number, numbers=frozenset({"911"})),
        emergency_trunks=("sip:198.51.100.1:5060", "sip:198.51.100.2:5060"),
        default_trunks=("sip:203.0.113.5:5060",),
        provisional_timeout=provisional_timeout,
        trusted_sources=(ipaddress.ip_network("192.0.2.0/24"),),
        overload=overload,
    )
    metrics = Metrics()
    edge = Edge(
        core=ProxyCore(options=options, entropy=random.Random(1).randbytes),
        store=store,
        lookup=ResilientLookup(store, options=LookupOptions(timeout=lookup_timeout)),
        metrics=metrics,
        options=EdgeOptions(enrich=EnrichOptions(geolocation_base_url=BASE)),
        notify=notify,
        recorder=recorder,
        enrich=enricher,
    )
    transport = RecordingTransport(sink=edge)
    edge.add_transport("udp", transport)
    return edge, transport, metrics


def invite() -> bytes:
    return (DATA / "portasip_911.sip").read_bytes()


def invites_to(transport: RecordingTransport, host: str) -> list[Request]:
    out = []
    for sent in transport.sent:
        message = parse(sent.data)
        if sent.peer.host == host and isinstance(message, Request) and message.method == "INVITE":
            out.append(message)
    return out


def outcome(metrics: Metrics, name: str) -> float:
    value = metrics.registry.get_sample_value("e911_sip_emergency_calls_total", {"outcome": name})
    return value or 0.0


async def test_emergency_call_is_enriched_counted_and_timed() -> None:
    edge, transport, metrics = build(MemoryStore({"3215551234": RECORD}))
    edge.message_received(invite(), SOFTSWITCH)
    await until(lambda: bool(invites_to(transport, "198.51.100.1")))
    sent = invites_to(transport, "198.51.100.1")[0]
    assert sent.get("geolocation") == f"<{BASE}5555555/e911abc123def456>"
    assert sent.get("priority") == "emergency"
    assert sent.uri == "sip:911@198.51.100.1:5060"
    assert outcome(metrics, "enriched") == 1
    count = metrics.registry.get_sample_value("e911_sip_emergency_enrich_seconds_count")
    assert count == 1
    routed = metrics.registry.get_sample_value(
        "e911_sip_requests_total", {"method": "INVITE", "route": "emergency"}
    )
    assert routed == 1


async def test_unprovisioned_caller_still_reaches_the_trunk(
    caplog: pytest.LogCaptureFixture,
) -> None:
    edge, transport, metrics = build(MemoryStore())
    with caplog.at_level(logging.WARNING, logger="e911_sip.edge"):
        edge.message_received(invite(), SOFTSWITCH)
        await until(lambda: bool(invites_to(transport, "198.51.100.1")))
    sent = invites_to(transport, "198.51.100.1")[0]
    assert not sent.has("geolocation")
    assert sent.get("priority") == "emergency"
    assert outcome(metrics, "no_location") == 1
    record = [r for r in caplog.records if "without location" in r.getMessage()][0]
    assert record.levelno == logging.WARNING
    assert record.__dict__["call_id"] == "3848276298220188511@192.0.2.10"
    assert record.__dict__["caller"] == "3215551234"


async def test_store_down_still_forwards_and_counts() -> None:
    store = MemoryStore({"3215551234": RECORD})
    store.available = False
    edge, transport, metrics = build(store)
    edge.message_received(invite(), SOFTSWITCH)
    await until(lambda: bool(invites_to(transport, "198.51.100.1")))
    assert not invites_to(transport, "198.51.100.1")[0].has("geolocation")
    assert outcome(metrics, "store_error") == 1


async def test_hung_store_is_bounded_by_the_lookup_timeout() -> None:
    class Hung:
        """A store that never answers (a Redis stuck behind a dead network path)."""

        async def lookup(self, line: str) -> LocationRecord | None:
            await asyncio.Event().wait()
            return None

        async def ping(self) -> bool:
            return False

        async def close(self) -> None:
            return None

    edge, transport, metrics = build(Hung(), lookup_timeout=0.02)
    edge.message_received(invite(), SOFTSWITCH)
    await until(lambda: bool(invites_to(transport, "198.51.100.1")))
    assert outcome(metrics, "store_error") == 1
    assert outcome(metrics, "fail_open") == 0


async def test_a_bug_in_enrichment_sends_the_original_invite(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken(
        request: Request,
        *,
        line: str | None,
        provider_endpoint: str | None,
        callback: str | None = None,
        options: EnrichOptions,
    ) -> Enrichment:
        raise RuntimeError("enrichment bug")

    edge, transport, metrics = build(MemoryStore({"3215551234": RECORD}), enricher=broken)
    with caplog.at_level(logging.ERROR, logger="e911_sip.edge"):
        edge.message_received(invite(), SOFTSWITCH)
        await until(lambda: bool(invites_to(transport, "198.51.100.1")))
    sent = invites_to(transport, "198.51.100.1")[0]
    assert not sent.has("priority") and not sent.has("geolocation")
    assert sent.uri == "sip:911@198.51.100.1:5060"
    assert outcome(metrics, "enrich_error") == 1
    assert any(r.exc_info for r in caplog.records)


async def test_a_replacement_enrichment_is_the_one_called() -> None:
    calls: list[str | None] = []

    def counted(
        request: Request,
        *,
        line: str | None,
        provider_endpoint: str | None,
        callback: str | None = None,
        options: EnrichOptions,
    ) -> Enrichment:
        calls.append(line)
        return enrich(
            request,
            line=line,
            provider_endpoint=provider_endpoint,
            callback=callback,
            options=options,
        )

    edge, transport, metrics = build(MemoryStore({"3215551234": RECORD}), enricher=counted)
    edge.message_received(invite(), SOFTSWITCH)
    await until(lambda: bool(invites_to(transport, "198.51.100.1")))
    assert calls == ["3215551234"]
    sent = invites_to(transport, "198.51.100.1")[0]
    assert sent.get("geolocation") == f"<{BASE}5555555/e911abc123def456>"
    assert outcome(metrics, "enriched") == 1


async def test_delivery_failure_fails_over_to_the_next_trunk() -> None:
    edge, transport, metrics = build(MemoryStore({"3215551234": RECORD}))
    transport.fail_to.add("198.51.100.1")
    edge.message_received(invite(), SOFTSWITCH)
    await until(lambda: bool(invites_to(transport, "198.51.100.2")))
    assert outcome(metrics, "failover") == 1
    sent = invites_to(transport, "198.51.100.2")[0]
    assert sent.get("geolocation") == f"<{BASE}5555555/e911abc123def456>"


async def test_silent_trunk_fails_over_on_the_real_loop_timer() -> None:
    edge, transport, metrics = build(MemoryStore({"3215551234": RECORD}), provisional_timeout=0.05)
    edge.message_received(invite(), SOFTSWITCH)
    await until(lambda: bool(invites_to(transport, "198.51.100.2")))
    reasons = metrics.registry.get_sample_value(
        "e911_sip_trunk_failovers_total",
        {"route": "emergency", "trunk": "sip:198.51.100.1:5060", "reason": "no_provisional"},
    )
    assert reasons == 1
    edge.close()


async def test_readiness_reports_store_and_listeners() -> None:
    store = MemoryStore()
    edge, transport, _ = build(store)
    ready, details = edge.readiness()
    assert ready and details["store"] == "ok" and details["listeners"] == "bound"
    transport.bound = False
    assert edge.readiness()[0] is False
    transport.bound = True
    stop = asyncio.Event()
    store.available = False
    task = asyncio.create_task(edge.watch_store(stop))
    await until(lambda: not edge.store_ok)
    ready, details = edge.readiness()
    assert ready and details["store"] == "degraded"  # fail-open: still ready
    stop.set()
    await task


async def test_drain_waits_for_calls_in_flight() -> None:
    edge, transport, _ = build(MemoryStore({"3215551234": RECORD}))
    edge.message_received(invite(), SOFTSWITCH)
    await until(lambda: bool(invites_to(transport, "198.51.100.1")))
    force = asyncio.Event()
    drain = asyncio.create_task(edge.drain(force))
    await asyncio.sleep(0)
    assert not drain.done() and edge.readiness()[1]["status"] == "draining"
    force.set()
    await asyncio.wait_for(drain, 5)
    edge.close()


async def test_a_store_that_must_be_awaited_is_looked_up_in_a_task() -> None:
    class Remote:
        """Answers only through the event loop, as Redis does."""

        def __init__(self) -> None:
            self.calls = 0

        async def lookup(self, line: str) -> LocationRecord | None:
            self.calls += 1
            await asyncio.sleep(0)
            return RECORD if line == "3215551234" else None

        async def ping(self) -> bool:
            return True

        async def close(self) -> None:
            return None

    store = Remote()
    edge, transport, metrics = build(store)
    edge.message_received(invite(), SOFTSWITCH)
    # Nothing can have been looked up before the loop ran the task.
    assert store.calls == 0 and not invites_to(transport, "198.51.100.1")
    await until(lambda: bool(invites_to(transport, "198.51.100.1")))
    assert invites_to(transport, "198.51.100.1")[0].get("geolocation") is not None
    assert outcome(metrics, "enriched") == 1
    assert metrics.registry.get_sample_value("e911_sip_emergency_enrich_seconds_count") == 1


async def test_a_bug_in_the_core_is_counted_and_the_edge_keeps_serving(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The bug is the core's overload hook (its options' ``overload``, the LoadSignal in
    # production) raising once, before the core keeps any state about the request: the
    # exception leaves ProxyCore.receive as any bug in the core would.
    calls = 0

    def flaky() -> str | None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("core bug")
        return None

    edge, transport, metrics = build(MemoryStore({"3215551234": RECORD}), overload=flaky)
    with caplog.at_level(logging.ERROR, logger="e911_sip.edge"):
        edge.message_received(invite(), SOFTSWITCH)  # lost to the bug, but nothing escapes
    assert (
        metrics.registry.get_sample_value(
            "e911_sip_messages_discarded_total", {"reason": "internal_error"}
        )
        == 1
    )
    assert any(r.exc_info for r in caplog.records)
    edge.message_received(invite(), SOFTSWITCH)  # the caller's retransmission gets through
    await until(lambda: bool(invites_to(transport, "198.51.100.1")))


async def test_a_malformed_flood_is_counted_and_logged_as_a_summary(
    caplog: pytest.LogCaptureFixture,
) -> None:
    edge, transport, metrics = build(MemoryStore())
    with caplog.at_level(logging.INFO, logger="e911_sip.edge"):
        for n in range(2000):
            edge.message_received(b"NOT SIP %d\r\n\r\n" % n, SOFTSWITCH)
    discarded = metrics.registry.get_sample_value(
        "e911_sip_messages_discarded_total", {"reason": "malformed"}
    )
    assert discarded == 2000
    lines = [r for r in caplog.records if r.name == "e911_sip.edge"]
    assert 0 < len(lines) <= 5
    assert all(r.getMessage() == "message discarded" for r in lines)


async def test_shed_requests_and_evictions_are_counted() -> None:
    store = MemoryStore({"3215551234": RECORD})
    options = ProxyOptions(
        local=(LocalAddress("udp", "192.0.2.1", 5070),),
        emergency_classifier=functools.partial(emergency_number, numbers=frozenset({"911"})),
        emergency_trunks=("sip:198.51.100.1:5060",),
        default_trunks=("sip:203.0.113.5:5060",),
        max_transactions=16,
        shed_transactions=16,
        trusted_sources=(ipaddress.ip_network("192.0.2.0/24"),),
    )
    metrics = Metrics()
    edge = Edge(
        core=ProxyCore(options=options, entropy=random.Random(1).randbytes),
        store=store,
        lookup=ResilientLookup(store, options=LookupOptions()),
        metrics=metrics,
        options=EdgeOptions(enrich=EnrichOptions(geolocation_base_url=BASE)),
    )
    transport = RecordingTransport(sink=edge)
    edge.add_transport("udp", transport)
    plain = invite().replace(b"INVITE sip:911@", b"INVITE sip:3215550000@")
    for n in range(12):
        edge.message_received(
            plain.replace(b"Call-ID: ", b"Call-ID: flood%d-" % n).replace(
                b"branch=z9hG4bK", b"branch=z9hG4bKflood%d" % n
            ),
            SOFTSWITCH,
        )
    shed = metrics.registry.get_sample_value("e911_sip_shed_total", {"reason": "transactions_full"})
    assert shed == 4
    edge.message_received(invite(), SOFTSWITCH)
    await until(lambda: bool(invites_to(transport, "198.51.100.1")))
    evicted = metrics.registry.get_sample_value("e911_sip_evicted_total", {"table": "contexts"})
    assert evicted is not None and evicted >= 1


async def test_load_monitor_measures_lag_into_the_load_signal() -> None:
    store = MemoryStore()
    metrics = Metrics()
    edge = Edge(
        core=ProxyCore(
            options=ProxyOptions(local=(LocalAddress("udp", "192.0.2.1", 5070),)),
            entropy=random.Random(1).randbytes,
        ),
        store=store,
        lookup=ResilientLookup(store, options=LookupOptions()),
        metrics=metrics,
        options=EdgeOptions(lag_interval=0.2),
        load=LoadSignal(max_lag=0.1, max_queue=10),
    )
    stop = asyncio.Event()
    task = asyncio.create_task(edge.monitor_load(stop))
    async with asyncio.timeout(20):
        while edge.load.lag <= 0.1:
            # Hold the loop longer than the interval, again and again: every tick is late.
            time.sleep(0.3)
            await asyncio.sleep(0)
    assert edge.load.shed_reason() == "lag"
    assert metrics.registry.get_sample_value("e911_sip_event_loop_lag_seconds") == edge.load.lag
    stop.set()
    await task


CALL_FIELDS = ("call_id", "caller", "number", "outcome", "enriched", "trunk", "attempt")


def call_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if "call_id" in r.__dict__]


@pytest.mark.parametrize(
    ("records", "expected_outcome", "enriched"),
    [({"3215551234": RECORD}, "enriched", True), ({}, "no_location", False)],
)
async def test_every_line_about_a_call_carries_the_same_call_fields(
    caplog: pytest.LogCaptureFixture,
    records: dict[str, LocationRecord],
    expected_outcome: str,
    enriched: bool,
) -> None:
    edge, transport, _ = build(MemoryStore(records), provisional_timeout=0.05)
    with caplog.at_level(logging.INFO, logger="e911_sip.edge"):
        edge.message_received(invite(), SOFTSWITCH)
        await until(lambda: bool(invites_to(transport, "198.51.100.2")))
    lines = call_lines(caplog)
    assert lines
    for record in lines:
        fields = record.__dict__
        assert all(name in fields for name in CALL_FIELDS), record.getMessage()
        assert fields["caller"] == "3215551234" and fields["number"] == "911"
        assert fields["outcome"] == expected_outcome
    forwarded = [r.__dict__ for r in lines if r.getMessage() == "emergency call forwarded"]
    assert [(f["trunk"], f["attempt"], f["enriched"]) for f in forwarded] == [
        ("sip:198.51.100.1:5060", 1, enriched),
        ("sip:198.51.100.2:5060", 2, enriched),
    ]
    edge.close()


async def test_drain_does_not_wait_for_a_non_emergency_transaction(
    caplog: pytest.LogCaptureFixture,
) -> None:
    edge, transport, _ = build(MemoryStore())
    request = invite().replace(b"sip:911@", b"sip:2125550100@").replace(b"<sip:911@", b"<sip:2125")
    edge.message_received(request, SOFTSWITCH)
    await until(lambda: bool(invites_to(transport, "203.0.113.5")))
    assert edge.readiness()[1]["transactions"] >= 2
    with caplog.at_level(logging.INFO, logger="e911_sip.edge"):
        await asyncio.wait_for(edge.drain(asyncio.Event()), 5)
    finished = [r.__dict__ for r in caplog.records if r.getMessage() == "drain finished"]
    assert finished[0]["reason"] == "idle"
    assert finished[0]["not_waited_for"]["contexts"] == 1
    edge.close()


async def test_drain_logs_what_it_waits_for_until_the_emergency_call_is_answered(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Slow:
        """Answers when the test says so, as a Redis that is slow."""

        def __init__(self) -> None:
            self.go = asyncio.Event()

        async def lookup(self, line: str) -> LocationRecord | None:
            await self.go.wait()
            return RECORD

        async def ping(self) -> bool:
            return True

        async def close(self) -> None:
            return None

    store = Slow()
    edge, transport, _ = build(store, lookup_timeout=30.0)
    # A short log interval, so the test sees the drain's line at once.
    edge._options = EdgeOptions(
        enrich=EnrichOptions(geolocation_base_url=BASE), drain_log_interval=0.01
    )
    edge.message_received(invite(), SOFTSWITCH)
    await until(lambda: edge.waiting_for()["lookups"] == 1)
    with caplog.at_level(logging.INFO, logger="e911_sip.edge"):
        drain = asyncio.create_task(edge.drain(asyncio.Event()))

        def waiting() -> list[dict[str, object]]:
            return [
                r.__dict__
                for r in caplog.records
                if r.getMessage() == "draining: waiting for calls"
            ]

        await until(lambda: bool(waiting()))
        assert waiting()[0]["lookups"] == 1 and waiting()[0]["emergency_calls"] == 1
        store.go.set()
        await until(lambda: bool(invites_to(transport, "198.51.100.1")))
        await until(lambda: edge.waiting_for()["lookups"] == 0)
        assert not drain.done()  # no final response yet
        sent = invites_to(transport, "198.51.100.1")[0]
        busy = make_response(sent, 486, to_tag="trunk1")
        edge.message_received(busy.to_bytes(), Peer("udp", "198.51.100.1", 5060))
        await asyncio.wait_for(drain, 5)
    edge.close()


async def test_the_emergency_invite_leaves_before_its_notification_is_built() -> None:
    # The bookkeeping after enrichment (the Kari's Law event, the log line) must not stand
    # between the INVITE and the wire: the INVITE is already with the transport when the
    # notification is handed over.
    seen_at_notify: list[int] = []
    transports: list[RecordingTransport] = []
    edge, transport, _ = build(
        MemoryStore({"3215551234": RECORD}),
        notify=lambda event: seen_at_notify.append(len(invites_to(transports[0], "198.51.100.1"))),
    )
    transports.append(transport)
    edge.message_received(invite(), SOFTSWITCH)
    await until(lambda: bool(seen_at_notify))
    assert seen_at_notify == [1]


async def test_the_emergency_invite_leaves_before_the_calls_bookkeeping() -> None:
    # The call's record, its enrichment outcome and its notification all come after the
    # INVITE is with the transport; the record is begun once, and the 100 Trying follows
    # the INVITE on the wire.
    seen: list[tuple[str, int]] = []
    transports: list[RecordingTransport] = []

    def invites_sent() -> int:
        return len(invites_to(transports[0], "198.51.100.1"))

    # The recorder reads its clock for each event it records: the first read is the call's
    # record begun (the recorder is compiled in the compiled build, and not subclassed).
    def wall() -> float:
        if not any(kind == "record" for kind, _ in seen):
            seen.append(("record", invites_sent()))
        return time.time()

    handoff = LocalHandoff()
    recorder = CallRecorder(sink=handoff, metrics=Metrics(), wall_clock=wall)
    edge, transport, metrics = build(
        MemoryStore({"3215551234": RECORD}),
        notify=lambda event: seen.append(("notify", invites_sent())),
        recorder=recorder,
    )
    transports.append(transport)
    edge.message_received(invite(), SOFTSWITCH)
    # An in-memory store answers at once: all of it happened in the one call.
    assert seen == [("record", 1), ("notify", 1)]
    # The enrichment reached the record, so it came after the record was begun.
    stop = asyncio.Event()
    stop.set()
    await recorder.run(stop)
    delivery = await handoff.read(count=10, block=0)
    assert delivery is not None
    [record] = delivery.records
    assert record.outcome == "enriched" and record.caller == "3215551234"
    assert outcome(metrics, "enriched") == 1
    first, second = transport.sent[:2]
    assert first.peer.host == "198.51.100.1" and first.data.startswith(b"INVITE ")
    assert second.peer == SOFTSWITCH and second.data.startswith(b"SIP/2.0 100 ")


async def test_working_transactions_have_a_gauge_apart_from_the_finished_ones() -> None:
    edge, transport, metrics = build(MemoryStore({"3215551234": RECORD}))
    edge.message_received(invite(), SOFTSWITCH)
    await until(lambda: bool(invites_to(transport, "198.51.100.1")))

    def gauge(name: str) -> float | None:
        return metrics.registry.get_sample_value(name)

    # The caller's transaction and the trunk's, neither answered yet.
    assert gauge("e911_sip_transactions_working") == 2
    forwarded = invites_to(transport, "198.51.100.1")[0]
    answer = make_response(forwarded, 200, to_tag="psap")
    edge.message_received(answer.to_bytes(), Peer("udp", "198.51.100.1", 5060))
    # Both finished; kept to absorb retransmissions, no longer counted as work.
    assert gauge("e911_sip_transactions_working") == 0
    assert gauge("e911_sip_transactions_in_flight") == 2
    edge.close()


async def test_a_call_routed_without_state_is_counted_and_held_by_a_drain() -> None:
    edge, _, metrics = build(MemoryStore())
    trunk = Peer("udp", "198.51.100.1", 5060)
    # What the core reports for a trunk's request in a dialog another process set up.
    edge._on_event(Recovered("trunk_dialog", True, trunk, "911-elsewhere", "INFO"))
    edge._on_event(Recovered("late_2xx", False, trunk, "other-elsewhere", "INVITE"))
    for kind in ("trunk_dialog", "late_2xx"):
        count = metrics.registry.get_sample_value("e911_sip_recovered_total", {"kind": kind})
        assert count == 1
    waiting = edge.waiting_for()
    assert waiting["emergency_dialogs"] == 1 and waiting["dialogs"] == 1


async def test_a_fail_open_is_counted_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    edge, _, metrics = build(MemoryStore())
    # What the core reports when the lookup outlives its deadline and the original went.
    with caplog.at_level(logging.ERROR, logger="e911_sip.edge"):
        edge._on_event(FailOpen(1, "911-slow"))
    assert outcome(metrics, "fail_open") == 1
    lines = [r for r in caplog.records if r.name == "e911_sip.edge"]
    assert [r.levelno for r in lines] == [logging.ERROR]
    assert "without enrichment" in lines[0].getMessage()
