"""Several workers behind one address: the Call-ID finder, the rendezvous hash, the header,
and a dispatcher feeding worker transports over real loopback and AF_UNIX sockets."""

from __future__ import annotations

import asyncio
import socket
from collections import Counter

import pytest

from e911_sip.sip.peer import Peer
from e911_sip.transport.dispatch import (
    HEADER_SIZE,
    ClaimingSink,
    Dispatcher,
    WorkerUdpTransport,
    call_key,
    channel_pair,
    decode_source,
    encode_source,
    find_call_id,
    pick,
)


def message(*headers: str, body: str = "") -> bytes:
    return (
        "INVITE sip:911@x SIP/2.0\r\n" + "".join(h + "\r\n" for h in headers) + "\r\n" + body
    ).encode()


# -- find_call_id ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "header",
    [
        "Call-ID: abc@host",
        "call-id: abc@host",
        "CALL-ID:abc@host",
        "Call-Id :  abc@host  ",
        "i: abc@host",
        "I:abc@host",
        "i\t: abc@host",
    ],
)
def test_call_id_in_any_spelling(header: str) -> None:
    data = message("Via: SIP/2.0/UDP h;branch=z9hG4bK1", header, "CSeq: 1 INVITE")
    assert find_call_id(data) == b"abc@host"


def test_call_id_at_end_of_headers_and_without_body_separator() -> None:
    assert find_call_id(message("Via: v", "Call-ID: last")) == b"last"
    assert find_call_id(b"SIP/2.0 200 OK\r\nCall-ID: cut") == b"cut"
    assert find_call_id(b"SIP/2.0 200 OK\nCall-ID: bare-lf\nCSeq: 1 BYE\n\n") == b"bare-lf"


def test_headers_that_only_start_like_call_id_do_not_match() -> None:
    data = message("Info: x", "In-Reply-To: y", "Call-Info: <http://x>", "Call-IDx: z")
    assert find_call_id(data) is None
    data = message("Info: x", "In-Reply-To: y", "i: real")
    assert find_call_id(data) == b"real"


def test_call_id_in_the_body_does_not_count() -> None:
    data = message("Via: v", "Content-Length: 15", body="\r\nCall-ID: body")
    assert find_call_id(data) is None


def test_empty_and_garbage() -> None:
    assert find_call_id(b"") is None
    assert find_call_id(b"\x00\xff garbage") is None
    assert find_call_id(message("Call-ID:   ")) is None


# -- pick --------------------------------------------------------------------------------------


KEYS = [f"{n}-4242@10.0.0.1".encode() for n in range(4000)]
BOTH = (0, 1)
PEER = Peer("tcp", "127.0.0.1", 5060)


def test_pick_is_deterministic_and_spreads_keys() -> None:
    owners = Counter(pick(k, (0, 1, 2, 3)) for k in KEYS)
    assert set(owners) == {0, 1, 2, 3}
    # 1000 expected each; 6 standard deviations is about 165.
    assert all(800 < n < 1200 for n in owners.values()), owners
    assert [pick(k, (0, 1, 2, 3)) for k in KEYS[:50]] == [pick(k, (0, 1, 2, 3)) for k in KEYS[:50]]
    assert call_key(b"x") == call_key(b"x") != call_key(b"y")


def test_a_dead_worker_moves_only_its_own_keys() -> None:
    before = {k: pick(k, (0, 1, 2, 3)) for k in KEYS}
    after = {k: pick(k, (0, 1, 3)) for k in KEYS}
    moved = [k for k in KEYS if before[k] != after[k]]
    assert moved, "worker 2 owned some keys"
    assert all(before[k] == 2 for k in moved)
    assert all(after[k] != 2 for k in KEYS)
    # Its keys spread over the survivors, not onto one.
    assert set(after[k] for k in moved) == {0, 1, 3}


def test_a_restarted_worker_takes_back_exactly_its_keys() -> None:
    full = {k: pick(k, (0, 1, 2)) for k in KEYS}
    assert {k: pick(k, (0, 1, 2)) for k in reversed(KEYS)} == full
    without = {k: pick(k, (0, 2)) for k in KEYS}
    assert [k for k in KEYS if without[k] != full[k]] == [k for k in KEYS if full[k] == 1]


def test_one_live_worker_gets_everything() -> None:
    assert {pick(k, (5,)) for k in KEYS[:100]} == {5}


# -- header ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "addr", [("127.0.0.1", 5060), ("203.0.113.9", 65535), ("2001:db8::1", 5061, 0, 0)]
)
def test_header_round_trip(addr: tuple[object, ...]) -> None:
    header = encode_source(addr)
    assert len(header) == HEADER_SIZE
    assert decode_source(header) == addr[:2]


# -- dispatcher and worker transport on real sockets -------------------------------------------


class Sink:
    def __init__(self, expected: int) -> None:
        self.received: list[tuple[bytes, Peer]] = []
        self.expected = expected
        self.done = asyncio.Event()

    def message_received(self, data: bytes, source: Peer) -> None:
        self.received.append((data, source))
        if len(self.received) >= self.expected:
            self.done.set()

    def delivery_failed(self, branch: str | None, peer: Peer, reason: str) -> None:
        raise AssertionError(reason)


def udp_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    return sock


async def test_datagrams_reach_the_worker_owning_their_call_id_and_replies_leave_shared() -> None:
    shared = udp_socket()
    shared.setblocking(False)
    drops: list[str] = []
    dispatcher = Dispatcher(shared, on_drop=drops.append)
    peer = udp_socket()
    call_ids = [f"call-{n}".encode() for n in range(40)]
    owners = {c: pick(c, (0, 1)) for c in call_ids}
    sinks = {slot: Sink(sum(1 for o in owners.values() if o == slot)) for slot in (0, 1)}
    transports = {}
    ends = []
    for slot in (0, 1):
        ours, theirs = channel_pair()
        ends.append(ours)
        transport = WorkerUdpTransport(sinks[slot], shared_fd=shared.dup().detach(), channel=theirs)
        await transport.start()
        transports[slot] = transport
        dispatcher.attach(slot, ours)
    dispatcher.start()
    try:
        for c in call_ids:
            peer.sendto(
                b"OPTIONS sip:x SIP/2.0\r\nCall-ID: " + c + b"\r\n\r\n", shared.getsockname()
            )
        peer.sendto(b"no call id here", shared.getsockname())
        sinks[0].expected += 1  # whichever worker gets the odd one, the total is right
        async with asyncio.timeout(10):
            while sum(len(s.received) for s in sinks.values()) < len(call_ids) + 1:
                await asyncio.sleep(0.01)
        for slot, sink in sinks.items():
            for data, source in sink.received:
                assert source.host == "127.0.0.1" and source.port == peer.getsockname()[1]
                got = find_call_id(data)
                if got is not None:
                    assert owners[got] == slot
        assert dispatcher.dispatched[0] + dispatcher.dispatched[1] == len(call_ids) + 1
        assert not drops
        # A worker's reply comes from the shared address.
        transports[1].send(b"SIP/2.0 200 OK\r\n\r\n", Peer("udp", *peer.getsockname()), None)
        peer.settimeout(5)
        data, source = peer.recvfrom(100)
        assert source == shared.getsockname()
    finally:
        dispatcher.stop()
        for transport in transports.values():
            await transport.close()
        for end in ends:
            end.close()
        shared.close()
        peer.close()


async def test_a_detached_worker_receives_nothing_and_no_live_worker_drops() -> None:
    shared = udp_socket()
    shared.setblocking(False)
    drops: list[str] = []
    dispatcher = Dispatcher(shared, on_drop=drops.append)
    ours, theirs = channel_pair()
    dispatcher.attach(0, ours)
    ours1, theirs1 = channel_pair()
    dispatcher.attach(1, ours1)
    dispatcher.detach(0)
    theirs1.setblocking(False)
    for n in range(20):
        dispatcher.forward(encode_source(("127.0.0.1", 9)) + b"x", f"c{n}".encode())
    assert dispatcher.live == (1,)
    assert dispatcher.dispatched[1] == 20
    assert sum(1 for _ in iter(lambda: _recv(theirs1), None)) == 20
    dispatcher.detach(1)
    dispatcher.forward(b"x", b"c")
    assert drops == ["no_worker"]
    # A worker whose end is closed is reported, not fatal.
    ours2, theirs2 = channel_pair()
    theirs2.close()
    dispatcher.attach(2, ours2)
    dispatcher.forward(b"x", b"c")
    assert drops == ["no_worker", "worker_gone"]
    for s in (ours, theirs, ours1, theirs1, ours2, shared):
        s.close()


async def test_requests_from_outside_the_trust_domain_never_reach_a_worker() -> None:
    shared = udp_socket()
    shared.setblocking(False)
    drops: list[str] = []
    dispatcher = Dispatcher(shared, on_drop=drops.append, admit=lambda host: host == "127.0.0.1")
    ours, theirs = channel_pair()
    theirs.setblocking(False)
    dispatcher.attach(0, ours)
    dispatcher.start()
    softswitch = udp_socket()
    outsider = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    outsider.bind(("127.0.0.9", 0))
    request = b"INVITE sip:911@x SIP/2.0\r\nCall-ID: flood\r\n\r\n"
    response = b"SIP/2.0 200 OK\r\nCall-ID: answered\r\n\r\n"
    try:
        for _ in range(50):
            outsider.sendto(request, shared.getsockname())
        outsider.sendto(response, shared.getsockname())  # matched by branch, from anywhere
        softswitch.sendto(request.replace(b"flood", b"call"), shared.getsockname())
        received: list[bytes] = []
        async with asyncio.timeout(10):
            while len(received) < 2 or len(drops) < 50:
                data = _recv(theirs)
                if data is None:
                    await asyncio.sleep(0.01)
                else:
                    received.append(data[HEADER_SIZE:])
        assert sorted(received) == sorted([response, request.replace(b"flood", b"call")])
        assert drops == ["untrusted_source"] * 50
        assert dispatcher.dispatched[0] == 2
    finally:
        dispatcher.stop()
        for sock in (ours, theirs, shared, softswitch, outsider):
            sock.close()


def _recv(sock: socket.socket) -> bytes | None:
    try:
        return sock.recv(100)
    except BlockingIOError:
        return None


# -- claims: TCP/TLS calls ---------------------------------------------------------------------


async def test_a_claimed_call_id_goes_to_its_claimer_while_it_lives() -> None:
    shared = udp_socket()
    shared.setblocking(False)
    dispatcher = Dispatcher(shared, claims=True, max_claims=2)
    ends = {slot: channel_pair() for slot in (0, 1)}
    for slot, (ours, theirs) in ends.items():
        theirs.setblocking(False)
        dispatcher.attach(slot, ours)
    mine = next(c for c in KEYS if pick(c, BOTH) == 0)
    others = [c for c in KEYS if pick(c, BOTH) == 0 and c != mine][:2]
    try:
        # Worker 1 serves the stream that carried ``mine``; the hash says worker 0.
        sink = Sink(expected=1)
        ClaimingSink(sink, ends[1][1]).message_received(b"INVITE x\r\nCall-ID: " + mine, PEER)
        ClaimingSink(sink, ends[1][1]).message_received(b"ACK x\r\nCall-ID: " + mine, PEER)
        assert len(sink.received) == 2
        dispatcher.read_claims()
        assert dispatcher.claims == 1
        dispatcher.forward(b"response", mine)
        assert _recv(ends[1][1]) == b"response"
        assert _recv(ends[0][1]) is None
        # The table is bounded: the oldest claim is forgotten first.
        for other in others:
            ends[1][1].send(b"C" + other)
        dispatcher.read_claims()
        assert dispatcher.claims == 2
        dispatcher.forward(b"again", mine)
        assert _recv(ends[0][1]) == b"again"
        # A claim by a worker that is gone counts for nothing.
        dispatcher.detach(1)
        dispatcher.forward(b"moved", others[-1])
        assert _recv(ends[0][1]) == b"moved"
    finally:
        dispatcher.detach(0)
        for ours, theirs in ends.values():
            ours.close()
            theirs.close()
        shared.close()


def test_claiming_sink_claims_each_call_id_once() -> None:
    ours, theirs = channel_pair()
    sink = Sink(expected=3)
    claiming = ClaimingSink(sink, theirs)
    ours.setblocking(False)
    for data in (b"INVITE x\r\nCall-ID: a\r\n\r\n", b"ACK x\r\ni: a\r\n\r\n", b"no id"):
        claiming.message_received(data, PEER)
    assert [d for d, _ in sink.received][2] == b"no id"
    assert _recv(ours) == b"Ca"
    assert _recv(ours) is None
    ours.close()
    theirs.close()
