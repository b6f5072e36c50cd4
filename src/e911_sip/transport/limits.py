"""Bounds on stream connections (TCP, TLS): admission, deadlines and the one sweep.

Anyone who can reach the SIP port can open a connection, so every piece of state a stream
holds has a bound (STYLE.md habit 12): how many connections in all and per source address,
how long a connection may sit without a complete message, how long one message may take to
arrive once its first byte did (slowloris), how many unframed bytes it may hold, how much we
may queue for a peer that does not read, and how many outbound connections and queued
messages the proxy may build up. The softswitch is never refused because outsiders filled
the table: a reserve of slots is kept that only trusted sources may take.

One :class:`ConnectionTable` serves every stream listener of a process. Deadlines are checked
by one periodic sweep (a single loop timer), not a timer per connection. Every refusal and
every close the table decides is reported to ``on_close(transport, reason)`` (a metric) and
logged at most once per ``log_interval`` per reason, so a flood gives a summary line, not a
line per connection.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from e911_sip.proxy.trust import TrustPolicy

log = logging.getLogger("e911_sip.transport")

REFUSED_FULL = "refused_full"
"""Every slot is taken (the trusted reserve too)."""
REFUSED_UNTRUSTED = "refused_untrusted_full"
"""Only the reserve for trusted sources is left."""
REFUSED_PER_IP = "refused_per_ip"
"""The source address already holds its share."""
IDLE = "idle"
HEADER_TIMEOUT = "header_timeout"
TLS_HANDSHAKE = "tls_handshake"
BUFFER = "buffer"
WRITE_BUFFER = "write_buffer"
FRAMING = "framing"
OUTBOUND_LIMIT = "outbound_limit"
QUEUE_FULL = "queue_full"
CONNECT_FAILED = "connect_failed"

CLOSE_REASONS = (
    REFUSED_FULL,
    REFUSED_UNTRUSTED,
    REFUSED_PER_IP,
    IDLE,
    HEADER_TIMEOUT,
    TLS_HANDSHAKE,
    BUFFER,
    WRITE_BUFFER,
    FRAMING,
    OUTBOUND_LIMIT,
    QUEUE_FULL,
    CONNECT_FAILED,
)
"""Every reason :class:`ConnectionTable` reports, for pre-creating metric series."""


@dataclass(frozen=True, slots=True, kw_only=True)
class StreamLimits:
    """Bounds on stream connections. The defaults keep a flood within ~200 MB."""

    max_connections: int = 1024
    """Open connections at most, inbound from every source together (per process)."""
    max_connections_per_ip: int = 32
    """Inbound connections at most from one untrusted source address."""
    trusted_reserve: int = 128
    """Slots of ``max_connections`` that only trusted sources may take."""
    idle_timeout: float = 300.0
    """Seconds without a complete message in either direction before a connection is closed.
    Longer than Timer C, so a connection waiting for a final response is not idled out."""
    header_timeout: float = 10.0
    """Seconds a message may take to arrive once its first byte did; a new inbound
    connection (and its TLS handshake) must deliver its first message within this too."""
    max_buffer: int = 65535
    """Unframed bytes one connection may hold; more and it is closed."""
    max_write_buffer: int = 131072
    """Bytes queued for a peer that does not read; more and the connection is closed."""
    max_outbound: int = 64
    """Outbound connections (open or being opened) at most."""
    max_queued: int = 256
    """Messages waiting for one outbound connection to open; more fail at once."""
    log_interval: float = 10.0
    """Seconds between two log lines for one close reason (the rest are summed)."""


class Closable(Protocol):
    """A connection as the table sees it."""

    @property
    def transport_name(self) -> str:
        """``tcp`` or ``tls``."""
        ...

    @property
    def host(self) -> str:
        """The remote address."""
        ...

    @property
    def inbound(self) -> bool:
        """True for accepted connections, False for ones we opened."""
        ...

    @property
    def last_activity(self) -> float:
        """Loop time of the last complete message in or out (or of the connect)."""
        ...

    @property
    def partial_since(self) -> float | None:
        """Loop time since when an unfinished message (or first message) has been awaited."""
        ...

    def abort(self, reason: str) -> None:
        """Close now, for ``reason`` (the connection reports it back through the table)."""
        ...


class ConnectionTable:
    """Admission and deadlines for every stream connection of the process."""

    def __init__(
        self,
        limits: StreamLimits | None = None,
        *,
        is_trusted: Callable[[str], bool] | None = None,
        on_close: Callable[[str, str], None] | None = None,
    ) -> None:
        self.limits = limits or StreamLimits()
        # Without a policy of the owner's, the product's default trust domain (loopback).
        self.is_trusted = is_trusted or TrustPolicy().is_trusted
        self._on_close = on_close
        self._conns: set[Closable] = set()
        self._inbound = 0
        self._per_ip: dict[str, int] = {}
        self.outbound = 0
        """Outbound connections open or being opened (maintained by the transports)."""
        self._timer: asyncio.TimerHandle | None = None
        self._users = 0
        self._unlogged: dict[str, tuple[int, str]] = {}
        self._logged_at: dict[str, float] = {}

    # -- admission -----------------------------------------------------------------------
    def admit(self, host: str) -> str | None:
        """None when an inbound connection from ``host`` may stay, else the refusal reason."""
        limits = self.limits
        if self._inbound >= limits.max_connections:
            return REFUSED_FULL
        if self.is_trusted(host):
            return None
        if self._inbound >= limits.max_connections - limits.trusted_reserve:
            return REFUSED_UNTRUSTED
        if self._per_ip.get(host, 0) >= limits.max_connections_per_ip:
            return REFUSED_PER_IP
        return None

    def add(self, conn: Closable) -> None:
        """Track an admitted connection (inbound or outbound)."""
        self._conns.add(conn)
        if conn.inbound:
            self._inbound += 1
            self._per_ip[conn.host] = self._per_ip.get(conn.host, 0) + 1

    def remove(self, conn: Closable) -> None:
        """Forget a connection that closed; idempotent."""
        if conn not in self._conns:
            return
        self._conns.discard(conn)
        if conn.inbound:
            self._inbound -= 1
            left = self._per_ip.get(conn.host, 1) - 1
            if left > 0:
                self._per_ip[conn.host] = left
            else:
                self._per_ip.pop(conn.host, None)

    @property
    def inbound(self) -> int:
        """Inbound connections admitted and open."""
        return self._inbound

    def count(self, transport: str, *, inbound: bool) -> int:
        """Open connections of one transport and direction (for the gauge)."""
        return sum(1 for c in self._conns if c.transport_name == transport and c.inbound == inbound)

    # -- reporting -----------------------------------------------------------------------
    def closed(self, transport: str, reason: str, peer: str) -> None:
        """Count a refusal or close, and log it at a bounded pace."""
        if self._on_close is not None:
            self._on_close(transport, reason)
        count, _ = self._unlogged.get(reason, (0, ""))
        self._unlogged[reason] = (count + 1, peer)
        self._flush_log(reason, asyncio.get_running_loop().time())

    def _flush_log(self, reason: str, now: float) -> None:
        pending = self._unlogged.get(reason)
        if pending is None:
            return
        last = self._logged_at.get(reason)
        if last is not None and now - last < self.limits.log_interval:
            return
        count, peer = pending
        del self._unlogged[reason]
        self._logged_at[reason] = now
        log.warning(
            "stream connection closed by a limit",
            extra={"reason": reason, "count": count, "last_peer": peer},
        )

    # -- the sweep -----------------------------------------------------------------------
    @property
    def sweep_interval(self) -> float:
        """Seconds between sweeps: fine enough for the shortest deadline, at most 1 s."""
        limits = self.limits
        return max(0.05, min(1.0, limits.header_timeout / 4, limits.idle_timeout / 4))

    def start(self) -> None:
        """Arm the sweep (each transport calls this once; the first arms it)."""
        self._users += 1
        if self._timer is None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(self.sweep_interval, self._sweep)

    def stop(self) -> None:
        """Disarm the sweep once every transport that started it stopped."""
        self._users = max(0, self._users - 1)
        if self._users == 0 and self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        try:
            self.sweep(now)
        finally:
            self._timer = loop.call_later(self.sweep_interval, self._sweep)

    def sweep(self, now: float) -> None:
        """Close every connection past a deadline at ``now``."""
        limits = self.limits
        expired: list[tuple[Closable, str]] = []
        for conn in self._conns:
            started = conn.partial_since
            if started is not None and now - started > limits.header_timeout:
                expired.append((conn, HEADER_TIMEOUT))
            elif now - conn.last_activity > limits.idle_timeout:
                expired.append((conn, IDLE))
        for conn, reason in expired:
            conn.abort(reason)
        for reason in list(self._unlogged):
            self._flush_log(reason, now)
