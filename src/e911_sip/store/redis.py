"""Redis location store.

Every redis-py exception is turned into :class:`StoreError` here, so callers never see a
third-party exception (the httpcore ``map_exceptions`` habit). redis-py's own retries are
switched off: the edge bounds each lookup with its own timeout and falls back, and a retry
inside the client would only spend that budget.

Lookups do not go through redis-py. They are pipelined on ``pool_size`` connections of our
own (an asyncio protocol with the hiredis reply parser): each lookup is written at once on
the connection with the fewest replies outstanding, and replies are matched in order, so a
burst of calls shares a few connections and costs no pool checkout and no extra turn of the
event loop per lookup (see docs/decisions.md). A lookup that finds no connection able to take
it (all opening, or ``MAX_IN_FLIGHT`` outstanding on each) waits for one within its own bound.
Replies are bytes, decoded here record by record: a value that is not UTF-8, or a key that is
not a hash, fails that line's lookup as :class:`InvalidRecord` and leaves the connection and
every other lookup alone. Health checks, writes and scans use a redis-py client.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import Iterable, Mapping
from typing import Any, cast
from urllib.parse import parse_qs, unquote, urlsplit

import hiredis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from e911_sip.store.base import (
    DEFAULT_KEY_PREFIX,
    InvalidRecord,
    LocationRecord,
    PoolExhausted,
    StoreError,
    StoreTimeout,
    StoreUnreachable,
)
from e911_sip.store.sentinel import (
    SentinelPool,
    SentinelUrl,
    client_from_pool,
    connection_pool,
    is_sentinel_url,
    parse_sentinel_url,
    tls_context,
)

MAX_IN_FLIGHT = 256
"""Lookups outstanding on one connection at most; beyond that a lookup waits for room."""

_ADMIN_CONNECTIONS = 4
"""Connections for health checks, writes and scans, apart from the lookup connections."""


def connect(
    url: str,
    *,
    socket_timeout: float,
    max_connections: int = 64,
    decode_responses: bool = True,
    replica_acks: bool = True,
) -> aioredis.Redis:
    """A ``redis.asyncio`` client as every part of the product uses it, for any Redis URL
    (``redis+sentinel://`` included: see :mod:`e911_sip.store.sentinel`).

    Replies decoded as text unless ``decode_responses`` is False; no client-side retries (a
    retried EXEC could apply a change twice from the caller's point of view, and the edge
    bounds lookups itself); no periodic health check on the hot path. When every
    connection is busy a command waits for one, up to ``socket_timeout``, instead of failing
    at once.

    ``replica_acks=False``: no ``WAIT`` after a transaction even when the URL asks for
    ``min_replicas_ack`` (for writers that retry a failed batch, which would store it again).
    """
    pool = connection_pool(
        url,
        blocking=True,
        max_connections=max_connections,
        timeout=socket_timeout,
        decode_responses=decode_responses,
        socket_timeout=socket_timeout,
        socket_connect_timeout=socket_timeout,
        retry=Retry(NoBackoff(), 0),
        health_check_interval=0,
    )
    return client_from_pool(url, pool, replica_acks=replica_acks)


class _Pending:
    """One lookup waiting for its reply."""

    __slots__ = ("command", "future", "sent", "timer")

    def __init__(self, command: bytes, future: asyncio.Future[Any]) -> None:
        self.command = command
        self.future = future
        self.sent = False
        self.timer: asyncio.TimerHandle | None = None


class _Address:
    """Where and how the lookup connections connect, read from the store URL.

    With ``redis+sentinel://``, ``host``/``port`` are the master's as the sentinels last named
    it (:meth:`RedisStore._master`), and ``setup`` ends with ``ROLE`` so a connection opened
    to an instance that is no longer the master is refused before it carries a lookup."""

    def __init__(self, url: str) -> None:
        self.unix_path: str | None = None
        self.tls: ssl.SSLContext | None = None
        self.sentinel: SentinelUrl | None = None
        if is_sentinel_url(url):
            self.sentinel = parse_sentinel_url(url)
            self.host, self.port = "", 0
            self.db = self.sentinel.db
            self.username = self.sentinel.username
            self.password = self.sentinel.password
            if self.sentinel.tls is not None:
                self.tls = tls_context({name: [value] for name, value in self.sentinel.tls})
            return
        parts = urlsplit(url)
        query = parse_qs(parts.query)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 6379
        if parts.scheme == "unix":
            self.unix_path = parts.path
            db = query.get("db", ["0"])[0]
        else:
            db = parts.path.lstrip("/") or query.get("db", ["0"])[0]
            if parts.scheme == "rediss":
                self.tls = tls_context(query)
        self.db = int(db or 0)
        self.username = unquote(parts.username) if parts.username else None
        self.password = unquote(parts.password) if parts.password else None

    def setup(self) -> list[bytes]:
        """The commands a new connection sends before its first lookup."""
        commands: list[bytes] = []
        if self.password is not None:
            auth = ("AUTH", self.username, self.password) if self.username else None
            commands.append(_pack(*(auth or ("AUTH", self.password))))
        if self.db:
            commands.append(_pack("SELECT", str(self.db)))
        if self.sentinel is not None:
            commands.append(_pack("ROLE"))
        return commands


def _pack(*args: str | None) -> bytes:
    """A command in RESP (an array of bulk strings); None arguments are left out."""
    items = [a.encode() for a in args if a is not None]
    out = [b"*%d\r\n" % len(items)]
    for item in items:
        out += (b"$%d\r\n" % len(item), item, b"\r\n")
    return b"".join(out)


class _Connection(asyncio.Protocol):
    """One lookup connection: commands written as they come, replies matched in order.

    Not redis-py: its asyncio client spends several turns of the event loop per command (a
    task per socket-timeout wait on Python 3.11, a zero timeout per pool checkout), and in a
    burst every turn of the loop is long. Here a lookup is written at once and its reply
    resolves it in the turn that reads it.
    """

    def __init__(self, owner: RedisStore, *, silence: float) -> None:
        self._owner = owner
        self._silence = silence
        self._reader = hiredis.Reader()
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._last_data = 0.0
        self.waiting: deque[asyncio.Future[Any]] = deque()
        self.ready = False
        self.closed = False
        self.address: tuple[str, int] | None = None
        """The master it was opened to (Sentinel only)."""
        self.retired = False
        """Opened to a master that is no longer one: takes no new lookups, closes once the
        ones it carries are answered."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)

    def send(self, command: bytes, future: asyncio.Future[Any]) -> None:
        if self._transport is None:
            raise StoreUnreachable("redis connection used before it opened")
        self._transport.write(command)
        self.waiting.append(future)
        if self._timer is None:
            loop = asyncio.get_running_loop()
            self._last_data = loop.time()
            self._timer = loop.call_at(self._last_data + self._silence, self._check_silence)

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        self._last_data = asyncio.get_running_loop().time()
        while True:
            try:
                reply = self._reader.gets()
            except hiredis.ProtocolError as exc:
                self.abort(f"redis protocol error: {exc}")
                return
            if reply is False:
                break
            if not self.waiting:
                self.abort("redis sent a reply nobody asked for")
                return
            future = self.waiting.popleft()
            if not future.done():  # else timed out or cancelled: the reply is dropped
                future.set_result(reply)
        if self.retired and not self.waiting:
            self.abort("redis master moved")
            return
        self._owner._drained()

    def _check_silence(self) -> None:
        self._timer = None
        if self.closed or not self.waiting:
            return
        loop = asyncio.get_running_loop()
        due = self._last_data + self._silence
        if loop.time() >= due:
            self.abort(f"redis sent nothing for {self._silence:g} s")
        else:
            self._timer = loop.call_at(due, self._check_silence)

    def abort(self, reason: str) -> None:
        """Close at once and fail what is still waiting on this connection."""
        if self._transport is not None:
            self._transport.abort()
        self._lost(reason)

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost(f"redis connection lost: {exc or 'closed by the server'}")

    def _lost(self, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        incident = object()
        while self.waiting:
            future = self.waiting.popleft()
            if not future.done():
                future.set_exception(StoreUnreachable(reason, incident=incident))
        self._owner._lost(self)
        self.ready = False


class RedisStore:
    """Line records in Redis hashes. Implements LocationStore, DeadlineLocationStore and
    LineRecordWriter."""

    def __init__(
        self,
        *,
        url: str,
        key_prefix: str = DEFAULT_KEY_PREFIX,
        socket_timeout: float = 1.0,
        pool_size: int = 8,
        pool_timeout: float | None = None,
    ) -> None:
        """``pool_size`` connections carry lookups; a lookup waits for a connection that
        can take it up to ``pool_timeout`` seconds (None: its whole bound)."""
        if pool_size < 1:
            raise ValueError("pool_size must be at least 1")
        self._prefix = key_prefix
        self._address = _Address(url)
        self._socket_timeout = socket_timeout
        self._pool_size = pool_size
        self._pool_timeout = pool_timeout
        self._slots: list[_Connection | None] = [None] * pool_size
        self._connecting: set[int] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._queue: deque[_Pending] = deque()
        self._closed = False
        self._client = connect(
            url,
            socket_timeout=socket_timeout,
            max_connections=_ADMIN_CONNECTIONS,
            decode_responses=False,
        )

    def key(self, line: str) -> str:
        """The hash key of a 10-digit line."""
        return f"{self._prefix}{line}"

    async def lookup(self, line: str) -> LocationRecord | None:
        return await self._lookup(line, None)

    async def lookup_within(self, line: str, timeout: float) -> LocationRecord | None:
        return await self._lookup(line, timeout)

    async def _lookup(self, line: str, timeout: float | None) -> LocationRecord | None:
        if self._closed:
            raise StoreError("redis store closed")
        loop = asyncio.get_running_loop()
        entry = _Pending(_pack("HGETALL", self.key(line)), loop.create_future())
        connection = self._pick()
        if connection is not None and not self._live_queue():
            connection.send(entry.command, entry.future)
            entry.sent = True
        else:
            self._queue.append(entry)
            self._connect_missing()
        if timeout is not None:
            wait = timeout if self._pool_timeout is None else min(self._pool_timeout, timeout)
            entry.timer = loop.call_later(wait, self._expire, entry, timeout - wait)
        try:
            reply = await entry.future
        finally:
            if entry.timer is not None:
                entry.timer.cancel()
        if isinstance(reply, hiredis.ReplyError):
            raise _reply_error(str(reply))
        return _record(reply)

    def _pick(self) -> _Connection | None:
        """The ready connection with the fewest replies outstanding, if one can take more."""
        best: _Connection | None = None
        for connection in self._slots:
            if (
                connection is not None
                and connection.ready
                and not connection.retired
                and len(connection.waiting) < MAX_IN_FLIGHT
                and (best is None or len(connection.waiting) < len(best.waiting))
            ):
                best = connection
        return best

    def _drained(self) -> None:
        """A connection has room (replies came in, or it opened): send what waited."""
        queue = self._queue
        while queue:
            target = self._pick()
            if target is None:
                return
            entry = queue.popleft()
            if not entry.future.done():  # not expired or cancelled while queued
                target.send(entry.command, entry.future)
                entry.sent = True

    def _lost(self, connection: _Connection) -> None:
        if not connection.ready:
            return  # never opened: _connect reports it
        for i, slot in enumerate(self._slots):
            if slot is connection:
                self._slots[i] = None
        if self._live_queue() and not self._closed:
            self._connect_missing()

    def _live_queue(self) -> bool:
        """True when a queued lookup still waits (expired ones are dropped here)."""
        queue = self._queue
        while queue and queue[0].future.done():
            queue.popleft()
        return bool(queue)

    def _expire(self, entry: _Pending, remaining: float) -> None:
        if entry.future.done():
            return
        if not entry.sent:
            entry.future.set_exception(
                PoolExhausted("no redis connection could take the lookup while it could wait")
            )
        elif remaining > 0:
            loop = asyncio.get_running_loop()
            entry.timer = loop.call_later(remaining, self._expire, entry, 0.0)
        else:
            entry.future.set_exception(StoreTimeout("redis did not answer the lookup in time"))

    def _connect_missing(self) -> None:
        """Open the lookup connections that are not open or opening."""
        if self._closed:
            return
        loop = asyncio.get_running_loop()
        for i, slot in enumerate(self._slots):
            if slot is None and i not in self._connecting:
                self._connecting.add(i)
                task = loop.create_task(self._connect(i))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _connect(self, slot: int) -> None:
        loop = asyncio.get_running_loop()
        address = self._address
        connection = _Connection(self, silence=self._socket_timeout)
        replies: list[asyncio.Future[Any]] = []
        try:
            async with asyncio.timeout(self._socket_timeout):
                host, port = address.host, address.port
                if address.sentinel is not None:
                    host, port = await self._master()
                    connection.address = (host, port)
                if address.unix_path is not None:
                    await loop.create_unix_connection(lambda: connection, address.unix_path)
                else:
                    await loop.create_connection(
                        lambda: connection,
                        host,
                        port,
                        ssl=address.tls,
                    )
                setup = address.setup()
                replies += [loop.create_future() for _ in setup]
                for command, reply in zip(setup, replies, strict=True):
                    connection.send(command, reply)
                for reply in replies:
                    answer = await reply
                    if isinstance(answer, hiredis.ReplyError):
                        raise StoreUnreachable(f"redis refused the connection setup: {answer}")
                if address.sentinel is not None:
                    role = replies[-1].result()
                    if not (isinstance(role, list) and role and role[0] == b"master"):
                        raise StoreUnreachable(
                            f"redis at {host}:{port} is not the master (ROLE {role!r:.40})"
                        )
        except (OSError, TimeoutError, StoreError) as exc:
            connection.abort("setup failed")
            _discard(replies)
            self._connecting.discard(slot)
            self._connect_failed(exc)
            return
        except BaseException:
            connection.abort("connect cancelled")
            _discard(replies)
            raise
        finally:
            self._connecting.discard(slot)
        if self._closed:
            connection.abort("redis store closed")
            return
        connection.ready = True
        self._slots[slot] = connection
        self._drained()

    def _connect_failed(self, exc: BaseException) -> None:
        """No connection could be opened: fail the queued lookups unless another connection
        is open or still opening."""
        self._drained()
        if any(c is not None for c in self._slots) or self._connecting:
            return
        reason = str(exc) or type(exc).__name__
        failure = StoreUnreachable(
            f"redis connect failed: {reason}", incident=object(), connect=True
        )
        while self._queue:
            entry = self._queue.popleft()
            if not entry.future.done():
                entry.future.set_exception(
                    StoreUnreachable(str(failure), incident=failure.incident, connect=True)
                )

    async def _master(self) -> tuple[str, int]:
        """The master's address as the sentinels name it now.

        Raises:
            StoreUnreachable: no sentinel answered, or none names a master that is up.
        """
        pool = self._client.connection_pool
        if not isinstance(pool, SentinelPool):
            raise StoreError("the redis store has no sentinels to ask")
        try:
            return await pool.get_master_address()
        except (RedisError, OSError) as exc:
            raise StoreUnreachable(
                f"no redis master from the sentinels: {exc}", connect=True
            ) from exc

    def _retire(self, master: tuple[str, int]) -> None:
        """Stop using lookup connections opened to another master than ``master``."""
        for connection in self._slots:
            if connection is None or connection.address in (None, master):
                continue
            connection.retired = True
            if not connection.waiting:
                connection.abort("redis master moved")

    async def ping(self) -> bool:
        """True when Redis answers PING. Also opens lookup connections that are missing, so
        that a burst finds them open instead of paying for the handshakes.

        Behind Sentinel it first asks the sentinels for the master: a switch is noticed here
        (every health check) even when no connection to the old master broke, and the
        connections to the old master are closed once they have answered what they carry."""
        if self._address.sentinel is not None:
            try:
                self._retire(await self._master())
            except StoreError:
                pass  # no sentinel answered: the master may still, and PING tells
        try:
            ok = bool(await self._client.ping())
        except (RedisError, OSError):
            return False
        if ok:
            self._connect_missing()
        return ok

    async def close(self) -> None:
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            try:
                await task
            except asyncio.CancelledError:
                pass
        while self._queue:
            entry = self._queue.popleft()
            if not entry.future.done():
                entry.future.set_exception(StoreError("redis store closed"))
        for connection in self._slots:
            if connection is not None:
                connection.abort("redis store closed")
        try:
            await self._client.aclose()
        except (RedisError, OSError):
            pass

    async def put_records(
        self, records: Mapping[str, LocationRecord], deletions: frozenset[str] = frozenset()
    ) -> None:
        try:
            async with self._client.pipeline(transaction=True) as pipe:
                for line in deletions:
                    pipe.delete(self.key(line))
                for line, record in records.items():
                    # DEL then HSET inside MULTI: the hash is replaced whole, so a field the
                    # new record lacks (an old callback) cannot survive beside it.
                    pipe.delete(self.key(line))
                    items = [part for pair in record.to_fields().items() for part in pair]
                    pipe.hset(self.key(line), items=items)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            raise StoreError(f"redis write failed: {exc}") from exc

    async def delete_unchanged(self, records: Mapping[str, LocationRecord]) -> frozenset[str]:
        lines = list(records)
        try:
            script = self._client.register_script(_DELETE_UNCHANGED)
            async with self._client.pipeline(transaction=False) as pipe:
                for line in lines:
                    fields = [part for pair in records[line].to_fields().items() for part in pair]
                    await script(keys=[self.key(line)], args=fields, client=pipe)
                results = await pipe.execute()
        except (RedisError, OSError) as exc:
            raise StoreError(f"redis delete failed: {exc}") from exc
        return frozenset(line for line, deleted in zip(lines, results, strict=True) if deleted)

    async def all_lines(self) -> dict[str, LocationRecord]:
        out: dict[str, LocationRecord] = {}
        try:
            # COUNT 1000: Redis's default of 10 makes 10,000 lines a thousand round trips.
            keys: list[bytes] = [
                key async for key in self._client.scan_iter(match=f"{self._prefix}*", count=1000)
            ]
            if not keys:
                return out
            async with self._client.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.hgetall(key)
                results = await pipe.execute(raise_on_error=False)
        except (RedisError, OSError) as exc:
            raise StoreError(f"redis scan failed: {exc}") from exc
        prefix = self._prefix.encode()
        for key, fields in zip(keys, results, strict=True):
            if isinstance(fields, Exception):
                continue  # not a hash: not a line record
            try:
                line = key[len(prefix) :].decode("ascii")
                record = _record(fields)
            except (UnicodeDecodeError, InvalidRecord):
                continue
            if record is not None:
                out[line] = record
        return out


_DELETE_UNCHANGED = """
local fields = redis.call('HGETALL', KEYS[1])
if #fields ~= #ARGV then return 0 end
local want = {}
for i = 1, #ARGV, 2 do want[ARGV[i]] = ARGV[i + 1] end
for i = 1, #fields, 2 do
  if want[fields[i]] ~= fields[i + 1] then return 0 end
end
return redis.call('DEL', KEYS[1])
"""
"""Delete the hash at KEYS[1] only when its fields and values are exactly ARGV's pairs."""


def _record(reply: object) -> LocationRecord | None:
    """A line record from a raw HGETALL reply (a dict under RESP3, pairs under RESP2).

    Raises:
        InvalidRecord: a field or value is not UTF-8, or the record breaks the schema.
    """
    if isinstance(reply, dict):
        pairs: Iterable[tuple[object, object]] = reply.items()
    elif isinstance(reply, list):
        pairs = zip(reply[::2], reply[1::2], strict=True)
    else:
        raise InvalidRecord(f"unexpected reply to HGETALL: {type(reply).__name__}")
    fields: dict[str, str] = {}
    for name, value in pairs:
        if not isinstance(name, bytes) or not isinstance(value, bytes):
            raise InvalidRecord("unexpected field type in the line record")
        try:
            fields[name.decode("utf-8")] = value.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidRecord(f"field {name!r} is not UTF-8: {exc.reason}") from None
    if not fields:
        return None
    return LocationRecord.from_fields(fields)


def _discard(futures: Iterable[asyncio.Future[Any]]) -> None:
    """Cancel what is pending and mark failures seen: nobody will await these."""
    for future in futures:
        if not future.done():
            future.cancel()
        elif not future.cancelled():
            future.exception()


def _reply_error(text: str) -> StoreError:
    """An error reply to a lookup: WRONGTYPE is the key's problem, anything else the store's."""
    if text.startswith("WRONGTYPE"):
        return InvalidRecord(f"line key is not a hash: {text}")
    return StoreError(f"redis refused the lookup: {text}")
