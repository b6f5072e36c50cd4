"""Redis location store.

Every redis-py exception is turned into :class:`StoreError` here, so callers never see a
third-party exception (the httpcore ``map_exceptions`` habit). redis-py's own retries are
switched off: the edge bounds each lookup with its own timeout and falls back, and a retry
inside the client would only spend that budget.

Lookups do not go through redis-py. They are ``HGETALL`` pipelined on ``pool_size``
connections of :mod:`e911_sip.store.resp` (the store is such a pool): each lookup is written
at once on the connection with the fewest replies outstanding, so a burst of calls shares a
few connections and costs no pool checkout and no extra turn of the event loop per lookup
(see docs/decisions.md). A lookup that finds no connection able to take it (all opening, or
``MAX_IN_FLIGHT`` outstanding on each) waits for one within its own bound. Replies are bytes,
decoded here record by record: a value that is not UTF-8, or a key that is not a hash, fails
that line's lookup as :class:`InvalidRecord` and leaves the connection and every other
lookup alone. Health checks, writes and scans use a redis-py client.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from e911_sip.store.base import (
    DEFAULT_KEY_PREFIX,
    InvalidRecord,
    LocationRecord,
    StoreError,
)
from e911_sip.store.resp import MAX_IN_FLIGHT as MAX_IN_FLIGHT
from e911_sip.store.resp import Address, Connection, ReplyError, RespPool, pack
from e911_sip.store.sentinel import SentinelPool, client_from_pool, connection_pool

# The wire pieces under the names this module has always given them.
_Address = Address
_Connection = Connection
_pack = pack

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


class RedisStore(RespPool):
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
        self._client = connect(
            url,
            socket_timeout=socket_timeout,
            max_connections=_ADMIN_CONNECTIONS,
            decode_responses=False,
        )
        # Behind Sentinel the lookup connections ask the admin client's sentinels for the
        # master: one set of sentinel clients, one note of each switch.
        pool = self._client.connection_pool
        super().__init__(
            url,
            size=pool_size,
            socket_timeout=socket_timeout,
            pool_timeout=pool_timeout,
            sentinel=pool if isinstance(pool, SentinelPool) else None,
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
        try:
            reply = await self.execute("HGETALL", self._prefix + line, timeout=timeout)
        except ReplyError as exc:
            raise _reply_error(exc.text) from None
        return _record(reply)

    async def ping(self) -> bool:
        """True when Redis answers PING. Also opens lookup connections that are missing, so
        that a burst finds them open instead of paying for the handshakes.

        Behind Sentinel it first asks the sentinels for the master: a switch is noticed here
        (every health check) even when no connection to the old master broke, and the
        connections to the old master are closed once they have answered what they carry."""
        await self.follow_master()
        try:
            ok = bool(await self._client.ping())
        except (RedisError, OSError):
            return False
        if ok:
            self.open_missing()
        return ok

    async def close(self) -> None:
        await super().close()
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


def _reply_error(text: str) -> StoreError:
    """An error reply to a lookup: WRONGTYPE is the key's problem, anything else the store's."""
    if text.startswith("WRONGTYPE"):
        return InvalidRecord(f"line key is not a hash: {text}")
    return StoreError(f"redis refused the lookup: {text}")
