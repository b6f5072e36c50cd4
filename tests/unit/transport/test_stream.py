"""The stream transport on real loopback sockets: limits, deadlines and TLS.

Deadlines are checked by calling the table's sweep with a chosen ``now``, so nothing here
waits for a timer to fire.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import trustme

from e911_sip.sip.peer import Peer
from e911_sip.transport import limits as why
from e911_sip.transport.limits import ConnectionTable, StreamLimits
from e911_sip.transport.stream import TcpTransport

OUTSIDER = "127.0.0.9"
OPTIONS = (
    b"OPTIONS sip:127.0.0.1 SIP/2.0\r\n"
    b"Via: SIP/2.0/TCP 127.0.0.1:5999;branch=z9hG4bKunit1\r\n"
    b"Max-Forwards: 70\r\nFrom: <sip:a@127.0.0.1>;tag=1\r\nTo: <sip:b@127.0.0.1>\r\n"
    b"Call-ID: unit-1\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n"
)


@dataclass
class Sink:
    """Records what the transport hands up."""

    messages: list[tuple[bytes, Peer]] = field(default_factory=list)
    failures: list[tuple[str | None, Peer, str]] = field(default_factory=list)

    def message_received(self, data: bytes, source: Peer) -> None:
        self.messages.append((data, source))

    def delivery_failed(self, branch: str | None, peer: Peer, reason: str) -> None:
        self.failures.append((branch, peer, reason))


@dataclass
class Closes:
    """The table's ``on_close`` reports, as (transport, reason)."""

    seen: list[tuple[str, str]] = field(default_factory=list)

    def __call__(self, transport: str, reason: str) -> None:
        self.seen.append((transport, reason))

    def count(self, reason: str) -> int:
        return sum(1 for _, r in self.seen if r == reason)


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.005)


async def closed_by_peer(reader: asyncio.StreamReader, timeout: float = 5.0) -> bool:
    """True once the other side closed or reset the connection (bounded wait)."""
    try:
        async with asyncio.timeout(timeout):
            while await reader.read(65536):
                pass
    except ConnectionResetError:
        return True
    return True


async def still_open(reader: asyncio.StreamReader) -> bool:
    """True when nothing (no EOF, no reset) is waiting on the connection right now."""
    await asyncio.sleep(0)
    return not reader.at_eof() and reader.exception() is None


@dataclass
class Rig:
    transport: TcpTransport
    table: ConnectionTable
    sink: Sink
    closes: Closes
    writers: list[asyncio.StreamWriter] = field(default_factory=list)

    async def connect(
        self, source: str = "127.0.0.1", **kwargs: object
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", self.transport.port, local_addr=(source, 0), **kwargs
        )
        self.writers.append(writer)
        return reader, writer

    async def close(self) -> None:
        for writer in self.writers:
            writer.close()
            try:
                await writer.wait_closed()
            except (OSError, ssl.SSLError):
                pass
        await self.transport.close()


RigFactory = Callable[..., Awaitable[Rig]]


@pytest.fixture
async def rig_factory() -> AsyncIterator[RigFactory]:
    made: list[Rig] = []

    async def make(limits: StreamLimits | None = None, **kwargs: Any) -> Rig:
        sink = Sink()
        closes = Closes()
        table = ConnectionTable(
            limits or StreamLimits(),
            is_trusted=lambda host: host == "127.0.0.1",
            on_close=closes,
        )
        transport = TcpTransport(sink, host="127.0.0.1", port=0, table=table, **kwargs)
        await transport.start()
        rig = Rig(transport, table, sink, closes)
        made.append(rig)
        return rig

    yield make
    for rig in made:
        await rig.close()


async def test_per_ip_cap_refuses_outsiders_not_the_softswitch(rig_factory: RigFactory) -> None:
    rig = await rig_factory(StreamLimits(max_connections_per_ip=2))
    held = [await rig.connect(OUTSIDER) for _ in range(2)]
    await until(lambda: rig.table.inbound == 2)
    reader, _ = await rig.connect(OUTSIDER)
    assert await closed_by_peer(reader)
    assert rig.closes.seen == [("tcp", why.REFUSED_PER_IP)]
    assert all([await still_open(r) for r, _ in held])
    _, writer = await rig.connect("127.0.0.1")
    writer.write(OPTIONS)
    await until(lambda: len(rig.sink.messages) == 1)
    assert rig.sink.messages[0][1].host == "127.0.0.1"


async def test_trusted_reserve_keeps_room_for_the_softswitch(rig_factory: RigFactory) -> None:
    rig = await rig_factory(
        StreamLimits(max_connections=4, trusted_reserve=2, max_connections_per_ip=100)
    )
    held = [await rig.connect(OUTSIDER) for _ in range(2)]
    await until(lambda: rig.table.inbound == 2)
    reader, _ = await rig.connect(OUTSIDER)
    assert await closed_by_peer(reader)
    assert rig.closes.count(why.REFUSED_UNTRUSTED) == 1
    trusted = [await rig.connect("127.0.0.1") for _ in range(2)]
    await until(lambda: rig.table.inbound == 4)
    reader, _ = await rig.connect("127.0.0.1")
    assert await closed_by_peer(reader)
    assert rig.closes.count(why.REFUSED_FULL) == 1
    assert all([await still_open(r) for r, _ in held + trusted])


async def test_header_deadline_closes_a_slowloris_only(rig_factory: RigFactory) -> None:
    rig = await rig_factory(StreamLimits(header_timeout=10.0, idle_timeout=300.0))
    slow_reader, slow = await rig.connect(OUTSIDER)
    quick_reader, quick = await rig.connect("127.0.0.1")
    slow.write(OPTIONS[:40])
    quick.write(OPTIONS)
    await until(lambda: len(rig.sink.messages) == 1 and rig.table.inbound == 2)
    now = rig.transport.loop.time()
    rig.table.sweep(now + 5)
    assert rig.closes.seen == []
    rig.table.sweep(now + 11)
    assert await closed_by_peer(slow_reader)
    assert rig.closes.seen == [("tcp", why.HEADER_TIMEOUT)]
    assert await still_open(quick_reader)
    rig.table.sweep(now + 301)
    assert await closed_by_peer(quick_reader)
    assert rig.closes.count(why.IDLE) == 1


async def test_a_silent_new_connection_gets_the_header_deadline(rig_factory: RigFactory) -> None:
    rig = await rig_factory(StreamLimits(header_timeout=10.0))
    reader, writer = await rig.connect(OUTSIDER)
    await until(lambda: rig.table.inbound == 1)
    rig.table.sweep(rig.transport.loop.time() + 11)
    assert await closed_by_peer(reader)
    assert rig.closes.seen == [("tcp", why.HEADER_TIMEOUT)]
    await until(lambda: rig.table.inbound == 0)


async def test_buffer_cap_closes_an_endless_header(rig_factory: RigFactory) -> None:
    rig = await rig_factory(StreamLimits(max_buffer=2048))
    reader, writer = await rig.connect(OUTSIDER)
    writer.write(b"OPTIONS sip:x SIP/2.0\r\n" + b"X-Pad: " + b"a" * 4096)
    assert await closed_by_peer(reader)
    assert rig.closes.seen == [("tcp", why.BUFFER)]


async def test_the_periodic_sweep_runs_by_itself(rig_factory: RigFactory) -> None:
    rig = await rig_factory(StreamLimits(header_timeout=0.2))
    reader, writer = await rig.connect(OUTSIDER)
    writer.write(b"OPTIONS sip:x SIP/2.0\r\n")
    assert await closed_by_peer(reader, timeout=10.0)
    assert rig.closes.seen == [("tcp", why.HEADER_TIMEOUT)]


class StalledListener:
    """A listening socket nobody accepts from: TCP connects, a TLS handshake never ends."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port: int = self.sock.getsockname()[1]

    def close(self) -> None:
        self.sock.close()


async def test_outbound_connections_and_their_queue_are_bounded(rig_factory: RigFactory) -> None:
    ca = trustme.CA()
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ca.configure_trust(client)
    rig = await rig_factory(
        StreamLimits(max_outbound=1, max_queued=2), client_ssl=client, connect_timeout=30.0
    )
    stalled = StalledListener()
    try:
        peer = Peer("tls", "127.0.0.1", stalled.port)
        for n in range(3):
            rig.transport.send(OPTIONS, peer, f"b{n}")
        assert rig.sink.failures == [("b2", peer, why.QUEUE_FULL)]
        other = Peer("tls", "127.0.0.1", 9)
        rig.transport.send(OPTIONS, other, "b3")
        assert rig.sink.failures[-1] == ("b3", other, why.OUTBOUND_LIMIT)
        assert rig.closes.count(why.QUEUE_FULL) == 1
        assert rig.closes.count(why.OUTBOUND_LIMIT) == 1
        # A stalled handshake is a connection that never became ready: its deadline ends it
        # and every queued message fails over.
        await until(lambda: rig.table.count("tls", inbound=False) == 1)
        rig.table.sweep(rig.transport.loop.time() + 400)
        await until(lambda: len(rig.sink.failures) == 4)
        assert {f[0] for f in rig.sink.failures} == {"b0", "b1", "b2", "b3"}
        await until(lambda: rig.table.outbound == 0)
    finally:
        stalled.close()


def _tls_pair(ca: trustme.CA) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("127.0.0.1").configure_cert(server)
    ca.configure_trust(server)
    server.verify_mode = ssl.CERT_REQUIRED
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ca.issue_cert("edge.test").configure_cert(client)
    ca.configure_trust(client)
    return server, client


async def test_tls_in_and_out_between_two_edges(rig_factory: RigFactory) -> None:
    ca = trustme.CA()
    server, client = _tls_pair(ca)
    a = await rig_factory(server_ssl=server, client_ssl=client)
    b = await rig_factory(server_ssl=server, client_ssl=client)
    assert a.transport.name == "tls"
    a.transport.send(OPTIONS, Peer("tls", "127.0.0.1", b.transport.port), "x1")
    await until(lambda: len(b.sink.messages) == 1)
    data, source = b.sink.messages[0]
    assert data == OPTIONS and source.transport == "tls"
    b.transport.send(b"SIP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n", source, None)
    await until(lambda: len(a.sink.messages) == 1)
    assert a.sink.failures == [] and a.closes.seen == [] and b.closes.seen == []


async def test_tls_trunk_with_an_unverifiable_certificate_is_a_delivery_failure(
    rig_factory: RigFactory,
) -> None:
    ours, stranger = trustme.CA(), trustme.CA()
    server, _ = _tls_pair(stranger)
    _, client = _tls_pair(ours)
    trunk = await rig_factory(server_ssl=server, client_ssl=client)
    edge = await rig_factory(server_ssl=server, client_ssl=client)
    peer = Peer("tls", "127.0.0.1", trunk.transport.port)
    edge.transport.send(OPTIONS, peer, "x1")
    await until(lambda: len(edge.sink.failures) == 1)
    assert edge.sink.failures[0][0] == "x1"
    assert "certificate verify failed" in edge.sink.failures[0][2]
    assert edge.closes.count(why.TLS_HANDSHAKE) == 1
    assert trunk.sink.messages == []
    await until(lambda: edge.table.outbound == 0)


async def test_tls_client_without_a_certificate_is_refused(rig_factory: RigFactory) -> None:
    ca = trustme.CA()
    server, _ = _tls_pair(ca)
    rig = await rig_factory(server_ssl=server)
    bare = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ca.configure_trust(bare)
    with pytest.raises((ssl.SSLError, ConnectionError)):
        reader, writer = await rig.connect(ssl=bare, server_hostname="127.0.0.1")
        # TLS 1.3 finishes the client's side first: the refusal arrives with the first read.
        writer.write(OPTIONS)
        await writer.drain()
        async with asyncio.timeout(5):
            if not await reader.read(1):
                raise ConnectionError("closed")
    await until(lambda: rig.closes.count(why.TLS_HANDSHAKE) == 1)
    assert rig.sink.messages == []


async def test_idle_outbound_connections_are_closed_and_give_back_their_slot(
    rig_factory: RigFactory,
) -> None:
    trunk = await rig_factory()
    edge = await rig_factory(StreamLimits(idle_timeout=300.0, max_outbound=1))
    peer = Peer("tcp", "127.0.0.1", trunk.transport.port)
    edge.transport.send(OPTIONS, peer, "x1")
    await until(lambda: len(trunk.sink.messages) == 1)
    assert edge.table.outbound == 1
    edge.transport.send(OPTIONS, peer, "x2")  # reuses the open connection
    await until(lambda: len(trunk.sink.messages) == 2)
    edge.table.sweep(edge.transport.loop.time() + 301)
    await until(lambda: edge.table.outbound == 0 and edge.transport.connections == 0)
    assert edge.closes.seen == [("tcp", why.IDLE)]
    edge.transport.send(OPTIONS, peer, "x3")  # the slot is free again: a new connection
    await until(lambda: len(trunk.sink.messages) == 3)
    assert edge.sink.failures == []


async def test_a_peer_that_does_not_read_is_cut_off(rig_factory: RigFactory) -> None:
    rig = await rig_factory(StreamLimits(max_write_buffer=4096))
    reader, writer = await rig.connect(OUTSIDER)
    writer.write(OPTIONS)
    await until(lambda: len(rig.sink.messages) == 1)
    source = rig.sink.messages[0][1]
    # Stop reading on the client side so the edge's writes pile up in its buffer.
    writer.transport.pause_reading()
    big = b"SIP/2.0 200 OK\r\nX-Pad: " + b"a" * 65536 + b"\r\nContent-Length: 0\r\n\r\n"
    for _ in range(512):  # up to 32 MB: more than the kernel's socket buffers hold
        rig.transport.send(big, source, None)
        if rig.closes.seen:
            break
    assert rig.closes.seen == [("tcp", why.WRITE_BUFFER)]
    await until(lambda: rig.table.inbound == 0)


async def test_tls_trunk_verified_by_a_configured_server_name(rig_factory: RigFactory) -> None:
    ca = trustme.CA()
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("trunk.example.net").configure_cert(server)  # no IP SAN
    _, client = _tls_pair(ca)
    trunk = await rig_factory(server_ssl=server)
    by_ip = await rig_factory(client_ssl=client)
    by_name = await rig_factory(client_ssl=client, server_name="trunk.example.net")
    peer = Peer("tls", "127.0.0.1", trunk.transport.port)
    by_ip.transport.send(OPTIONS, peer, "ip")
    await until(lambda: len(by_ip.sink.failures) == 1)
    assert "IP address mismatch" in by_ip.sink.failures[0][2]
    by_name.transport.send(OPTIONS, peer, "name")
    await until(lambda: len(trunk.sink.messages) == 1)
    assert by_name.sink.failures == []
