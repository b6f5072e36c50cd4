"""TCP transport: messages framed by Content-Length on long-lived connections (RFC 3261 §18).

Responses go back on the connection their request arrived on (§18.2.2). Requests to a peer
reuse a connection to that address when one is open, else one is opened; while it is being
opened, messages for it wait in order. A connection that cannot be opened reports every
waiting message as a delivery failure, which the proxy treats as a 408 and fails over.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import socket
from typing import cast

from e911_sip.sip.errors import RemoteSipError
from e911_sip.sip.framing import StreamFramer
from e911_sip.sip.message import DEFAULT_MAX_SIZE
from e911_sip.sip.peer import Peer
from e911_sip.transport.base import MessageSink

log = logging.getLogger("e911_sip.transport")

_ids = itertools.count(1)


class _Connection(asyncio.Protocol):
    def __init__(self, owner: TcpTransport, *, outbound_key: tuple[str, int] | None) -> None:
        self.owner = owner
        self.id = next(_ids)
        self.framer = StreamFramer(max_size=owner.max_message_size)
        self.transport: asyncio.Transport | None = None
        self.remote: tuple[str, int] = ("", 0)
        self.outbound_key = outbound_key

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCP transport implements the Transport interface without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        peername = transport.get_extra_info("peername")
        self.remote = (str(peername[0]), int(peername[1]))
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        self.owner._register(self)

    def data_received(self, data: bytes) -> None:
        try:
            frames = self.framer.feed(data)
        except RemoteSipError as exc:
            # Framing is lost for good on this stream: close it (§18.3).
            log.warning(
                "closing tcp connection after a framing error",
                extra={"peer": f"{self.remote[0]}:{self.remote[1]}", "error": str(exc)},
            )
            if self.transport is not None:
                self.transport.close()
            return
        if frames.pong and self.transport is not None:
            self.transport.write(b"\r\n")
        sink = self.owner.sink
        peer = Peer("tcp", self.remote[0], self.remote[1], self.id)
        for message in frames.messages:
            sink.message_received(message, peer)

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner._forget(self)
        # The transport holds this protocol: drop the back-reference so the pair is freed
        # by reference counting (the process keeps the garbage collector's passes small).
        self.transport = None

    def write(self, data: bytes) -> bool:
        transport = self.transport
        if transport is None or transport.is_closing():
            return False
        transport.write(data)
        return True


class TcpTransport:
    """A TCP listener plus the outbound connections the proxy opens."""

    def __init__(
        self,
        sink: MessageSink,
        *,
        host: str,
        port: int,
        connect_timeout: float = 2.0,
        max_message_size: int = DEFAULT_MAX_SIZE,
    ) -> None:
        self.sink = sink
        self.host = host
        self.port = port
        self.connect_timeout = connect_timeout
        self.max_message_size = max_message_size
        self._server: asyncio.Server | None = None
        self._by_id: dict[int, _Connection] = {}
        self._by_addr: dict[tuple[str, int], _Connection] = {}
        self._pending: dict[tuple[str, int], list[tuple[bytes, str | None]]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Listen. Raises OSError when the address is taken."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Connection(self, outbound_key=None),
            self.host,
            self.port,
            reuse_address=True,
        )
        self.port = int(self._server.sockets[0].getsockname()[1])

    @property
    def bound(self) -> bool:
        """True while the listener is open."""
        return self._server is not None and self._server.is_serving()

    @property
    def connections(self) -> int:
        """Open connections, both directions."""
        return len(self._by_id)

    def _register(self, conn: _Connection) -> None:
        self._by_id[conn.id] = conn
        self._by_addr[conn.outbound_key or conn.remote] = conn

    def _forget(self, conn: _Connection) -> None:
        self._by_id.pop(conn.id, None)
        key = conn.outbound_key or conn.remote
        if self._by_addr.get(key) is conn:
            del self._by_addr[key]

    def send(self, data: bytes, peer: Peer, branch: str | None) -> None:
        """Write a message to ``peer``: on its own connection, a known one, or a new one."""
        conn = self._by_id.get(peer.connection) if peer.connection is not None else None
        if conn is None:
            conn = self._by_addr.get((peer.host, peer.port))
        if conn is not None and conn.write(data):
            return
        key = (peer.host, peer.port)
        waiting = self._pending.get(key)
        if waiting is not None:
            waiting.append((data, branch))
            return
        self._pending[key] = [(data, branch)]
        task = asyncio.get_running_loop().create_task(self._connect(key))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _connect(self, key: tuple[str, int]) -> None:
        loop = asyncio.get_running_loop()
        error = ""
        conn: _Connection | None = None
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, protocol = await loop.create_connection(
                    lambda: _Connection(self, outbound_key=key), key[0], key[1]
                )
            conn = protocol
        except (OSError, TimeoutError) as exc:
            error = str(exc) or type(exc).__name__
        waiting = self._pending.pop(key, [])
        peer = Peer("tcp", key[0], key[1])
        for data, branch in waiting:
            if conn is None or not conn.write(data):
                self.sink.delivery_failed(branch, peer, error or "connection closed")

    async def close(self) -> None:
        """Stop listening and close every connection."""
        if self._server is not None:
            self._server.close()
        for conn in list(self._by_id.values()):
            if conn.transport is not None:
                conn.transport.close()
        for task in list(self._tasks):
            task.cancel()
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
