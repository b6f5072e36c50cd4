"""The edge's hook: what the lookup decided and which trunks were tried reach the record."""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import random
import time
from collections.abc import Callable

import pytest

from e911_sip.callrecords.book import CallRecord
from e911_sip.callrecords.recorder import CallRecorder
from e911_sip.callrecords.stream import LocalHandoff
from e911_sip.edge import Edge, EdgeOptions
from e911_sip.metrics import Metrics
from e911_sip.policy.emergency import emergency_number
from e911_sip.policy.enrich import EnrichOptions
from e911_sip.proxy.core import ProxyCore, ProxyOptions
from e911_sip.proxy.routing import LocalAddress
from e911_sip.store.memory import MemoryStore
from e911_sip.store.resilient import LookupOptions, ResilientLookup
from e911_sip.transport.recording import RecordingTransport
from tests.unit.test_edge import BASE, RECORD, SOFTSWITCH, invite, invites_to, until

FIRST, SECOND = "sip:198.51.100.1:5060", "sip:198.51.100.2:5060"


def build(
    store: MemoryStore, wall_clock: Callable[[], float] = time.time
) -> tuple[Edge, RecordingTransport, CallRecorder, LocalHandoff]:
    metrics = Metrics()
    handoff = LocalHandoff()
    recorder = CallRecorder(sink=handoff, metrics=metrics, wall_clock=wall_clock)
    edge = Edge(
        core=ProxyCore(
            options=ProxyOptions(
                local=(LocalAddress("udp", "192.0.2.1", 5070),),
                emergency_classifier=functools.partial(
                    emergency_number, numbers=frozenset({"911"})
                ),
                emergency_trunks=(FIRST, SECOND),
                trusted_sources=(ipaddress.ip_network("192.0.2.0/24"),),
            ),
            entropy=random.Random(1).randbytes,
        ),
        store=store,
        lookup=ResilientLookup(store, options=LookupOptions(timeout=0.05)),
        metrics=metrics,
        options=EdgeOptions(enrich=EnrichOptions(geolocation_base_url=BASE)),
        recorder=recorder,
    )
    transport = RecordingTransport(sink=edge)
    edge.add_transport("udp", transport)
    return edge, transport, recorder, handoff


async def stopped(recorder: CallRecorder, handoff: LocalHandoff) -> CallRecord:
    stop = asyncio.Event()
    stop.set()
    await recorder.run(stop)
    delivery = await handoff.read(count=10, block=0)
    assert delivery is not None
    [record] = delivery.records
    return record


async def test_enriched_call_with_a_transport_failover() -> None:
    edge, transport, recorder, handoff = build(MemoryStore({"3215551234": RECORD}))
    transport.fail_to.add("198.51.100.1")
    edge.message_received(invite(), SOFTSWITCH)
    await until(lambda: bool(invites_to(transport, "198.51.100.2")))
    record = await stopped(recorder, handoff)
    assert record.call_id == "3848276298220188511@192.0.2.10"
    assert record.caller == record.callback == "3215551234"
    assert record.provider_endpoint == RECORD.provider_endpoint
    assert record.outcome == "enriched" and record.number == "911"
    assert [(t.trunk, t.attempt, t.enriched, t.result) for t in record.trunks] == [
        (FIRST, 1, True, "transport"),
        (SECOND, 2, True, None),
    ]
    assert record.end == "shutdown" and record.status is None


async def test_store_down_records_the_reason_and_no_endpoint() -> None:
    store = MemoryStore({"3215551234": RECORD})
    store.available = False
    edge, transport, recorder, handoff = build(store)
    edge.message_received(invite(), SOFTSWITCH)
    await until(lambda: bool(invites_to(transport, "198.51.100.1")))
    record = await stopped(recorder, handoff)
    assert record.outcome == "store_error"
    assert record.provider_endpoint is None
    # The line still goes out as the callback number in P-Asserted-Identity.
    assert record.caller == record.callback == "3215551234"


async def test_a_bug_in_the_recorder_does_not_touch_the_call(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The recorder's clock is read for every event it records: a bug there fails the
    # bookkeeping of every event (the compiled book cannot be patched).
    def broken() -> float:
        raise RuntimeError("bookkeeping bug")

    edge, transport, recorder, _ = build(MemoryStore({"3215551234": RECORD}), broken)
    edge.message_received(invite(), SOFTSWITCH)
    await until(lambda: bool(invites_to(transport, "198.51.100.1")))
    assert invites_to(transport, "198.51.100.1")[0].has("geolocation")
    assert recorder.queued == 0
    failed = [r for r in caplog.records if "bookkeeping failed" in r.getMessage()]
    assert failed and all(r.exc_info for r in failed)
