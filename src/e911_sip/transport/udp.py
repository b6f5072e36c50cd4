"""UDP transport: one datagram is one message (RFC 3261 §18.1.1, §18.2.1)."""

from __future__ import annotations

import asyncio
import logging
import socket

from e911_sip.sip.peer import Peer
from e911_sip.transport.base import MessageSink

log = logging.getLogger("e911_sip.transport")


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, owner: UdpTransport) -> None:
        self._owner = owner

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        self._owner.sink.message_received(data, Peer("udp", str(addr[0]), int(addr[1])))

    def error_received(self, exc: Exception) -> None:
        # An ICMP error on an unconnected socket names no destination; the transaction's own
        # timers (and the provisional timeout) deal with the silent peer.
        log.debug("udp error received", extra={"error": str(exc)})


class UdpTransport:
    """A bound UDP socket that sends to any peer."""

    def __init__(self, sink: MessageSink, *, host: str, port: int) -> None:
        self.sink = sink
        self.host = host
        self.port = port
        self._transport: asyncio.DatagramTransport | None = None

    async def start(self) -> None:
        """Bind the socket. Raises OSError when the address is taken."""
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            # A large receive buffer rides out bursts while the loop is busy elsewhere.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * 1024 * 1024)
            sock.bind((self.host, self.port))
        except OSError:
            sock.close()
            raise
        transport, _ = await loop.create_datagram_endpoint(lambda: _Protocol(self), sock=sock)
        self._transport = transport
        self.port = int(sock.getsockname()[1])

    @property
    def bound(self) -> bool:
        """True while the socket is open."""
        return self._transport is not None and not self._transport.is_closing()

    def send(self, data: bytes, peer: Peer, branch: str | None) -> None:
        """Send one datagram; a local send error is reported to the sink."""
        transport = self._transport
        if transport is None or transport.is_closing():
            self.sink.delivery_failed(branch, peer, "udp socket closed")
            return
        try:
            transport.sendto(data, (peer.host, peer.port))
        except OSError as exc:
            self.sink.delivery_failed(branch, peer, str(exc))

    async def close(self) -> None:
        """Close the socket."""
        if self._transport is not None:
            self._transport.close()
            self._transport = None
