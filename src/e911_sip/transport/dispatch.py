"""Several edge workers behind one UDP address: the dispatcher and the worker's receive side.

The softswitch sends every datagram from one source address, so the kernel's SO_REUSEPORT
hash (over the 4-tuple) would hand all of them to one process. Instead the supervisor owns
the shared UDP socket and runs a :class:`Dispatcher`: for each datagram it finds the
Call-ID with a few bytes operations (:func:`find_call_id`) and picks a worker by
rendezvous hashing over the live workers (:func:`pick`). Every message of a transaction
(retransmissions, CANCEL, the ACK of a non-2xx, the trunk's responses, which come back to
the shared address named in Via) and every in-dialog request carries the same Call-ID,
because the proxy keeps it, so they all reach the same worker. When a worker dies only the
Call-IDs it owned move, each to the worker that ranks second for it; that worker routes
their in-dialog requests from the Route set, which names the shared address, not a worker.

The datagram travels to its worker over an AF_UNIX datagram socketpair behind a fixed
:data:`HEADER_SIZE`-byte header holding the source address. The worker reads it with
:class:`WorkerUdpTransport`, which queues and orders it exactly as :class:`UdpTransport`
does and sends from the shared socket, inherited from the supervisor and never read.

TCP and TLS: a connection lives in one process, so the stream listeners are served by
worker 0 alone (:class:`WorkerStreamTransport`; the supervisor holds the listening sockets,
so connections wait in the backlog while worker 0 restarts), and the other workers open
outbound connections only. What a stream brings must not be answered on UDP by another
worker (a trunk's UDP responses to an INVITE that came over TCP), so a worker *claims* the
Call-ID of every message it receives on a stream (:class:`ClaimingSink`): one datagram
``C<Call-ID>`` on its channel, sent before the message is processed, hence before anything
it causes is sent. The dispatcher reads the claims before each batch of UDP datagrams, so a
response can never overtake the claim, and sends a claimed Call-ID to its claimer while that
worker is live (a bounded table, oldest forgotten first).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import zlib
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

from e911_sip.proxy.admission import LoadSignal, Priority
from e911_sip.sip.peer import Peer
from e911_sip.transport.base import MessageSink
from e911_sip.transport.stream import TcpTransport, _Connection
from e911_sip.transport.udp import UdpOptions, UdpTransport

log = logging.getLogger("e911_sip.transport")

HEADER = struct.Struct("!BH16s")
"""Family (4 or 6), source port, source address (IPv4 in the first 4 bytes)."""
HEADER_SIZE = HEADER.size

CHANNEL_BUFFER = 4 * 1024 * 1024
"""Send and receive buffer of each worker's socketpair: a worker that is busy for a moment
(a collection, a burst) finds the datagrams waiting rather than dropped."""

_MASK = (1 << 64) - 1
_CACHE = 4096


# -- finding the Call-ID ---------------------------------------------------------------------


def find_call_id(data: bytes) -> bytes | None:
    """The Call-ID of a raw SIP message, or None when it has none.

    Looks only at the header section, for ``Call-ID`` or its compact form ``i`` at the
    start of a line, in any case, with optional whitespace before the colon (RFC 3261
    §7.3.1, §20.8). The common spelling is found with one ``bytes.find``.
    """
    end = data.find(b"\r\n\r\n")
    limit = len(data) if end < 0 else end + 2
    at = data.find(b"\nCall-ID:", 0, limit)
    if at >= 0:
        start = at + 9
    else:
        start = _find_slow(data[:limit])
        if start < 0:
            return None
    stop = data.find(b"\n", start, limit)
    value = (data[start:limit] if stop < 0 else data[start:stop]).strip()
    return value or None


def _find_slow(head: bytes) -> int:
    """Where the value of a Call-ID header spelled any other way starts; -1 when absent."""
    lower = head.lower()
    for name in (b"\ncall-id", b"\ni"):
        at = lower.find(name)
        while at >= 0:
            pos = at + len(name)
            while pos < len(lower) and lower[pos] in b" \t":
                pos += 1
            if pos < len(lower) and lower[pos] == 0x3A:  # ":"
                return pos + 1
            at = lower.find(name, at + 1)
    return -1


# -- choosing a worker -----------------------------------------------------------------------


def _mix(z: int) -> int:
    """SplitMix64's finaliser: every input bit changes about half of the output bits."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


_SLOT_SEEDS = tuple(_mix((slot + 1) * 0x9E3779B97F4A7C15 & _MASK) for slot in range(256))


def call_key(call_id: bytes) -> int:
    """A 64-bit key for a Call-ID (its CRC-32, spread by a multiplication), the same in
    every process and every run."""
    return (zlib.crc32(call_id) * 0x9E3779B97F4A7C15) & _MASK


def pick(call_id: bytes, live: Sequence[int]) -> int:
    """The worker slot among ``live`` (non-empty) that owns ``call_id``.

    Rendezvous (highest random weight) hashing: each slot's weight for the key is a hash of
    both (one xor and one multiplication), and the highest wins. Removing a slot moves only
    the keys it won; adding it back takes back exactly those.
    """
    key = (zlib.crc32(call_id) * 0x9E3779B97F4A7C15) & _MASK
    best = live[0]
    top = -1
    for slot in live:
        weight = ((key ^ _SLOT_SEEDS[slot]) * 0xBF58476D1CE4E5B9) & _MASK
        if weight > top:
            top = weight
            best = slot
    return best


# -- the header ------------------------------------------------------------------------------


def encode_source(addr: tuple[Any, ...]) -> bytes:
    """The header for a datagram from ``addr`` (an AF_INET or AF_INET6 socket address)."""
    host, port = addr[0], addr[1]
    if ":" in host:
        return HEADER.pack(6, port, socket.inet_pton(socket.AF_INET6, host))
    return HEADER.pack(4, port, socket.inet_pton(socket.AF_INET, host))


def decode_source(header: bytes) -> tuple[str, int]:
    """The (host, port) a header names."""
    family, port, raw = HEADER.unpack(header)
    if family == 6:
        return socket.inet_ntop(socket.AF_INET6, raw), port
    return socket.inet_ntop(socket.AF_INET, raw[:4]), port


def channel_pair() -> tuple[socket.socket, socket.socket]:
    """A (supervisor end, worker end) AF_UNIX datagram socketpair with large buffers."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    for sock in (ours, theirs):
        for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            sock.setsockopt(socket.SOL_SOCKET, option, CHANNEL_BUFFER)
    ours.setblocking(False)
    return ours, theirs


# -- the supervisor's side -------------------------------------------------------------------


DROP_REASONS = ("no_worker", "worker_busy", "worker_gone", "untrusted_source")
"""Why the dispatcher dropped a datagram: no live worker, its channel full, its end closed,
or its source outside the trust domain (see ``admit``)."""


class Dispatcher:
    """Reads the shared UDP socket and hands each datagram to the worker owning its Call-ID."""

    def __init__(
        self,
        sock: socket.socket,
        *,
        max_datagram: int = 65535,
        read_burst: int = 256,
        on_drop: Callable[[str], None] | None = None,
        claims: bool = False,
        max_claims: int = 65536,
        admit: Callable[[str], bool] | None = None,
    ) -> None:
        """``sock`` is bound and non-blocking; ``on_drop`` hears each datagram dropped, by
        a reason of :data:`DROP_REASONS`. ``claims``: workers serve streams and claim their
        Call-IDs; at most ``max_claims`` are remembered. ``admit(host)``: False drops the
        requests that source sends before they cost a Call-ID search and a send to a worker
        (the trust domain, when nothing from outside it is answered); its responses still go
        (a response is matched by its branch, from wherever it comes). None forwards all."""
        self.sock = sock
        self.max_datagram = max_datagram
        self._view = memoryview(bytearray(max_datagram))
        self.read_burst = read_burst
        self._on_drop = on_drop
        self._claims: OrderedDict[bytes, int] | None = OrderedDict() if claims else None
        self.max_claims = max_claims
        self._channels: dict[int, socket.socket] = {}
        self._live: tuple[int, ...] = ()
        self._headers: dict[tuple[Any, ...], tuple[bytes, bool]] = {}
        """The channel header of each recent source, and whether ``admit`` let it in."""
        self._admit = admit
        self._next = 0
        self.dispatched: dict[int, int] = {}
        """Datagrams handed to each slot since start."""
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def live(self) -> tuple[int, ...]:
        """The slots datagrams go to, in ascending order."""
        return self._live

    def attach(self, slot: int, channel: socket.socket) -> None:
        """Send ``slot``'s Call-IDs to ``channel`` from now on (the worker reads it)."""
        self._channels[slot] = channel
        self.dispatched.setdefault(slot, 0)
        self._live = tuple(sorted(self._channels))
        if self._claims is not None:
            asyncio.get_running_loop().add_reader(channel.fileno(), self.read_claims)

    def detach(self, slot: int) -> None:
        """Stop sending to ``slot``: its Call-IDs go to the slots that rank next for them."""
        channel = self._channels.pop(slot, None)
        self._live = tuple(sorted(self._channels))
        if channel is not None and self._claims is not None:
            with contextlib.suppress(RuntimeError):
                asyncio.get_running_loop().remove_reader(channel.fileno())

    @property
    def claims(self) -> int:
        """Call-IDs claimed by the worker serving their stream, remembered now."""
        return len(self._claims) if self._claims is not None else 0

    def read_claims(self) -> None:
        """Take in every claim the workers have sent."""
        claims = self._claims
        if claims is None:
            return
        for slot, channel in self._channels.items():
            while True:
                try:
                    data = channel.recv(1024)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:
                    break
                if not data:
                    break
                if data[:1] != b"C":
                    continue
                call_id = data[1:]
                claims[call_id] = slot
                claims.move_to_end(call_id)
                if len(claims) > self.max_claims:
                    claims.popitem(last=False)

    def start(self) -> None:
        """Start reading the shared socket."""
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.sock.fileno(), self.on_readable)

    def stop(self) -> None:
        """Stop reading (the socket stays open for the workers' sends)."""
        if self._loop is not None:
            self._loop.remove_reader(self.sock.fileno())
            self._loop = None

    def on_readable(self) -> None:
        """Hand every waiting datagram (up to ``read_burst``) to its worker."""
        sock = self.sock
        view = self._view
        headers = self._headers
        if self._claims is not None:
            self.read_claims()
        for _ in range(self.read_burst):
            try:
                # One buffer for every read (recvfrom(size) allocates size bytes each time).
                size, addr = sock.recvfrom_into(view)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.debug("udp error received", extra={"error": str(exc)})
                continue
            entry = headers.get(addr)
            if entry is None:
                if len(headers) >= _CACHE:
                    headers.clear()
                admit = self._admit
                entry = headers[addr] = (encode_source(addr), admit is None or admit(addr[0]))
            header, admitted = entry
            if not admitted and view[:4].tobytes() != b"SIP/":
                # A request from outside: a flood of them costs this loop a read and a
                # lookup each, and never reaches the workers serving the softswitch's calls.
                self._dropped("untrusted_source")
                continue
            data = view[:size].tobytes()
            self.forward(header + data, find_call_id(data))

    def forward(self, packet: bytes, call_id: bytes | None) -> None:
        """Send a header-prefixed datagram to the worker owning ``call_id``; one without a
        Call-ID goes to the workers in turn (their parsers answer or drop it)."""
        live = self._live
        if not live:
            self._dropped("no_worker")
            return
        claimed = self._claims.get(call_id) if self._claims and call_id is not None else None
        if claimed is not None and claimed in self._channels:
            slot = claimed
        elif call_id is None:
            self._next = (self._next + 1) % len(live)
            slot = live[self._next]
        elif len(live) == 1:
            slot = live[0]
        else:
            slot = pick(call_id, live)
        try:
            self._channels[slot].send(packet)
        except (BlockingIOError, InterruptedError):
            self._dropped("worker_busy")
            return
        except OSError:
            # The worker's end is closed: it died, and the supervisor detaches it on exit.
            self._dropped("worker_gone")
            return
        self.dispatched[slot] += 1

    def _dropped(self, reason: str) -> None:
        if self._on_drop is not None:
            self._on_drop(reason)


# -- the worker's side -----------------------------------------------------------------------


class _SharedSocket(socket.socket):
    """The inherited shared UDP socket, sent on only; ``recvfrom_into`` reads the worker's
    channel instead, so :class:`UdpTransport`'s reading, queueing and sending run unchanged."""

    def __init__(self, fileno: int, channel: socket.socket, on_eof: Callable[[], None]) -> None:
        super().__init__(fileno=fileno)
        self.channel = channel
        self.on_eof = on_eof
        self.sources: dict[bytes, tuple[str, int]] = {}
        self._packet: memoryview | None = None

    def recvfrom_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> tuple[int, Any]:
        """What :class:`UdpTransport` reads with: the channel's next datagram, its payload
        copied into ``buffer`` (one buffer for every read, as for a real socket: see
        ``UdpTransport``'s note on the heap)."""
        if self._packet is None or len(self._packet) < len(buffer) + HEADER_SIZE:
            self._packet = memoryview(bytearray(len(buffer) + HEADER_SIZE))
        packet = self._packet
        received = self.channel.recv_into(packet)
        if not received:
            # The supervisor closed its end: nothing more will come.
            self.on_eof()
            raise BlockingIOError
        size = received - HEADER_SIZE
        buffer[:size] = packet[HEADER_SIZE:received]
        return size, self._source(packet[:HEADER_SIZE].tobytes())

    def _source(self, header: bytes) -> tuple[str, int]:
        addr = self.sources.get(header)
        if addr is None:
            if len(self.sources) >= _CACHE:
                self.sources.clear()
            addr = self.sources[header] = decode_source(header)
        return addr


class WorkerUdpTransport(UdpTransport):
    """A worker's UDP listener: datagrams arrive from the dispatcher over ``channel``, and
    replies leave from the shared socket (descriptor ``shared_fd``), so peers see one
    address."""

    def __init__(
        self,
        sink: MessageSink,
        *,
        shared_fd: int,
        channel: socket.socket,
        options: UdpOptions | None = None,
        load: LoadSignal | None = None,
        on_drop: Callable[[Priority], None] | None = None,
    ) -> None:
        super().__init__(sink, host="", port=0, options=options, load=load, on_drop=on_drop)
        self._shared_fd = shared_fd
        self._channel = channel

    async def start(self) -> None:
        """Take over the inherited socket and start reading the channel."""
        loop = asyncio.get_running_loop()
        sock = _SharedSocket(self._shared_fd, self._channel, self._channel_closed)
        sock.setblocking(False)
        self._channel.setblocking(False)
        self._sock = sock
        self._loop = loop
        self.host, self.port = sock.getsockname()[:2]
        loop.add_reader(self._channel.fileno(), self._on_readable)

    def _channel_closed(self) -> None:
        if self._loop is not None:
            self._loop.remove_reader(self._channel.fileno())

    async def close(self) -> None:
        """Stop reading the channel and close both sockets."""
        if self._loop is not None:
            self._loop.remove_reader(self._channel.fileno())
        await super().close()
        self._channel.close()


CLAIM_MEMORY = 4096
"""Call-IDs a worker remembers having claimed, so a call's later messages send nothing."""


class ClaimingSink:
    """Between a worker's stream transport and its edge: claims each message's Call-ID at
    the dispatcher before the edge sees the message."""

    def __init__(self, sink: MessageSink, channel: socket.socket) -> None:
        self.sink = sink
        self.channel = channel
        self._claimed: OrderedDict[bytes, None] = OrderedDict()

    def message_received(self, data: bytes, source: Peer) -> None:
        """Claim, then hand the message on."""
        call_id = find_call_id(data)
        if call_id is not None and call_id not in self._claimed:
            try:
                self.channel.send(b"C" + call_id)
            except OSError as exc:
                # The supervisor is gone or its end is full: the message is still served;
                # only a reply arriving over UDP might reach another worker.
                log.debug("claim not sent", extra={"error": str(exc)})
            else:
                self._claimed[call_id] = None
                if len(self._claimed) > CLAIM_MEMORY:
                    self._claimed.popitem(last=False)
        self.sink.message_received(data, source)

    def delivery_failed(self, branch: str | None, peer: Peer, reason: str) -> None:
        """Passed on unchanged."""
        self.sink.delivery_failed(branch, peer, reason)

    def claimed(self, call_id: bytes) -> bool:
        """True while this sink remembers claiming ``call_id`` (its call came on a stream,
        so the dispatcher sends its UDP messages here whatever the hash says)."""
        return call_id in self._claimed


class WorkerStreamTransport(TcpTransport):
    """A worker's TCP or TLS transport: serves the supervisor's listening socket
    (``listen_fd``) in the worker that has it, and opens outbound connections only in the
    others."""

    def __init__(self, sink: MessageSink, *, listen_fd: int | None, **options: Any) -> None:
        super().__init__(sink, **options)
        self._listen_fd = listen_fd

    async def start(self) -> None:
        """Serve the inherited listening socket, if this worker has it."""
        if self._listen_fd is not None:
            sock = socket.socket(fileno=self._listen_fd)
            self._server = await self.loop.create_server(
                lambda: _Connection(self, outbound_key=None), sock=sock
            )
            self.host, self.port = sock.getsockname()[:2]
        self.table.start()
        self._started = True

    @property
    def bound(self) -> bool:
        """True while the listener is open; always, for an outbound-only transport."""
        if self._listen_fd is None:
            return self._started
        return self._server is not None and self._server.is_serving()
