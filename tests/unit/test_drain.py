"""A drain steers new calls away (OPTIONS 503) and keeps routing the calls it holds.

The edge with the real core, the recording transport and the memory store; time is the
event loop's, and every wait is bounded.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import itertools
import logging
import random
from pathlib import Path

import pytest

from e911_sip.config import ConfigError, load
from e911_sip.edge import Edge, EdgeOptions
from e911_sip.metrics import Metrics
from e911_sip.policy.emergency import emergency_number
from e911_sip.policy.enrich import EnrichOptions
from e911_sip.proxy.core import ProxyCore, ProxyOptions
from e911_sip.proxy.routing import LocalAddress
from e911_sip.sip.message import Request, Response, make_response, parse
from e911_sip.sip.peer import Peer
from e911_sip.store.memory import MemoryStore
from e911_sip.store.resilient import LookupOptions, ResilientLookup
from e911_sip.transport.recording import RecordingTransport
from tests.unit.test_edge import BASE, RECORD, SOFTSWITCH, invite, until

TRUNK = Peer("udp", "203.0.113.5", 5060)
EMERGENCY_TRUNK = Peer("udp", "198.51.100.1", 5060)
_ids = itertools.count(1)


def build(**options: object) -> tuple[Edge, RecordingTransport, Metrics]:
    proxy = ProxyOptions(
        local=(LocalAddress("udp", "192.0.2.1", 5070),),
        emergency_classifier=functools.partial(emergency_number, numbers=frozenset({"911"})),
        emergency_trunks=(f"sip:{EMERGENCY_TRUNK.host}:5060",),
        default_trunks=(f"sip:{TRUNK.host}:5060",),
        trusted_sources=(ipaddress.ip_network("192.0.2.0/24"),),
        retry_after=7,
    )
    metrics = Metrics()
    store = MemoryStore({"3215551234": RECORD})
    edge = Edge(
        core=ProxyCore(options=proxy, entropy=random.Random(1).randbytes),
        store=store,
        lookup=ResilientLookup(store, options=LookupOptions(timeout=0.05)),
        metrics=metrics,
        options=EdgeOptions(
            enrich=EnrichOptions(geolocation_base_url=BASE),
            drain_log_interval=0.01,
            **options,  # type: ignore[arg-type]
        ),
    )
    transport = RecordingTransport(sink=edge)
    edge.add_transport("udp", transport)
    return edge, transport, metrics


def sent_to(transport: RecordingTransport, peer: Peer, call_id: str) -> list[Request | Response]:
    out = []
    for item in transport.sent:
        if item.peer.host == peer.host and item.peer.port == peer.port:
            message = parse(item.data)
            if message.call_id == call_id:
                out.append(message)
    return out


def final_to_softswitch(transport: RecordingTransport, call_id: str) -> Response | None:
    for message in sent_to(transport, SOFTSWITCH, call_id):
        if isinstance(message, Response) and message.status >= 200:
            return message
    return None


def options(edge: Edge, transport: RecordingTransport) -> Response:
    """The softswitch's keepalive: an OPTIONS addressed to the edge; its final answer."""
    call_id = f"keepalive-{next(_ids)}"
    edge.message_received(
        (
            "OPTIONS sip:192.0.2.1:5070 SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bK{call_id}\r\n"
            "Max-Forwards: 70\r\nFrom: <sip:portasip@192.0.2.10>;tag=k1\r\n"
            f"To: <sip:192.0.2.1:5070>\r\nCall-ID: {call_id}\r\n"
            "CSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n"
        ).encode(),
        SOFTSWITCH,
    )
    reply = final_to_softswitch(transport, call_id)
    assert reply is not None
    return reply


def call(edge: Edge, transport: RecordingTransport, number: str) -> str:
    """A call from the softswitch that the trunk answers 200; its Call-ID."""
    call_id = f"call-{next(_ids)}@192.0.2.10"
    request = (
        invite()
        .replace(b"sip:911@", f"sip:{number}@".encode())
        .replace(b"3848276298220188511@192.0.2.10", call_id.encode())
        .replace(b"branch=z9hG4bK74bf9", f"branch=z9hG4bK{call_id}".encode())
    )
    edge.message_received(request, SOFTSWITCH)
    trunk = EMERGENCY_TRUNK if number == "911" else TRUNK

    # The memory store answers at once: the INVITE leaves in the same turn.
    sent = next(
        m
        for m in sent_to(transport, trunk, call_id)
        if isinstance(m, Request) and m.method == "INVITE"
    )
    edge.message_received(make_response(sent, 200, to_tag="trunk1").to_bytes(), trunk)
    answer = final_to_softswitch(transport, call_id)
    assert answer is not None and answer.status == 200
    return call_id


def hang_up(edge: Edge, transport: RecordingTransport, call_id: str, number: str) -> Response:
    """The softswitch's BYE through the edge's Record-Route, answered 200 by the trunk."""
    trunk = EMERGENCY_TRUNK if number == "911" else TRUNK
    edge.message_received(
        (
            f"BYE sip:{number}@{trunk.host}:5060 SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bKbye{call_id}\r\n"
            "Route: <sip:192.0.2.1:5070;lr>\r\nMax-Forwards: 70\r\n"
            "From: <sip:3215551234@192.0.2.10>;tag=9fxced76sl\r\n"
            f"To: <sip:{number}@192.0.2.1>;tag=trunk1\r\n"
            f"Call-ID: {call_id}\r\nCSeq: 103 BYE\r\nContent-Length: 0\r\n\r\n"
        ).encode(),
        SOFTSWITCH,
    )
    bye = next(
        m
        for m in sent_to(transport, trunk, call_id)
        if isinstance(m, Request) and m.method == "BYE"
    )
    edge.message_received(make_response(bye, 200).to_bytes(), trunk)
    replies = [
        m
        for m in sent_to(transport, SOFTSWITCH, call_id)
        if isinstance(m, Response) and m.cseq[1] == "BYE"
    ]
    assert replies
    return replies[-1]


def finished(caplog: pytest.LogCaptureFixture) -> list[dict[str, object]]:
    return [r.__dict__ for r in caplog.records if r.getMessage() == "drain finished"]


def dialogs(metrics: Metrics, kind: str) -> float | None:
    return metrics.registry.get_sample_value("e911_sip_dialogs", {"kind": kind})


async def test_options_is_answered_503_with_retry_after_once_the_drain_starts() -> None:
    edge, transport, _ = build(min_drain_time=60.0)
    assert options(edge, transport).status == 200
    force = asyncio.Event()
    drain = asyncio.create_task(edge.drain(force))
    await until(lambda: edge.draining)
    reply = options(edge, transport)
    assert reply.status == 503 and reply.get("retry-after") == "7"
    # min_drain_time holds a drain with nothing to wait for, so the keepalive sees the 503.
    assert options(edge, transport).status == 503 and not drain.done()
    force.set()
    await asyncio.wait_for(drain, 5)
    edge.close()


async def test_an_ordinary_call_answered_before_the_drain_keeps_its_route_until_its_bye(
    caplog: pytest.LogCaptureFixture,
) -> None:
    edge, transport, metrics = build()
    call_id = call(edge, transport, "2125550100")
    assert edge.waiting_for()["dialogs"] == 1 and dialogs(metrics, "other") == 1
    with caplog.at_level(logging.INFO, logger="e911_sip.edge"):
        drain = asyncio.create_task(edge.drain(asyncio.Event()))

        def logged() -> list[dict[str, object]]:
            return [
                r.__dict__
                for r in caplog.records
                if r.getMessage() == "draining: waiting for calls"
            ]

        await until(lambda: bool(logged()))
        assert logged()[0]["dialogs"] == 1 and not drain.done()
        assert options(edge, transport).status == 503
        assert hang_up(edge, transport, call_id, "2125550100").status == 200
        await asyncio.wait_for(drain, 5)
    assert finished(caplog)[0]["reason"] == "idle"
    assert dialogs(metrics, "other") == 0
    edge.close()


async def test_calls_that_still_come_during_a_drain_are_served_and_held_for(
    caplog: pytest.LogCaptureFixture,
) -> None:
    edge, transport, metrics = build()
    before = call(edge, transport, "2125550100")  # keeps the drain going meanwhile
    with caplog.at_level(logging.INFO, logger="e911_sip.edge"):
        drain = asyncio.create_task(edge.drain(asyncio.Event()))
        await until(lambda: edge.draining)
        # Rule one: a 911 call is served by a draining edge, enriched as usual.
        emergency = call(edge, transport, "911")
        sent = sent_to(transport, EMERGENCY_TRUNK, emergency)[0]
        assert isinstance(sent, Request) and sent.has("geolocation")
        # An ordinary call is relayed too (docs/decisions.md: the softswitch moves on the
        # OPTIONS 503; a host alone has nowhere else to send it).
        ordinary = call(edge, transport, "2125550100")
        assert edge.waiting_for()["emergency_dialogs"] == 1
        assert edge.waiting_for()["dialogs"] == 2
        assert dialogs(metrics, "emergency") == 1
        hang_up(edge, transport, emergency, "911")
        hang_up(edge, transport, before, "2125550100")

        def only_the_late_call_left() -> bool:
            return any(
                r.getMessage() == "draining: waiting for calls"
                and r.__dict__["emergency_dialogs"] == 0
                and r.__dict__["dialogs"] == 1
                for r in caplog.records
            )

        await until(only_the_late_call_left)
        assert not drain.done()
        hang_up(edge, transport, ordinary, "2125550100")
        await asyncio.wait_for(drain, 5)
    assert finished(caplog)[0]["reason"] == "idle"
    edge.close()


async def test_ordinary_dialogs_hold_a_drain_only_for_dialog_drain_timeout(
    caplog: pytest.LogCaptureFixture,
) -> None:
    edge, transport, _ = build(dialog_drain_timeout=0.05)
    call(edge, transport, "2125550100")
    with caplog.at_level(logging.INFO, logger="e911_sip.edge"):
        await asyncio.wait_for(edge.drain(asyncio.Event()), 5)
    done = finished(caplog)[0]
    assert done["reason"] == "dialog_drain_timeout" and done["dialogs"] == 1
    edge.close()


async def test_an_emergency_dialog_outlasts_dialog_drain_timeout(
    caplog: pytest.LogCaptureFixture,
) -> None:
    edge, transport, _ = build(dialog_drain_timeout=0.0, emergency_drain_timeout=0.2)
    call(edge, transport, "2125550100")
    call(edge, transport, "911")
    with caplog.at_level(logging.INFO, logger="e911_sip.edge"):
        await asyncio.wait_for(edge.drain(asyncio.Event()), 5)
    done = finished(caplog)[0]
    assert done["reason"] == "emergency_drain_timeout"
    assert float(str(done["seconds"])) >= 0.2
    edge.close()


async def test_the_dialog_table_is_bounded_and_ages_out() -> None:
    edge, transport, metrics = build(max_dialogs=2, dialog_max_age=3600.0)
    first = call(edge, transport, "2125550100")
    call(edge, transport, "2125550100")
    call(edge, transport, "2125550100")
    assert edge.waiting_for()["dialogs"] == 2
    forgotten = metrics.registry.get_sample_value(
        "e911_sip_dialogs_forgotten_total", {"reason": "capacity"}
    )
    assert forgotten == 1
    # The oldest went: its BYE still goes through (the core routes it), nothing to forget.
    assert hang_up(edge, transport, first, "2125550100").status == 200
    assert edge.waiting_for()["dialogs"] == 2
    edge._prune(asyncio.get_running_loop().time() + 3601.0)
    assert edge.waiting_for()["dialogs"] == 0
    aged = metrics.registry.get_sample_value(
        "e911_sip_dialogs_forgotten_total", {"reason": "max_age"}
    )
    assert aged == 2
    edge.close()


async def test_a_failed_or_cancelled_ordinary_call_is_not_a_dialog() -> None:
    edge, transport, _ = build()
    request = invite().replace(b"sip:911@", b"sip:2125550100@")
    edge.message_received(request, SOFTSWITCH)
    sent = next(
        m
        for m in sent_to(transport, TRUNK, "3848276298220188511@192.0.2.10")
        if isinstance(m, Request)
    )
    edge.message_received(make_response(sent, 486, to_tag="trunk1").to_bytes(), TRUNK)
    assert edge.waiting_for()["dialogs"] == 0
    edge.close()


def test_the_core_answers_options_503_while_draining_and_nothing_else_changes() -> None:
    core = ProxyCore(
        options=ProxyOptions(local=(LocalAddress("udp", "192.0.2.1", 5070),), retry_after=9),
        entropy=random.Random(2).randbytes,
    )
    ping = (
        b"OPTIONS sip:192.0.2.1:5070 SIP/2.0\r\n"
        b"Via: SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bKping%d\r\n"
        b"Max-Forwards: 70\r\nFrom: <sip:ping@127.0.0.1>;tag=p1\r\nTo: <sip:192.0.2.1:5070>\r\n"
        b"Call-ID: ping-%d\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n"
    )
    source = Peer("udp", "127.0.0.1", 5060)
    core.receive(ping % (1, 1), source, 0.0)
    first = parse(core.data_to_send()[0].data)
    assert isinstance(first, Response) and first.status == 200
    core.draining = True
    core.receive(ping % (2, 2), source, 1.0)
    second = parse(core.data_to_send()[0].data)
    assert isinstance(second, Response) and second.status == 503
    assert second.get("retry-after") == "9"


def test_shutdown_keys(tmp_path: Path) -> None:
    assert load(None, {}).shutdown.dialog_drain_timeout == 600.0
    assert load(None, {}).shutdown.min_drain_time == 0.0
    path = tmp_path / "e911.toml"
    path.write_text("[shutdown]\ndialog_drain_timeout = 120\nmin_drain_time = 30\n")
    shutdown = load(path, {}).shutdown
    assert shutdown.dialog_drain_timeout == 120.0 and shutdown.min_drain_time == 30.0
    path.write_text("[shutdown]\nmin_drain_time = -1\n")
    with pytest.raises(ConfigError, match=r"\[shutdown\] min_drain_time"):
        load(path, {})


async def test_answered_calls_are_handed_to_the_worker_that_now_gets_their_bye() -> None:
    # A worker that held another slot's Call-IDs while that worker restarted hands their
    # answered calls over once it is back: that worker's drain receives (and waits for)
    # their BYE; this one would wait for a BYE it never sees.
    edge, transport, metrics = build()
    emergency, ordinary = call(edge, transport, "911"), call(edge, transport, "5551234")
    mine = call(edge, transport, "5551234")
    moved = {emergency: 1, ordinary: 1}
    handed = edge.hand_over(lambda call_id: moved.get(call_id, 0), 0)
    assert sorted((c, e) for c, e, _ in handed[1]) == sorted([(emergency, True), (ordinary, False)])
    assert edge.emergency_dialogs == 0 and dialogs(metrics, "other") == 1
    other, other_transport, other_metrics = build()
    other.adopt(handed[1])
    assert other.emergency_dialogs == 1 and dialogs(other_metrics, "other") == 1
    # The adopter finishes them like its own: the BYE ends the dialog it waits for.
    hang_up(other, other_transport, emergency, "911")
    assert other.emergency_dialogs == 0
    hang_up(edge, transport, mine, "5551234")
    assert dialogs(metrics, "other") == 0


async def test_a_handed_over_call_whose_bye_came_first_is_not_adopted() -> None:
    edge, transport, _ = build()
    call_id = call(edge, transport, "911")
    handed = edge.hand_over(lambda _call_id: 1, 0)
    other, other_transport, _ = build()
    # Its BYE reaches the new owner before the hand-over does (a call it never saw set up:
    # the softswitch's BYE is routed from its Route all the same).
    hang_up(other, other_transport, call_id, "911")
    other.adopt(handed[1])
    assert other.emergency_dialogs == 0


async def test_adopted_dialogs_keep_the_age_order_and_the_bound() -> None:
    edge, _, metrics = build(max_dialogs=2)
    edge.adopt([("c", False, 30.0), ("a", False, 10.0), ("b", False, 20.0)])
    assert dialogs(metrics, "other") == 2
    forgotten = metrics.registry.get_sample_value(
        "e911_sip_dialogs_forgotten_total", {"reason": "capacity"}
    )
    assert forgotten == 1
    handed = edge.hand_over(lambda _call_id: 1, 0)
    assert [c for c, _, _ in handed[1]] == ["b", "c"]  # the oldest went to the bound
