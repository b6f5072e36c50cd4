"""Redis location store (``redis.asyncio`` with the hiredis parser).

Every redis-py exception is turned into :class:`StoreError` here, so callers never see a
third-party exception (the httpcore ``map_exceptions`` habit). redis-py's own retries are
switched off: the edge bounds each lookup with its own timeout and falls back, and a retry
inside the client would only spend that budget.
"""

from __future__ import annotations

from collections.abc import Mapping

import redis.asyncio as aioredis
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

from e911_sip.store.base import DEFAULT_KEY_PREFIX, InvalidRecord, LocationRecord, StoreError


def connect(url: str, *, socket_timeout: float, max_connections: int = 64) -> aioredis.Redis:
    """A ``redis.asyncio`` client as every part of the product uses it.

    Replies decoded as text; no client-side retries (a retried EXEC could apply a change
    twice from the caller's point of view, and the edge bounds lookups itself); no periodic
    health check on the hot path.
    """
    client: aioredis.Redis = aioredis.Redis.from_url(
        url,
        decode_responses=True,
        socket_timeout=socket_timeout,
        socket_connect_timeout=socket_timeout,
        retry=Retry(NoBackoff(), 0),
        max_connections=max_connections,
        health_check_interval=0,
    )
    return client


class RedisStore:
    """Line records in Redis hashes. Implements LocationStore and LineRecordWriter."""

    def __init__(
        self,
        *,
        url: str,
        key_prefix: str = DEFAULT_KEY_PREFIX,
        socket_timeout: float = 1.0,
        max_connections: int = 64,
    ) -> None:
        self._prefix = key_prefix
        self._client = connect(url, socket_timeout=socket_timeout, max_connections=max_connections)

    def key(self, line: str) -> str:
        """The hash key of a 10-digit line."""
        return f"{self._prefix}{line}"

    async def lookup(self, line: str) -> LocationRecord | None:
        try:
            fields = await self._client.hgetall(self.key(line))
        except (RedisError, OSError) as exc:
            raise StoreError(f"redis lookup failed: {exc}") from exc
        if not fields:
            return None
        return LocationRecord.from_fields({str(k): str(v) for k, v in fields.items()})

    async def ping(self) -> bool:
        try:
            return bool(await self._client.ping())
        except (RedisError, OSError):
            return False

    async def close(self) -> None:
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

    async def all_lines(self) -> dict[str, LocationRecord]:
        out: dict[str, LocationRecord] = {}
        try:
            keys = [key async for key in self._client.scan_iter(match=f"{self._prefix}*")]
            if not keys:
                return out
            async with self._client.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.hgetall(key)
                results = await pipe.execute()
        except (RedisError, OSError) as exc:
            raise StoreError(f"redis scan failed: {exc}") from exc
        for key, fields in zip(keys, results, strict=True):
            line = str(key)[len(self._prefix) :]
            try:
                out[line] = LocationRecord.from_fields({str(k): str(v) for k, v in fields.items()})
            except InvalidRecord:
                continue
        return out
