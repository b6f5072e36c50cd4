"""Stream transports, TCP and TLS: messages framed by Content-Length on long-lived connections.

Responses go back on the connection their request arrived on (RFC 3261 §18.2.2). Requests to
a peer reuse a connection to that address when one is open, else one is opened; while it is
being opened (and, for TLS, its handshake runs), messages for it wait in order. A connection
that cannot be opened, or whose peer certificate does not verify, reports every waiting
message as a delivery failure, which the proxy treats as a 408 and fails over.

TLS (RFC 3261 §26.2.1, RFC 5630) is done here with :class:`ssl.SSLObject` over memory BIOs on
a plain TCP connection, so a TLS connection is admitted, timed and bounded by the
:class:`~e911_sip.transport.limits.ConnectionTable` exactly like a TCP one from its first
byte, its handshake included, on either event loop. The caller builds the
:class:`ssl.SSLContext`: which certificates are presented and which peers are believed is
configuration, not transport.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import socket
import ssl
from typing import cast

from e911_sip.sip.errors import RemoteSipError
from e911_sip.sip.framing import StreamFramer
from e911_sip.sip.message import DEFAULT_MAX_SIZE
from e911_sip.sip.peer import Peer
from e911_sip.transport import limits as why
from e911_sip.transport.base import MessageSink
from e911_sip.transport.limits import ConnectionTable

log = logging.getLogger("e911_sip.transport")

_ids = itertools.count(1)
_READ_CHUNK = 65536


class _Tls:
    """One connection's TLS state: an SSLObject between two memory BIOs."""

    __slots__ = ("obj", "incoming", "outgoing", "done")

    def __init__(self, context: ssl.SSLContext, *, server_side: bool, server_name: str | None):
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.obj = context.wrap_bio(
            self.incoming, self.outgoing, server_side=server_side, server_hostname=server_name
        )
        self.done = False


class _Connection(asyncio.Protocol):
    __slots__ = (
        "owner",
        "id",
        "framer",
        "transport",
        "remote",
        "peer",
        "outbound_key",
        "tls",
        "ready",
        "last_activity",
        "partial_since",
        "admitted",
        "close_reason",
        "holds_slot",
    )

    def __init__(self, owner: TcpTransport, *, outbound_key: tuple[str, int] | None) -> None:
        self.owner = owner
        self.id = next(_ids)
        self.framer = StreamFramer(max_size=owner.max_message_size)
        self.transport: asyncio.Transport | None = None
        self.remote: tuple[str, int] = ("", 0)
        self.peer = Peer(owner.name, "", 0, self.id)
        """What messages from this connection came from; one for all of them."""
        self.outbound_key = outbound_key
        self.tls: _Tls | None = None
        self.ready: asyncio.Future[None] = owner.loop.create_future()
        """Done when messages may be written (at once for TCP, after the TLS handshake)."""
        self.last_activity = owner.loop.time()
        self.partial_since: float | None = None
        self.admitted = False
        self.close_reason: str | None = None
        self.holds_slot = False
        """True once an outbound connection took over its connect's outbound slot."""

    # -- what the ConnectionTable reads ----------------------------------------------------
    @property
    def transport_name(self) -> str:
        return self.owner.name

    @property
    def host(self) -> str:
        return self.remote[0]

    @property
    def inbound(self) -> bool:
        return self.outbound_key is None

    def abort(self, reason: str) -> None:
        """Close for ``reason``; counted once, when the table decided it."""
        if self.close_reason is None:
            self.close_reason = reason
            self.owner.table.closed(self.owner.name, reason, f"{self.remote[0]}:{self.remote[1]}")
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(reason))
            self.ready.exception()  # a connect that timed out first never reads it
        transport = self.transport
        if transport is None:
            return
        if reason == why.IDLE:
            transport.close()  # nothing wrong with the peer: let what is queued go out
        else:
            transport.abort()

    # -- asyncio.Protocol ----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCP transport implements the Transport interface without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        peername = transport.get_extra_info("peername")
        self.remote = (str(peername[0]), int(peername[1]))
        owner = self.owner
        self.peer = Peer(owner.name, self.remote[0], self.remote[1], self.id)
        if self.inbound:
            refused = owner.table.admit(self.remote[0])
            if refused is not None:
                self.abort(refused)
                return
            # A new connection must deliver its first message (handshake included) in time.
            self.partial_since = owner.loop.time()
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        self.admitted = True
        owner._register(self)
        context = owner.server_ssl if self.inbound else owner.client_ssl
        if context is None:
            self.ready.set_result(None)
            return
        server_name = None
        if not self.inbound and self.outbound_key is not None:
            server_name = owner.server_name or self.outbound_key[0]
        tls = self.tls = _Tls(context, server_side=self.inbound, server_name=server_name)
        if not self.inbound:
            self._tls_feed(tls, b"")  # the ClientHello

    def data_received(self, data: bytes) -> None:
        if self.close_reason is not None:
            return
        if self.tls is not None:
            data = self._tls_feed(self.tls, data)
            if not data:
                return
        try:
            frames = self.framer.feed(data)
        except RemoteSipError as exc:
            # Framing is lost for good on this stream: close it (§18.3).
            log.debug("stream framing error", extra={"peer": self._peer_text(), "error": str(exc)})
            self.abort(why.FRAMING)
            return
        owner = self.owner
        now = owner.loop.time()
        buffered = self.framer.buffered
        if frames.messages or frames.pong:
            self.last_activity = now
            self.partial_since = now if buffered else None
        elif buffered and self.partial_since is None:
            self.partial_since = now
        if buffered > owner.table.limits.max_buffer:
            self.abort(why.BUFFER)
            return
        if frames.pong:
            self.write(b"\r\n")
        sink = owner.sink
        peer = self.peer
        for message in frames.messages:
            sink.message_received(message, peer)

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(str(exc) if exc else "connection closed"))
            self.ready.exception()
        if self.admitted:
            self.owner._forget(self)
        if self.holds_slot:
            self.holds_slot = False
            self.owner.table.outbound -= 1
        # The transport holds this protocol: drop the back-reference so the pair is freed
        # by reference counting (the process keeps the garbage collector's passes small).
        self.transport = None
        self.tls = None

    # -- TLS -----------------------------------------------------------------------------
    def _tls_feed(self, tls: _Tls, data: bytes) -> bytes:
        """Hand received TLS records to the SSLObject; returns the plaintext they carried."""
        if data:
            tls.incoming.write(data)
        try:
            if not tls.done:
                try:
                    tls.obj.do_handshake()
                except ssl.SSLWantReadError:
                    self._tls_flush()
                    return b""
                tls.done = True
                self._tls_flush()
                if not self.ready.done():
                    self.ready.set_result(None)
            chunks: list[bytes] = []
            while True:
                try:
                    chunk = tls.obj.read(_READ_CHUNK)
                except ssl.SSLWantReadError:
                    break
                except ssl.SSLZeroReturnError:
                    if self.transport is not None:
                        self.transport.close()
                    break
                if not chunk:
                    break
                chunks.append(chunk)
            self._tls_flush()
        except ssl.SSLError as exc:
            # A certificate that does not verify, a protocol the context refuses, garbage.
            log.debug(
                "tls failure",
                extra={"peer": self._peer_text(), "error": exc.reason or str(exc)},
            )
            if not self.ready.done():
                self.ready.set_exception(exc)
                self.ready.exception()
            self.abort(why.TLS_HANDSHAKE)
            return b""
        return b"".join(chunks)

    def _tls_flush(self) -> None:
        tls = self.tls
        if tls is None or self.transport is None:
            return
        pending = tls.outgoing.read()
        if pending:
            self.transport.write(pending)

    # -- writing -------------------------------------------------------------------------
    def write(self, data: bytes) -> bool:
        """Queue ``data`` for the peer; False when this connection cannot take it."""
        transport = self.transport
        if transport is None or transport.is_closing() or not self.ready.done():
            return False
        if self.ready.exception() is not None:
            return False
        tls = self.tls
        if tls is not None:
            try:
                tls.obj.write(data)
            except ssl.SSLError:
                self.abort(why.TLS_HANDSHAKE)
                return False
            self._tls_flush()
        else:
            transport.write(data)
        if transport.get_write_buffer_size() > self.owner.table.limits.max_write_buffer:
            # The peer does not read what we send: it is not worth a growing buffer.
            self.abort(why.WRITE_BUFFER)
            return False
        self.last_activity = self.owner.loop.time()
        return True

    def _peer_text(self) -> str:
        return f"{self.owner.name}:{self.remote[0]}:{self.remote[1]}"


class TcpTransport:
    """A TCP or TLS listener plus the outbound connections the proxy opens on it."""

    def __init__(
        self,
        sink: MessageSink,
        *,
        host: str,
        port: int,
        connect_timeout: float = 2.0,
        max_message_size: int = DEFAULT_MAX_SIZE,
        table: ConnectionTable | None = None,
        server_ssl: ssl.SSLContext | None = None,
        client_ssl: ssl.SSLContext | None = None,
        server_name: str | None = None,
    ) -> None:
        """``server_ssl``/``client_ssl`` make this the ``tls`` transport: inbound
        connections are served, outbound ones opened, with those contexts. ``server_name``
        is the name outbound peer certificates must carry; None checks the peer's IP address
        against the certificate's IP SANs. ``table`` is shared by every stream transport of a
        process so its limits hold across them.
        """
        self.sink = sink
        self.host = host
        self.port = port
        self.connect_timeout = connect_timeout
        self.max_message_size = max_message_size
        self.table = table or ConnectionTable()
        self.server_ssl = server_ssl
        self.client_ssl = client_ssl
        self.server_name = server_name
        self.name = "tls" if server_ssl is not None or client_ssl is not None else "tcp"
        self.loop = asyncio.get_running_loop()
        self._server: asyncio.Server | None = None
        self._by_id: dict[int, _Connection] = {}
        self._by_addr: dict[tuple[str, int], _Connection] = {}
        self._pending: dict[tuple[str, int], list[tuple[bytes, str | None]]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._started = False

    async def start(self) -> None:
        """Listen. Raises OSError when the address is taken."""
        self._server = await self.loop.create_server(
            lambda: _Connection(self, outbound_key=None),
            self.host,
            self.port,
            reuse_address=True,
        )
        self.port = int(self._server.sockets[0].getsockname()[1])
        self.table.start()
        self._started = True

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
        self.table.add(conn)

    def _forget(self, conn: _Connection) -> None:
        self._by_id.pop(conn.id, None)
        key = conn.outbound_key or conn.remote
        if self._by_addr.get(key) is conn:
            del self._by_addr[key]
        self.table.remove(conn)

    def send(self, data: bytes, peer: Peer, branch: str | None) -> None:
        """Write a message to ``peer``: on its own connection, a known one, or a new one."""
        conn = self._by_id.get(peer.connection) if peer.connection is not None else None
        if conn is None:
            conn = self._by_addr.get((peer.host, peer.port))
        if conn is not None and conn.write(data):
            return
        key = (peer.host, peer.port)
        waiting = self._pending.get(key)
        limits = self.table.limits
        if waiting is not None:
            if len(waiting) >= limits.max_queued:
                self.table.closed(self.name, why.QUEUE_FULL, f"{key[0]}:{key[1]}")
                self.sink.delivery_failed(branch, Peer(self.name, key[0], key[1]), why.QUEUE_FULL)
                return
            waiting.append((data, branch))
            return
        if self.table.outbound >= limits.max_outbound:
            self.table.closed(self.name, why.OUTBOUND_LIMIT, f"{key[0]}:{key[1]}")
            self.sink.delivery_failed(branch, Peer(self.name, key[0], key[1]), why.OUTBOUND_LIMIT)
            return
        self._pending[key] = [(data, branch)]
        self.table.outbound += 1
        task = self.loop.create_task(self._connect(key))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _connect(self, key: tuple[str, int]) -> None:
        # This task holds one outbound slot until the connection is ready, then hands it
        # to the connection, which gives it back when it closes.
        error = ""
        conn: _Connection | None = None
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, protocol = await self.loop.create_connection(
                    lambda: _Connection(self, outbound_key=key), key[0], key[1]
                )
                conn = protocol
                await asyncio.shield(protocol.ready)
        except (OSError, TimeoutError) as exc:
            error = str(exc) or type(exc).__name__
            if conn is None:
                self.table.closed(self.name, why.CONNECT_FAILED, f"{key[0]}:{key[1]}")
            elif conn.close_reason is None:
                # Opened but not ready in time: a TLS handshake that stalled.
                conn.abort(why.TLS_HANDSHAKE)
        finally:
            if conn is not None and not error and conn.transport is not None:
                conn.holds_slot = True
            else:
                self.table.outbound -= 1
        waiting = self._pending.pop(key, [])
        peer = Peer(self.name, key[0], key[1])
        for data, branch in waiting:
            if error or conn is None or not conn.write(data):
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
        if self._started:
            self.table.stop()
            self._started = False
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
