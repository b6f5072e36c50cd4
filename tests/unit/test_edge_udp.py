"""The edge on the real UDP adapter and loopback sockets: a 911 call in and out of it, the
way the running edge is wired (the edge sends on the adapter directly, not through the
``Sender`` protocol, and the adapter hands datagrams to the edge)."""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import random
import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import pytest

from e911_sip.edge import Edge, EdgeOptions
from e911_sip.metrics import Metrics
from e911_sip.policy.emergency import emergency_number
from e911_sip.policy.enrich import EnrichOptions
from e911_sip.proxy.core import ProxyCore, ProxyOptions
from e911_sip.proxy.routing import LocalAddress
from e911_sip.sip.message import Request, Response, parse
from e911_sip.sip.peer import Peer
from e911_sip.store.memory import MemoryStore
from e911_sip.store.resilient import LookupOptions, ResilientLookup
from e911_sip.transport.recording import RecordingTransport
from e911_sip.transport.udp import UdpTransport
from tests.unit.test_edge import BASE, RECORD, invite


class Subclass(UdpTransport):
    """A Python subclass that replaces no sending, as the worker's transport."""


class Overriding(UdpTransport):
    """A Python subclass that replaces ``send``: the edge must call it."""

    seen: list[bytes]

    def send(self, data: bytes, peer: Peer, branch: str | None) -> None:
        self.seen.append(data)
        super().send(data, peer, branch)


@dataclass
class Rig:
    edge: Edge
    udp: UdpTransport
    softswitch: socket.socket
    trunk: socket.socket
    metrics: Metrics


def loopback() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(5.0)
    return sock


@pytest.fixture
def sockets() -> Iterator[tuple[socket.socket, socket.socket]]:
    softswitch, trunk = loopback(), loopback()
    try:
        yield softswitch, trunk
    finally:
        softswitch.close()
        trunk.close()


@pytest.fixture(params=[UdpTransport, Subclass, Overriding])
async def rig(
    request: pytest.FixtureRequest, sockets: tuple[socket.socket, socket.socket]
) -> AsyncIterator[Rig]:
    kind: type[UdpTransport] = request.param
    softswitch, trunk = sockets
    trunk_port = trunk.getsockname()[1]
    options = ProxyOptions(
        local=(LocalAddress("udp", "192.0.2.1", 5070),),
        emergency_classifier=functools.partial(emergency_number, numbers=frozenset({"911"})),
        emergency_trunks=(f"sip:127.0.0.1:{trunk_port}",),
        default_trunks=(f"sip:127.0.0.1:{trunk_port}",),
        trusted_sources=(ipaddress.ip_network("127.0.0.0/8"),),
    )
    store = MemoryStore({"3215551234": RECORD})
    metrics = Metrics()
    edge = Edge(
        core=ProxyCore(options=options, entropy=random.Random(1).randbytes),
        store=store,
        lookup=ResilientLookup(store, options=LookupOptions()),
        metrics=metrics,
        options=EdgeOptions(enrich=EnrichOptions(geolocation_base_url=BASE)),
    )
    udp = kind(edge, host="127.0.0.1", port=0)
    if isinstance(udp, Overriding):
        udp.seen = []
    await udp.start()
    edge.add_transport("udp", udp)
    try:
        yield Rig(edge, udp, softswitch, trunk, metrics)
    finally:
        edge.close()
        await udp.close()


async def receive(sock: socket.socket) -> bytes:
    data: bytes = await asyncio.to_thread(sock.recv, 65535)
    return data


async def test_an_emergency_call_goes_through_the_udp_adapter_both_ways(rig: Rig) -> None:
    rig.softswitch.sendto(invite(), ("127.0.0.1", rig.udp.port))
    forwarded = parse(await receive(rig.trunk))
    assert isinstance(forwarded, Request) and forwarded.method == "INVITE"
    assert forwarded.get("geolocation") == f"<{BASE}5555555/e911abc123def456>"
    trying = parse(await receive(rig.softswitch))
    assert isinstance(trying, Response) and trying.status == 100
    answered = rig.metrics.registry.get_sample_value(
        "e911_sip_emergency_calls_total", {"outcome": "enriched"}
    )
    assert answered == 1
    if isinstance(rig.udp, Overriding):
        assert [parse(data).start_line() for data in rig.udp.seen] == [
            forwarded.start_line(),
            trying.start_line(),
        ]


async def test_a_transport_registered_again_for_udp_replaces_the_adapter(rig: Rig) -> None:
    recording = RecordingTransport(sink=rig.edge)
    rig.edge.add_transport("udp", recording)
    rig.edge.message_received(invite(), Peer("udp", *rig.softswitch.getsockname()))
    sent = [parse(out.data) for out in recording.sent]
    assert any(isinstance(m, Request) and m.method == "INVITE" for m in sent)
    assert any(isinstance(m, Response) and m.status == 100 for m in sent)
    # Nothing left on the adapter registered before.
    for sock in (rig.trunk, rig.softswitch):
        sock.setblocking(False)
        with pytest.raises(BlockingIOError):
            sock.recv(65535)
