"""Redis location store (``redis.asyncio`` with the hiredis parser).

Every redis-py exception is turned into :class:`StoreError` here, so callers never see a
third-party exception (the httpcore ``map_exceptions`` habit). redis-py's own retries are
switched off: the edge bounds each lookup with its own timeout and falls back, and a retry
inside the client would only spend that budget.

Lookups are pipelined: the lookups that arrive while the loop is busy are sent together as
one batch of HGETALLs on one connection, so a burst of calls costs a few round trips and not
one pool checkout each (see docs/decisions.md). At most ``pool_size`` batches are in flight;
a lookup that finds every connection busy waits for one within its own bound. Replies are
read as bytes and decoded here, record by record: a value that is not UTF-8, or a key that
is not a hash, fails that line's lookup as :class:`InvalidRecord` and leaves the connection
and every other lookup alone.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterable, Mapping
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.connection import BlockingConnectionPool, ConnectionPool
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from e911_sip.store.base import (
    DEFAULT_KEY_PREFIX,
    InvalidRecord,
    LocationRecord,
    PoolExhausted,
    StoreError,
    StoreTimeout,
    StoreUnreachable,
)

MAX_BATCH = 256
"""Lookups sent in one pipeline at most: bounds the reply one connection reads at once."""

_ADMIN_CONNECTIONS = 4
"""Connections for health checks, writes and scans, apart from the lookup connections."""


def connect(
    url: str,
    *,
    socket_timeout: float,
    max_connections: int = 64,
    decode_responses: bool = True,
) -> aioredis.Redis:
    """A ``redis.asyncio`` client as every part of the product uses it.

    Replies decoded as text unless ``decode_responses`` is False; no client-side retries (a
    retried EXEC could apply a change twice from the caller's point of view, and the edge
    bounds lookups itself); no periodic health check on the hot path. When every
    connection is busy a command waits for one, up to ``socket_timeout``, instead of failing
    at once.
    """
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=socket_timeout,
        decode_responses=decode_responses,
        socket_timeout=socket_timeout,
        socket_connect_timeout=socket_timeout,
        retry=Retry(NoBackoff(), 0),
        health_check_interval=0,
    )
    return aioredis.Redis.from_pool(pool)


class _Pending:
    """One lookup waiting for its batch."""

    __slots__ = ("key", "future", "sent", "timer")

    def __init__(self, key: str, future: asyncio.Future[Any]) -> None:
        self.key = key
        self.future = future
        self.sent = False
        self.timer: asyncio.TimerHandle | None = None


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
        """``pool_size`` connections carry lookups; a lookup waits for a free one up to
        ``pool_timeout`` seconds (None: its whole bound)."""
        if pool_size < 1:
            raise ValueError("pool_size must be at least 1")
        self._prefix = key_prefix
        self._pool_size = pool_size
        self._pool_timeout = pool_timeout
        # Bytes, not text: a value that is not UTF-8 must fail its own record, not the
        # parser mid-reply (which would leave the rest of the reply on the connection).
        self._pool: ConnectionPool = ConnectionPool.from_url(
            url,
            max_connections=pool_size,
            decode_responses=False,
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_timeout,
            retry=Retry(NoBackoff(), 0),
            health_check_interval=0,
        )
        self._client = connect(
            url,
            socket_timeout=socket_timeout,
            max_connections=_ADMIN_CONNECTIONS,
            decode_responses=False,
        )
        self._queue: deque[_Pending] = deque()
        self._busy = 0
        self._kick_scheduled = False
        self._batches: set[asyncio.Task[None]] = set()
        self._closed = False

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
        entry = _Pending(self.key(line), loop.create_future())
        self._queue.append(entry)
        if not self._kick_scheduled:
            # Lookups started in this turn of the loop join the same batch.
            self._kick_scheduled = True
            loop.call_soon(self._kick)
        if timeout is not None:
            wait = timeout if self._pool_timeout is None else min(self._pool_timeout, timeout)
            entry.timer = loop.call_later(wait, self._expire, entry, timeout - wait)
        try:
            reply = await entry.future
        finally:
            if entry.timer is not None:
                entry.timer.cancel()
        return _record(reply)

    def _expire(self, entry: _Pending, remaining: float) -> None:
        if entry.future.done():
            return
        if not entry.sent:
            entry.future.set_exception(
                PoolExhausted("every redis connection stayed busy while the lookup could wait")
            )
        elif remaining > 0:
            loop = asyncio.get_running_loop()
            entry.timer = loop.call_later(remaining, self._expire, entry, 0.0)
        else:
            entry.future.set_exception(StoreTimeout("redis did not answer the lookup in time"))

    def _kick(self) -> None:
        """Send what is queued, one batch per idle connection."""
        self._kick_scheduled = False
        queue = self._queue
        while queue and self._busy < self._pool_size:
            share = -(-len(queue) // (self._pool_size - self._busy))
            share = min(MAX_BATCH, share)
            batch: list[_Pending] = []
            while queue and len(batch) < share:
                entry = queue.popleft()
                if not entry.future.done():  # not expired or cancelled while queued
                    entry.sent = True
                    batch.append(entry)
            if batch:
                self._busy += 1
                task = asyncio.get_running_loop().create_task(self._run(batch))
                self._batches.add(task)
                task.add_done_callback(self._batches.discard)

    async def _run(self, batch: list[_Pending]) -> None:
        try:
            await self._send(batch)
        finally:
            self._busy -= 1
            if self._queue and not self._kick_scheduled and not self._closed:
                self._kick()

    async def _send(self, batch: list[_Pending]) -> None:
        incident = object()
        try:
            connection = await self._pool.get_connection()  # type: ignore[no-untyped-call]
        except (RedisError, OSError) as exc:
            _fail(
                batch,
                StoreUnreachable(f"redis connect failed: {exc}", incident=incident, connect=True),
            )
            return
        try:
            commands: list[tuple[Any, ...]] = [("HGETALL", entry.key) for entry in batch]
            await connection.send_packed_command(connection.pack_commands(commands))
            for entry in batch:
                try:
                    reply = await connection.read_response()
                except ResponseError as exc:
                    # An error reply is read whole: the connection is still in step.
                    _resolve(entry, exception=_response_error(exc))
                else:
                    _resolve(entry, result=reply)
        except RedisTimeoutError as exc:
            _fail(batch, StoreTimeout(f"redis lookup timed out: {exc}", incident=incident))
        except (RedisError, OSError) as exc:
            # redis-py has disconnected the connection; the next batch opens a new one.
            _fail(batch, StoreUnreachable(f"redis lookup failed: {exc}", incident=incident))
        finally:
            await self._pool.release(connection)

    async def ping(self) -> bool:
        try:
            return bool(await self._client.ping())
        except (RedisError, OSError):
            return False

    async def close(self) -> None:
        self._closed = True
        for task in list(self._batches):
            task.cancel()
        for task in list(self._batches):
            try:
                await task
            except asyncio.CancelledError:
                pass
        _fail(self._queue, StoreError("redis store closed"))
        self._queue.clear()
        try:
            await self._pool.disconnect()
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

    async def all_lines(self) -> dict[str, LocationRecord]:
        out: dict[str, LocationRecord] = {}
        try:
            keys: list[bytes] = [
                key async for key in self._client.scan_iter(match=f"{self._prefix}*")
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


def _response_error(exc: ResponseError) -> StoreError:
    """A per-command error reply: WRONGTYPE is the key's problem, anything else the store's."""
    text = str(exc)
    if text.startswith("WRONGTYPE"):
        return InvalidRecord(f"line key is not a hash: {text}")
    return StoreError(f"redis refused the lookup: {text}")


def _resolve(
    entry: _Pending, *, result: object = None, exception: BaseException | None = None
) -> None:
    if entry.future.done():
        return  # expired or cancelled while the batch was out
    if exception is not None:
        entry.future.set_exception(exception)
    else:
        entry.future.set_result(result)


def _fail(entries: Iterable[_Pending], exception: StoreError) -> None:
    for entry in entries:
        if not entry.future.done():
            # One exception object per lookup (a shared one would collect every
            # awaiter's traceback); the incident tells the breaker they are one event.
            entry.future.set_exception(_copy(exception))


def _copy(exception: StoreError) -> StoreError:
    if isinstance(exception, StoreUnreachable):
        return StoreUnreachable(
            str(exception), incident=exception.incident, connect=exception.connect
        )
    return type(exception)(str(exception), incident=exception.incident)
