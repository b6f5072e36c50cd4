"""UDP transport: one datagram is one message (RFC 3261 §18.1.1, §18.2.1).

Reading is separated from processing so that a flood cannot push a 911 call out of the
kernel's receive buffer. When the socket is readable, every datagram waiting (up to
``read_burst``) is read, sorted by :func:`~e911_sip.proxy.admission.classify` (a few byte
comparisons; an INVITE's Request-URI is parsed) into one queue per
:class:`~e911_sip.proxy.admission.Priority`; then at most ``batch`` queued datagrams are handed
to the sink, emergency INVITEs first, then responses and requests that finish admitted calls,
then new work, and what is left is drained ``batch`` at a time in later turns of the loop,
with reads, timers and other callbacks in between. Reading costs a few microseconds a
datagram and processing a few hundred, so the edge keeps reading (and sees every 911 INVITE)
long after it can no longer serve everything it reads.

The queues together hold at most ``queue_limit`` datagrams. When they are full, the oldest
datagram of the least urgent class that is not more urgent than the newcomer is dropped, or
the newcomer when every queued datagram outranks it: new non-emergency requests go first,
an emergency INVITE last. A dropped UDP request is retransmitted by its sender (§17.1.1.2).
Their depth, and how long the datagram being served waited since its read, are published on
the :class:`~e911_sip.proxy.admission.LoadSignal`, which the core reads to shed new
non-emergency requests with a 503 before the limit is reached.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mypy_extensions import mypyc_attr

from e911_sip.proxy.admission import LoadSignal, Priority
from e911_sip.sip.peer import Peer
from e911_sip.transport.base import MessageSink

log = logging.getLogger("e911_sip.transport")

_PRIORITIES = tuple(Priority)
_PEER_CACHE = 4096


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _unwatch(loop: asyncio.AbstractEventLoop, fd: int, *, reader: bool) -> None:
    """Stop watching ``fd`` for writing, and for reading too when ``reader``."""
    # Typed as the loop's remove_reader/remove_writer are declared (bool), compiled code
    # checks their result, and uvloop's return None: called untyped, the result is not read.
    untyped: Any = loop
    if reader:
        untyped.remove_reader(fd)
    untyped.remove_writer(fd)


def _all_new(_data: bytes) -> Priority:
    return Priority.NEW


@dataclass(frozen=True, slots=True, kw_only=True)
class UdpOptions:
    """How the UDP adapter reads, queues and orders datagrams."""

    classify: Callable[[bytes], Priority] = _all_new
    """The priority of a raw datagram: ``admission.classify`` bound to the emergency policy,
    in production. The default treats everything alike (arrival order)."""
    queue_limit: int = 10_000
    """Datagrams read but not yet processed, at most."""
    batch: int = 32
    """Datagrams processed per turn of the event loop before it reads and runs timers again."""
    read_burst: int = 256
    """Datagrams read per readiness callback at most."""
    max_datagram: int = 65535
    """Size of the one receive buffer, in bytes: the largest datagram read whole (larger ones
    are cut and fail to parse)."""
    send_backlog: int = 10_000
    """Datagrams held while the kernel's send buffer is full, at most; beyond, a send fails."""


def bind_udp(host: str, port: int) -> socket.socket:
    """A non-blocking UDP socket bound to ``host:port``, with 4 MiB kernel buffers: a large
    receive buffer rides out bursts while the loop is busy elsewhere.

    Raises:
        OSError: the address cannot be bound.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * 1024 * 1024)
        sock.setblocking(False)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


# Compiled, a native class; the worker's transport (transport.dispatch) and the edge bench
# subclass it in Python, which a native class allows only when told.
@mypyc_attr(allow_interpreted_subclasses=True)
class UdpTransport:
    """A bound UDP socket that sends to any peer and serves what it reads by priority."""

    def __init__(
        self,
        sink: MessageSink,
        *,
        host: str,
        port: int,
        options: UdpOptions | None = None,
        load: LoadSignal | None = None,
        on_drop: Callable[[Priority], None] | None = None,
    ) -> None:
        """``load`` receives the queue depth; ``on_drop`` hears of each datagram dropped
        because the queues were full. The sink's ``message_received`` is bound here, once."""
        self.sink = sink
        self._deliver: Callable[[bytes, Peer], None] = sink.message_received
        """The sink's ``message_received``, bound once: compiled, a call through the
        ``MessageSink`` protocol looks the method up by name on every datagram."""
        self.host = host
        self.port = port
        self.options = options or UdpOptions()
        self.load = load or LoadSignal(max_lag=float("inf"), max_queue=self.options.queue_limit)
        self._on_drop = on_drop
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # A source address is a tuple of any length: (host, port), or for IPv6 (host, port,
        # flowinfo, scope_id). Compiled, ``tuple[str, int]`` would be checked and unpacked to
        # two fields, and an IPv6 datagram would raise TypeError.
        # Each entry keeps the loop's clock at its read: the core sheds new work on how long
        # a datagram waited (``LoadSignal.queue_delay``), not only on how many wait.
        self._queues: tuple[deque[tuple[bytes, tuple[Any, ...], float]], ...] = tuple(
            deque() for _ in _PRIORITIES
        )
        self._peers: dict[tuple[Any, ...], Peer] = {}
        """The Peer of each recent source address: the softswitch and the trunks send most
        datagrams, and one Peer each serves them all (bounded: cleared when full)."""
        self._depth = 0
        self._over_since = -1.0
        """The loop's clock at the first batch of the current run of new work that waited
        more than ``max_queue_delay`` (-1 outside such a run): ``LoadSignal.queue_delay_over``
        is measured from it."""
        self._drain_handle: asyncio.Handle | None = None
        self._backlog: deque[tuple[bytes, Peer, str | None]] = deque()
        self._literal: dict[str, bool] = {}
        """Hosts already checked for being an IP address (bounded)."""
        # One receive buffer for every datagram, each message copied out at its own size.
        # recvfrom(max_datagram) allocated 64 KiB per datagram and shrank it in place: the
        # messages transactions keep for 32 s ended up scattered through glibc's heap with
        # the holes between them too small for the next 64 KiB, which came from fresh heap
        # instead, so RSS grew with the call count while Python's own memory stayed flat.
        self._view = memoryview(bytearray(self.options.max_datagram))

    async def start(self) -> None:
        """Bind the socket. Raises OSError when the address is taken."""
        loop = asyncio.get_running_loop()
        sock = bind_udp(self.host, self.port)
        self._sock = sock
        self._loop = loop
        self.port = int(sock.getsockname()[1])
        loop.add_reader(sock.fileno(), self._on_readable)

    @property
    def bound(self) -> bool:
        """True while the socket is open."""
        return self._sock is not None

    @property
    def queue_depth(self) -> int:
        """Datagrams read and waiting to be processed."""
        return self._depth

    @property
    def send_backlog(self) -> int:
        """Datagrams waiting for room in the kernel's send buffer."""
        return len(self._backlog)

    # -- receiving ---------------------------------------------------------------------------
    def _on_readable(self) -> None:
        sock = self._sock
        if sock is None:
            return
        classify = self.options.classify
        limit = self.options.queue_limit
        view = self._view
        queues = self._queues
        loop = self._loop
        # One reading of the clock for the burst: the datagrams of one callback arrived
        # together as far as the queue is concerned.
        now = loop.time() if loop is not None else 0.0
        for _ in range(self.options.read_burst):
            try:
                size, addr = sock.recvfrom_into(view)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                # An ICMP error reported on the unconnected socket names no destination; the
                # transaction's own timers deal with the silent peer.
                log.debug("udp error received", extra={"error": str(exc)})
                continue
            data = view[:size].tobytes()
            # A Priority is an int: read as one (compiled, unboxed once), it indexes the
            # tuple directly, where the enum object would go through a generic look-up.
            index: int = classify(data)
            if self._depth >= limit and not self._make_room(index):
                self._dropped(_PRIORITIES[index])
                continue
            queues[index].append((data, addr, now))
            self._depth += 1
        self.load.queue_depth = self._depth
        if self._depth and self._drain_handle is None:
            # The first batch at once, now that everything waiting has been read and sorted:
            # a callback for it would cost a turn of the loop (and an epoll_wait) per read,
            # and would run the same datagrams in the same order. What is left waits for
            # the next turn, as before.
            _serve_batch(self)

    def _make_room(self, priority: int) -> bool:
        """Drop the oldest queued datagram that is not more urgent than ``priority`` (a
        :class:`Priority`'s value)."""
        queues = self._queues
        for candidate in range(len(queues) - 1, priority - 1, -1):
            queue = queues[candidate]
            if queue:
                queue.popleft()
                self._depth -= 1
                self._dropped(_PRIORITIES[candidate])
                return True
        return False

    def _dropped(self, priority: Priority) -> None:
        if self._on_drop is not None:
            self._on_drop(priority)

    def _drain(self) -> None:
        """Serve at most a batch of queued datagrams (a later turn of the loop)."""
        _serve_batch(self)

    # -- sending -----------------------------------------------------------------------------
    def send(self, data: bytes, peer: Peer, branch: str | None) -> None:
        """Send one datagram; a local send error is reported to the sink."""
        send_datagram(self, data, peer, branch)

    def _queue_send(self, data: bytes, peer: Peer, branch: str | None) -> None:
        """Hold a datagram the kernel could not take yet; sent in order when it can."""
        if len(self._backlog) >= self.options.send_backlog:
            self.sink.delivery_failed(branch, peer, "udp send buffer full")
            return
        if not self._backlog and self._sock is not None and self._loop is not None:
            self._loop.add_writer(self._sock.fileno(), self._on_writable)
        self._backlog.append((data, peer, branch))

    def _on_writable(self) -> None:
        sock = self._sock
        backlog = self._backlog
        while backlog and sock is not None:
            data, peer, branch = backlog[0]
            try:
                sock.sendto(data, (peer.host, peer.port))
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                backlog.popleft()
                self.sink.delivery_failed(branch, peer, str(exc))
                continue
            backlog.popleft()
        if sock is not None and self._loop is not None:
            _unwatch(self._loop, sock.fileno(), reader=False)

    async def close(self) -> None:
        """Close the socket; whatever is still queued is dropped."""
        sock = self._sock
        if sock is None:
            return
        self._sock = None
        if self._loop is not None:
            _unwatch(self._loop, sock.fileno(), reader=True)
        if self._drain_handle is not None:
            self._drain_handle.cancel()
            self._drain_handle = None
        for queue in self._queues:
            queue.clear()
        self._depth = 0
        self._backlog.clear()
        sock.close()


# Compiled, a method call on an instance of a Python subclass of UdpTransport (the worker's
# transport, the edge bench's) goes through Python, even for a method the subclass does not
# replace; a module function is a direct native call on any instance.


def send_datagram(transport: UdpTransport, data: bytes, peer: Peer, branch: str | None) -> None:
    """:meth:`UdpTransport.send` as a function: what the edge calls for a transport whose
    class does not replace ``send``."""
    sock = transport._sock
    if sock is None:
        transport.sink.delivery_failed(branch, peer, "udp socket closed")
        return
    literal = transport._literal.get(peer.host)
    if literal is None:
        literal = _is_ip_literal(peer.host)
        if len(transport._literal) < 4096:
            transport._literal[peer.host] = literal
    if not literal:
        # sendto() would resolve a host name synchronously and stall the event loop,
        # every call included; names (a Via or Contact that carries one) are not
        # resolved on the message path, so the proxy fails over as for any send error.
        transport.sink.delivery_failed(branch, peer, "a host name, not an IP address")
        return
    if transport._backlog:
        transport._queue_send(data, peer, branch)
        return
    try:
        sock.sendto(data, (peer.host, peer.port))
    except (BlockingIOError, InterruptedError):
        transport._queue_send(data, peer, branch)
    except OSError as exc:
        transport.sink.delivery_failed(branch, peer, str(exc))


def _serve_batch(transport: UdpTransport) -> None:
    """Hand at most ``batch`` queued datagrams to the sink, most urgent first; what is left
    waits for the next turn of the loop."""
    transport._drain_handle = None
    budget = transport.options.batch
    deliver = transport._deliver
    load = transport.load
    peers = transport._peers
    loop = transport._loop
    now = loop.time() if loop is not None else 0.0
    queues = transport._queues
    # How long the delay has stayed over its bound is read from new work alone: that is what
    # shedding refuses, and it waits behind the rest, whose short waits would break the run.
    new_work = queues[-1]
    max_delay = load.max_queue_delay
    over_since = transport._over_since
    for queue in queues:
        while queue and budget:
            data, addr, queued_at = queue.popleft()
            budget -= 1
            transport._depth -= 1
            load.queue_depth = transport._depth
            delay = now - queued_at
            load.queue_delay = delay
            if queue is new_work:
                if delay > max_delay:
                    if over_since < 0.0:
                        over_since = now
                    load.queue_delay_over = now - over_since
                elif over_since >= 0.0:
                    over_since = -1.0
                    load.queue_delay_over = 0.0
            peer = peers.get(addr)
            if peer is None:
                if len(peers) >= _PEER_CACHE:
                    peers.clear()
                # An IPv6 source address is (host, port, flowinfo, scope_id).
                peer = peers[addr] = Peer("udp", addr[0], addr[1])
            deliver(data, peer)
        if not budget:
            break
    if not transport._depth and over_since >= 0.0:
        # Everything waiting has been served: the next wait starts a new run.
        over_since = -1.0
        load.queue_delay_over = 0.0
    transport._over_since = over_since
    if transport._depth and transport._drain_handle is None and transport._loop is not None:
        transport._drain_handle = transport._loop.call_soon(transport._drain)
