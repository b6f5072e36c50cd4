"""The UDP adapter's receive queue on real loopback sockets: order, bounds, load signal.

Datagrams are sent before the loop gets a turn, so the adapter finds them all waiting in
the kernel at once, as it does when it is behind; nothing here depends on timing.
"""

from __future__ import annotations

import asyncio
import functools
import socket
import time
import tracemalloc
from collections.abc import Iterator

import pytest

from e911_sip.policy.emergency import emergency_number
from e911_sip.proxy.admission import LoadSignal, Priority, classify
from e911_sip.sip.peer import Peer
from e911_sip.transport.udp import UdpOptions, UdpTransport

POLICY = functools.partial(emergency_number, numbers=frozenset({"911", "933"}))
dropped: list[Priority] = []
"""What the adapter under test reported dropped; cleared by the tests that read it."""


def request(ruri: str, n: int, *, to_tag: str = "") -> bytes:
    return (
        f"INVITE {ruri} SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bK{n}\r\n"
        "From: <sip:1@127.0.0.1>;tag=a\r\n"
        f"To: <{ruri}>{to_tag}\r\n"
        f"Call-ID: {n}\r\n"
        "CSeq: 1 INVITE\r\n"
        "Content-Length: 0\r\n\r\n"
    ).encode()


def response(n: int) -> bytes:
    return f"SIP/2.0 180 Ringing\r\nCall-ID: r{n}\r\n\r\n".encode()


class Recorder:
    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.failed: list[tuple[str | None, Peer, str]] = []
        self.done = asyncio.Event()
        self.expected = 0

    def message_received(self, data: bytes, source: Peer) -> None:
        assert source.transport == "udp" and source.host == "127.0.0.1"
        self.received.append(data)
        if len(self.received) >= self.expected:
            self.done.set()

    def delivery_failed(self, branch: str | None, peer: Peer, reason: str) -> None:
        self.failed.append((branch, peer, reason))


@pytest.fixture
def client() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    try:
        yield sock
    finally:
        sock.close()


async def start(sink: Recorder, load: LoadSignal | None = None, **options: object) -> UdpTransport:
    opts = UdpOptions(classify=functools.partial(classify, emergency=POLICY), **options)  # type: ignore[arg-type]
    transport = UdpTransport(
        sink,
        host="127.0.0.1",
        port=0,
        options=opts,
        load=load or LoadSignal(max_lag=1.0, max_queue=1),
        on_drop=dropped.append,
    )
    await transport.start()
    return transport


class SlowRecorder(Recorder):
    """Takes ``hold`` seconds of the loop over the first datagram, as a busy edge would, and
    notes the queue delay the adapter published as it handed over each one."""

    def __init__(self, load: LoadSignal, hold: float) -> None:
        super().__init__()
        self.load = load
        self.hold = hold
        self.delays: list[float] = []

    def message_received(self, data: bytes, source: Peer) -> None:
        self.delays.append(self.load.queue_delay)
        if len(self.delays) == 1:
            time.sleep(self.hold)  # the work of a busy loop, not a wait for an event
        super().message_received(data, source)


async def send_and_wait(
    client: socket.socket, transport: UdpTransport, sink: Recorder, count: int
) -> None:
    """Send ``count`` INVITEs back to back and wait until the sink has them all."""
    target = ("127.0.0.1", transport.port)
    for n in range(count):
        client.sendto(request("sip:3215550000@127.0.0.1", n), target)
    sink.expected = count
    async with asyncio.timeout(10):
        await sink.done.wait()


async def test_the_load_signal_carries_how_long_a_datagram_waited_in_the_queue(
    client: socket.socket,
) -> None:
    load = LoadSignal(max_lag=1.0, max_queue=10_000, max_queue_delay=0.05)
    sink = SlowRecorder(load, hold=0.08)
    transport = await start(sink, load=load, batch=1)
    try:
        await send_and_wait(client, transport, sink, 3)
        # Read together, served one a turn: the first at once, the others after the first
        # held the loop for 80 ms.
        assert sink.delays[0] < 0.05
        assert all(delay >= 0.07 for delay in sink.delays[1:])  # the clock counts ms
        assert load.shed_reason() == "queue_delay"
        # A datagram that finds the queue empty is served at once: the signal falls again.
        sink.expected = 4
        sink.done.clear()
        client.sendto(request("sip:3215550000@127.0.0.1", 4), ("127.0.0.1", transport.port))
        async with asyncio.timeout(10):
            await sink.done.wait()
        assert sink.delays[3] < 0.05
        assert load.shed_reason() is None
    finally:
        await transport.close()


class HoldingRecorder(Recorder):
    """Takes ``hold`` seconds of the loop over every datagram and notes, for each, whether the
    load signal would refuse new work as it is handed over."""

    def __init__(self, load: LoadSignal, hold: float) -> None:
        super().__init__()
        self.load = load
        self.hold = hold
        self.reasons: list[str | None] = []

    def message_received(self, data: bytes, source: Peer) -> None:
        self.reasons.append(self.load.shed_reason())
        time.sleep(self.hold)  # the work of a busy loop, not a wait for an event
        super().message_received(data, source)


async def test_a_moment_of_queue_delay_refuses_nothing(client: socket.socket) -> None:
    load = LoadSignal(max_lag=1.0, max_queue=10_000, max_queue_delay=0.05, queue_delay_sustain=1)
    sink = SlowRecorder(load, hold=0.08)
    transport = await start(sink, load=load, batch=1)
    try:
        await send_and_wait(client, transport, sink, 3)
        # The two behind the held one waited over the bound, but for a moment, not a second.
        assert all(delay >= 0.07 for delay in sink.delays[1:])
        assert load.shed_reason() is None
        # The queue emptied: the next wait over the bound starts a new run.
        assert load.queue_delay_over == 0.0
    finally:
        await transport.close()


async def test_a_queue_delay_that_stays_over_its_bound_refuses_new_work(
    client: socket.socket,
) -> None:
    load = LoadSignal(max_lag=1.0, max_queue=10_000, max_queue_delay=0.02, queue_delay_sustain=0.05)
    sink = HoldingRecorder(load, hold=0.04)
    transport = await start(sink, load=load, batch=1)
    try:
        await send_and_wait(client, transport, sink, 6)
        # Each waits 40 ms more than the one before it: the second is the first over the
        # bound (a run of none yet), the fourth has seen it stay over for at least 80 ms.
        assert sink.reasons[:2] == [None, None]
        assert sink.reasons[3:] == ["queue_delay"] * 3
    finally:
        await transport.close()


class AnsweringRecorder(HoldingRecorder):
    """A :class:`HoldingRecorder` for new calls that, as it holds each one, has a response
    sent to the transport: read at the next turn, it is served ahead of the calls still
    queued and has hardly waited."""

    def __init__(self, load: LoadSignal, hold: float, client: socket.socket) -> None:
        super().__init__(load, hold)
        self.client = client
        self.target: tuple[str, int] = ("127.0.0.1", 0)
        self.answers = 0

    def message_received(self, data: bytes, source: Peer) -> None:
        if data.startswith(b"SIP/2.0"):
            Recorder.message_received(self, data, source)
            return
        self.answers += 1
        self.client.sendto(response(self.answers), self.target)
        super().message_received(data, source)


async def test_answers_served_ahead_of_new_calls_do_not_break_a_run_of_queue_delay(
    client: socket.socket,
) -> None:
    # Responses are served before new calls, so they wait little even when new calls wait
    # long: were their waits counted, every answer would restart the run and an edge that
    # cannot keep up with new calls would never refuse one.
    load = LoadSignal(max_lag=1.0, max_queue=10_000, max_queue_delay=0.02, queue_delay_sustain=0.05)
    sink = AnsweringRecorder(load, hold=0.04, client=client)
    transport = await start(sink, load=load, batch=1)
    try:
        sink.target = ("127.0.0.1", transport.port)
        await send_and_wait(client, transport, sink, 6)
        sink.expected = 12
        async with asyncio.timeout(10):
            while len(sink.received) < 12:
                sink.done.clear()
                await sink.done.wait()
        # The answers came between the calls, each served at once...
        kinds = [data.startswith(b"SIP/2.0") for data in sink.received]
        assert kinds.count(True) == 6 and not kinds[0]
        # ...and the calls were still refused once their waits had stayed over the bound.
        assert sink.reasons[:2] == [None, None]
        assert sink.reasons[3:] == ["queue_delay"] * 3
    finally:
        await transport.close()


async def test_emergency_invites_are_served_before_a_backlog_of_new_calls(
    client: socket.socket,
) -> None:
    sink = Recorder()
    transport = await start(sink, batch=4)
    try:
        target = ("127.0.0.1", transport.port)
        flood = [request("sip:3215550000@127.0.0.1", n) for n in range(40)]
        for data in flood[:20]:
            client.sendto(data, target)
        client.sendto(response(1), target)
        client.sendto(request("sip:911@127.0.0.1;user=phone", 911), target)
        for data in flood[20:]:
            client.sendto(data, target)
        client.sendto(request("urn:service:sos", 112), target)
        sink.expected = 43
        async with asyncio.timeout(10):
            await sink.done.wait()
        assert sink.received[0] == request("sip:911@127.0.0.1;user=phone", 911)
        assert sink.received[1] == request("urn:service:sos", 112)
        assert sink.received[2] == response(1)
        assert sink.received[3:] == flood  # the rest in arrival order
        assert transport.queue_depth == 0
        assert transport.load.queue_depth == 0
    finally:
        await transport.close()


async def test_a_full_queue_drops_new_calls_first_and_never_an_emergency_invite(
    client: socket.socket,
) -> None:
    dropped.clear()
    sink = Recorder()
    transport = await start(sink, queue_limit=16, batch=64)
    try:
        target = ("127.0.0.1", transport.port)
        for n in range(30):
            client.sendto(request("sip:3215550000@127.0.0.1", n), target)
        for n in range(5):
            client.sendto(response(n), target)
        emergencies = [request("tel:911", 900 + n) for n in range(3)]
        for data in emergencies:
            client.sendto(data, target)
        sink.expected = 16
        async with asyncio.timeout(10):
            await sink.done.wait()
        assert sink.received[:3] == emergencies
        assert sink.received[3:8] == [response(n) for n in range(5)]
        # The newest 8 new calls survived; the oldest were dropped to make room.
        assert sink.received[8:] == [request("sip:3215550000@127.0.0.1", n) for n in range(22, 30)]
        assert dropped == [Priority.NEW] * 22
    finally:
        await transport.close()


async def test_an_emergency_invite_evicts_queued_responses_when_nothing_less_urgent_is_left(
    client: socket.socket,
) -> None:
    dropped.clear()
    sink = Recorder()
    transport = await start(sink, queue_limit=16, batch=64)
    try:
        target = ("127.0.0.1", transport.port)
        for n in range(16):
            client.sendto(response(n), target)
        client.sendto(request("sip:3215550000@127.0.0.1", 1), target)  # no room: dropped
        client.sendto(request("sip:933@127.0.0.1", 933), target)
        sink.expected = 16
        async with asyncio.timeout(10):
            await sink.done.wait()
        assert sink.received[0] == request("sip:933@127.0.0.1", 933)
        assert sink.received[1:] == [response(n) for n in range(1, 16)]
        assert dropped == [Priority.NEW, Priority.ONGOING]
    finally:
        await transport.close()


async def test_queue_depth_is_published_while_datagrams_wait(client: socket.socket) -> None:
    depths: list[int] = []
    sink = Recorder()
    original = sink.message_received

    def record(data: bytes, source: Peer) -> None:
        depths.append(transport.load.queue_depth)
        original(data, source)

    # Before the transport is made: it binds the sink's message_received once.
    sink.message_received = record  # type: ignore[method-assign]
    transport = await start(sink, batch=5)
    try:
        target = ("127.0.0.1", transport.port)
        for n in range(20):
            client.sendto(request("sip:3215550000@127.0.0.1", n), target)
        sink.expected = 20
        async with asyncio.timeout(10):
            await sink.done.wait()
        assert depths == list(range(19, -1, -1))
        assert transport.load.shed_reason() in (None, "queue")
    finally:
        await transport.close()


async def test_send_reaches_the_peer_and_a_closed_socket_reports_failure(
    client: socket.socket,
) -> None:
    sink = Recorder()
    transport = await start(sink)
    host, port = client.getsockname()
    peer = Peer("udp", host, port)
    transport.send(b"hello", peer, "z9hG4bKx")
    client.settimeout(5)
    assert client.recvfrom(100)[0] == b"hello"
    await transport.close()
    assert not transport.bound
    transport.send(b"again", peer, "z9hG4bKy")
    assert sink.failed == [("z9hG4bKy", peer, "udp socket closed")]


class _FullOnce:
    """A socket whose send buffer is full for the first ``full`` sends."""

    def __init__(self, sock: socket.socket, full: int) -> None:
        self._sock = sock
        self.full = full

    def sendto(self, data: bytes, addr: tuple[str, int]) -> int:
        if self.full:
            self.full -= 1
            raise BlockingIOError
        return self._sock.sendto(data, addr)

    def __getattr__(self, name: str) -> object:
        return getattr(self._sock, name)


async def test_a_full_send_buffer_holds_datagrams_in_order_within_the_backlog_bound(
    client: socket.socket,
) -> None:
    sink = Recorder()
    transport = await start(sink, send_backlog=2)
    real = transport._sock
    assert real is not None
    transport._sock = _FullOnce(real, full=1)  # type: ignore[assignment]
    host, port = client.getsockname()
    peer = Peer("udp", host, port)
    try:
        transport.send(b"one", peer, "b1")  # the kernel refuses: held
        transport.send(b"two", peer, "b2")  # behind it, in order
        transport.send(b"three", peer, "b3")  # over the bound: a delivery failure
        assert transport.send_backlog == 2
        assert sink.failed == [("b3", peer, "udp send buffer full")]
        await until_empty(transport)  # sent once the socket is writable
        client.settimeout(5)
        received = [client.recvfrom(100)[0] for _ in range(2)]
        assert received == [b"one", b"two"]
    finally:
        transport._sock = real
        await transport.close()


async def until_empty(transport: UdpTransport) -> None:
    async with asyncio.timeout(5):
        while transport.send_backlog:
            await asyncio.sleep(0.001)


async def test_a_host_name_is_never_resolved_on_the_message_path() -> None:
    sink = Recorder()
    transport = UdpTransport(sink, host="127.0.0.1", port=0)
    await transport.start()
    try:
        transport.send(b"OPTIONS sip:x SIP/2.0\r\n\r\n", Peer("udp", "pbx.example.com", 5060), "b1")
        transport.send(b"OPTIONS sip:x SIP/2.0\r\n\r\n", Peer("udp", "127.0.0.1", 9), "b2")
    finally:
        await transport.close()
    assert [(b, p.host, r) for b, p, r in sink.failed] == [
        ("b1", "pbx.example.com", "a host name, not an IP address")
    ]


async def test_each_datagram_costs_its_own_size_not_the_receive_buffer(
    client: socket.socket,
) -> None:
    """Every datagram used to be read into a fresh ``max_datagram`` allocation and shrunk in
    place; glibc's heap fragmented around the messages kept for seconds, and RSS grew with
    the call count. Now one buffer (made when the transport is) serves every read and each
    message is an exact-size copy: reading 20 datagrams holds little more than their bytes,
    never a buffer's worth (a large buffer here makes the difference plain)."""
    sink = Recorder()
    transport = await start(sink, batch=64, max_datagram=256 * 1024)
    messages = [request(f"sip:32155500{n:02d}@127.0.0.1", n) + b"x" * (7 * n) for n in range(20)]
    try:
        target = ("127.0.0.1", transport.port)
        tracemalloc.start()
        try:
            for data in messages:
                client.sendto(data, target)
            sink.expected = len(messages)
            before = tracemalloc.get_traced_memory()[0]
            tracemalloc.reset_peak()
            async with asyncio.timeout(10):
                await sink.done.wait()
            peak = tracemalloc.get_traced_memory()[1] - before
        finally:
            tracemalloc.stop()
        # The messages (5.4 kB), their queue entries, the loop's own bookkeeping: about
        # 22 kB, against 256 kB and more when each read allocated the whole buffer.
        assert sum(len(m) for m in messages) < 8 * 1024
        assert peak < 64 * 1024
        # Copies, not views of the shared buffer: a later read overwrites nothing delivered.
        assert sink.received == messages
        assert all(type(data) is bytes for data in sink.received)
    finally:
        await transport.close()


class PeerRecorder:
    def __init__(self) -> None:
        self.received: list[tuple[bytes, Peer]] = []
        self.done = asyncio.Event()

    def message_received(self, data: bytes, source: Peer) -> None:
        self.received.append((data, source))
        self.done.set()

    def delivery_failed(self, branch: str | None, peer: Peer, reason: str) -> None:
        raise AssertionError(f"delivery failed: {reason}")


@pytest.mark.skipif(not socket.has_ipv6, reason="no IPv6")
async def test_an_ipv6_source_address_of_four_fields_is_served() -> None:
    # An AF_INET6 socket names a source (host, port, flowinfo, scope_id); compiled, a
    # queue typed for (host, port) pairs raised TypeError on the first one.
    sink = PeerRecorder()
    transport = UdpTransport(sink, host="::1", port=0)
    try:
        await transport.start()
    except OSError:
        pytest.skip("no IPv6 loopback")
    client = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    try:
        client.settimeout(5)
        client.bind(("::1", 0))
        client.sendto(b"OPTIONS sip:x SIP/2.0\r\n\r\n", ("::1", transport.port))
        async with asyncio.timeout(5):
            await sink.done.wait()
        peer = sink.received[0][1]
        assert (peer.transport, peer.host, peer.port) == ("udp", "::1", client.getsockname()[1])
        transport.send(b"SIP/2.0 200 OK\r\n\r\n", peer, None)
        assert client.recv(100) == b"SIP/2.0 200 OK\r\n\r\n"
    finally:
        client.close()
        await transport.close()


def test_the_adapter_stops_watching_its_socket_on_uvloop(client: socket.socket) -> None:
    # uvloop's remove_reader and remove_writer return None where asyncio's return a bool:
    # compiled, a result read as the declared bool made close() raise TypeError at shutdown.
    uvloop = pytest.importorskip("uvloop")

    async def scenario() -> None:
        sink = Recorder()
        transport = await start(sink)
        real = transport._sock
        assert real is not None
        transport._sock = _FullOnce(real, full=1)  # type: ignore[assignment]
        peer = Peer("udp", *client.getsockname())
        try:
            transport.send(b"held", peer, "b1")  # the kernel refuses: the loop watches
            await until_empty(transport)  # sent once writable; the watch removed
        finally:
            transport._sock = real
            await transport.close()
        assert not transport.bound and sink.failed == []
        client.settimeout(5)
        assert client.recvfrom(100)[0] == b"held"

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(scenario())
