"""Every line record in process memory, kept current from Redis (Kamailio's htable pattern).

Why: a 911 call must not wait on the network. With the records in a dict, a lookup is a
dictionary read in the same turn of the event loop that received the INVITE, whatever Redis
is doing; a Redis that is slow, paused or gone costs the call nothing, because the mirror
keeps serving what it holds.

How it stays current (docs/decisions.md, "Location records in memory"):

1. One dedicated RESP2 connection asks Redis for *client-side caching invalidations in
   broadcast mode* on the key prefix (``CLIENT TRACKING on REDIRECT <own id> BCAST PREFIX
   e911:line:``) and subscribes to ``__redis__:invalidate``. From then on Redis pushes the
   name of every key under the prefix that anybody changes (provisioning, a resync, an
   operator with ``redis-cli HSET``), and ``None`` when the keyspace is flushed. It needs no
   server configuration (unlike keyspace notifications) and is sent per write, not polled.
2. Then the whole prefix is loaded: ``SCAN`` in batches with a pipelined ``HGETALL`` per
   batch, progress in the log. Tracking is on before the scan starts, so a write during the
   load is re-read after it.
3. Each invalidated key is re-read (pipelined, batched) and the dict updated or the entry
   removed. A key invalidated again while its read is in flight is read again.
4. A PING every ``ping_interval`` on the tracking connection proves it alive; a connection
   that stops answering, or fails, is closed and the cycle starts again from step 1 with a
   fresh full load into a new dict (so records deleted meanwhile disappear), swapped in when
   complete. Until then the previous dict keeps serving.

A full load that finds no line record while the mirror holds some, on a Redis that has no
schema key either (``e911:schema``, which provisioning writes), is taken for a database that
was lost (restarted without persistence, flushed, or a replica that never had the data), not
for an instruction to forget every location: the mirror keeps serving what it holds, says so
once at CRITICAL, stays out of sync (so the sync age grows and E911LocationsStale fires) and
loads again until Redis has records or the schema key again.

Before the first full load completes, :meth:`lookup_now` raises :class:`StoreNotReady` and
:meth:`lookup` reads Redis directly (the edge bounds that read with its lookup timeout), and
the sync state says not ready so ``/readyz`` can tell.

Memory: records are kept as ``int(line) -> "endpoint"`` or ``"endpoint|callback"`` (one
small int key and one string per line, the LocationRecord built on lookup): about 170 bytes a
record (docs/performance.md has the measurement at a million records).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.asyncio.connection import AbstractConnection, Connection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from e911_sip.store.base import (
    DEFAULT_KEY_PREFIX,
    InvalidRecord,
    LocationRecord,
    StoreError,
    StoreNotReady,
    SyncState,
)
from e911_sip.store.redis import RedisStore
from e911_sip.store.schema import SCHEMA_KEY
from e911_sip.store.sentinel import connection_pool, is_sentinel_url

log = logging.getLogger("e911_sip.store.mirror")

_INVALIDATE_CHANNEL = b"__redis__:invalidate"

# Every hash of KEYS, in order; a key that is not a hash reads as false (pcall keeps a
# WRONGTYPE from failing the whole batch).
_HGETALL_MANY = """
local out = {}
for i, key in ipairs(KEYS) do
  local ok, fields = pcall(redis.call, 'HGETALL', key)
  if ok then out[i] = fields else out[i] = false end
end
return out
"""


@dataclass(frozen=True, slots=True, kw_only=True)
class MirrorOptions:
    """How the mirror loads and follows Redis."""

    key_prefix: str = DEFAULT_KEY_PREFIX
    """Prefix of the line record keys."""
    batch: int = 1000
    """Keys per SCAN step and per pipelined HGETALL."""
    ping_interval: float = 0.5
    """Seconds between PINGs on the tracking connection."""
    dead_after: float = 2.0
    """Seconds without any reply on the tracking connection before it is abandoned."""
    retry_delay: float = 0.5
    """Seconds between attempts to reconnect, doubled up to ``retry_delay_max``."""
    retry_delay_max: float = 5.0
    socket_timeout: float = 2.0
    """Socket timeout of the reads during a load or a refresh."""


def _pack(record: LocationRecord) -> str:
    if record.callback:
        return f"{record.provider_endpoint}|{record.callback}"
    return record.provider_endpoint


def _unpack(value: str) -> LocationRecord:
    endpoint, _, callback = value.partition("|")
    return LocationRecord(endpoint, callback or None)


def _packed(flat: list[bytes]) -> str:
    """The stored form of one hash as HGETALL returns it (a flat field/value list).

    Only the fields the edge uses are decoded and validated, by the schema's own rules
    (:meth:`LocationRecord.from_fields`).

    Raises:
        InvalidRecord: not UTF-8, or not a valid record.
    """
    fields: dict[str, str] = {}
    try:
        for index in range(0, len(flat) - 1, 2):
            name = flat[index]
            if name == b"provider_endpoint" or name == b"callback":
                fields[name.decode()] = flat[index + 1].decode()
    except UnicodeDecodeError as exc:
        raise InvalidRecord(f"record is not UTF-8 ({exc.reason})") from None
    return _pack(LocationRecord.from_fields(fields))


class _Stopped(Exception):
    """Ends a session's task group when the mirror is asked to stop."""


class MirroredRedisStore:
    """LocationStore (immediate) and LineRecordWriter over Redis, read from memory.

    Writes go straight to Redis through ``direct``; the mirror sees them come back as
    invalidations like anybody else's.
    """

    def __init__(
        self,
        *,
        url: str,
        direct: RedisStore,
        options: MirrorOptions,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._url = url
        self._direct = direct
        self._options = options
        self._clock = clock
        self._records: dict[int, str] = {}
        self._reader: aioredis.Redis = aioredis.Redis.from_pool(
            connection_pool(
                url,
                decode_responses=False,
                socket_timeout=options.socket_timeout,
                socket_connect_timeout=options.socket_timeout,
                retry=Retry(NoBackoff(), 0),
                health_check_interval=0,
            )
        )
        # One pool for every tracking connection of the mirror's life: behind Sentinel it
        # holds the sentinel clients that find the master for each new session.
        self._tracking_pool = connection_pool(
            url,
            protocol=2,
            socket_timeout=None,
            socket_connect_timeout=options.socket_timeout,
            retry=Retry(NoBackoff(), 0),
        )
        self._sentinel = is_sentinel_url(url)
        self._loaded = False
        self._in_sync = False
        self._synced_at: float | None = None
        self._loads = 0
        self._updates = 0
        self._pending: set[bytes] = set()
        self._pending_event = asyncio.Event()
        self._reload_wanted = False
        self._holding_over = False
        """True while Redis looks lost and the records held are served in its place."""
        self._prefix = options.key_prefix.encode()
        self._hgetall_many = self._reader.register_script(_HGETALL_MANY)

    # -- LocationStore --------------------------------------------------------------------
    def lookup_now(self, line: str) -> LocationRecord | None:
        """The record for ``line`` from memory.

        Raises:
            StoreNotReady: the first full load has not completed; use :meth:`lookup`.
        """
        if not self._loaded:
            raise StoreNotReady("location records are still loading")
        value = self._records.get(int(line))
        return None if value is None else _unpack(value)

    async def lookup(self, line: str) -> LocationRecord | None:
        if self._loaded:
            return self.lookup_now(line)
        return await self._direct.lookup(line)

    async def ping(self) -> bool:
        return await self._direct.ping()

    async def close(self) -> None:
        try:
            await self._reader.aclose()
        except (RedisError, OSError):
            pass
        try:
            await self._tracking_pool.aclose()
        except (RedisError, OSError):
            pass
        await self._direct.close()

    # -- LineRecordWriter -----------------------------------------------------------------
    async def put_records(
        self, records: Mapping[str, LocationRecord], deletions: frozenset[str] = frozenset()
    ) -> None:
        await self._direct.put_records(records, deletions)

    async def all_lines(self) -> dict[str, LocationRecord]:
        return await self._direct.all_lines()

    async def delete_unchanged(self, records: Mapping[str, LocationRecord]) -> frozenset[str]:
        return await self._direct.delete_unchanged(records)

    # -- state ----------------------------------------------------------------------------
    def state(self) -> SyncState:
        """Loaded, in sync, how many records and how old the last sync is."""
        if self._in_sync or self._synced_at is None:
            age = 0.0 if self._in_sync else math.inf
        else:
            age = max(0.0, self._clock() - self._synced_at)
        return SyncState(
            loaded=self._loaded,
            in_sync=self._in_sync,
            records=len(self._records),
            age=age,
            loads=self._loads,
            updates=self._updates,
        )

    # -- synchronisation ------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        """Load, then follow Redis until ``stop``; reconnect and reload after any failure."""
        delay = self._options.retry_delay
        while not stop.is_set():
            try:
                await self._session(stop)
                delay = self._options.retry_delay
            except (RedisError, OSError, StoreError, TimeoutError) as exc:
                if self._in_sync or not self._loaded:
                    log.error(
                        "location mirror lost Redis; serving the records it holds",
                        extra={"error": str(exc) or type(exc).__name__},
                    )
            except Exception:
                # A bug here must not end the mirror: the records it holds still serve
                # calls, and the next session starts from a full load.
                log.exception("location mirror failed; reloading")
            finally:
                if self._in_sync:
                    self._synced_at = self._clock()
                self._in_sync = False
            if stop.is_set():
                break
            try:
                async with asyncio.timeout(delay):
                    await stop.wait()
            except TimeoutError:
                pass
            delay = min(delay * 2, self._options.retry_delay_max)

    async def _session(self, stop: asyncio.Event) -> None:
        """One tracking connection's life: subscribe, load, then follow until it fails."""
        async with asyncio.timeout(self._options.socket_timeout):
            tracking = await self._connect_tracking()
        last_reply = [self._clock()]
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._read_invalidations(tracking, last_reply))
                group.create_task(self._keep_alive(tracking, last_reply))
                await self._full_load()
                self._in_sync = True
                group.create_task(self._refresh_pending())
                await stop.wait()
                raise _Stopped
        except BaseExceptionGroup as group_error:
            errors = [e for e in group_error.exceptions if not isinstance(e, _Stopped)]
            if not errors:
                return
            if len(errors) == 1 and isinstance(errors[0], Exception):
                raise errors[0] from None
            raise
        finally:
            await tracking.disconnect()

    async def _connect_tracking(self) -> AbstractConnection:
        connection = self._tracking_pool.make_connection()  # type: ignore[no-untyped-call]
        if not isinstance(connection, AbstractConnection):
            raise StoreError(
                f"the location mirror needs a connection to Redis (TCP, TLS or a Unix "
                f"socket), not a {type(connection).__name__}"
            )
        try:
            await connection.connect()  # type: ignore[no-untyped-call]
            if self._sentinel:
                # The sentinels may still name a master that has just been demoted:
                # invalidations are only sent for writes made on the master itself.
                await connection.send_command("ROLE")
                role = await connection.read_response()
                if not (isinstance(role, list) and role and role[0] == b"master"):
                    raise StoreError(
                        f"the instance the sentinels named is not the master: {role!r:.40}"
                    )
                # A session begins on every new master: the full load that follows is the
                # resync after a failover.
                if isinstance(connection, Connection):  # always: sentinels name TCP masters
                    log.info(
                        "location mirror following the redis master",
                        extra={"master": f"{connection.host}:{connection.port}"},
                    )
            await self._handshake(connection)
        except BaseException:
            await connection.disconnect()
            raise
        return connection

    async def _handshake(self, connection: AbstractConnection) -> None:
        """Tracking on, redirected to this connection, then the invalidation channel."""
        await connection.send_command("CLIENT", "ID")
        client_id = await connection.read_response()
        await connection.send_command(
            "CLIENT", "TRACKING", "on", "REDIRECT", client_id, "BCAST", "PREFIX", self._prefix
        )
        await connection.read_response()
        await connection.send_command("SUBSCRIBE", _INVALIDATE_CHANNEL)
        await connection.read_response()

    async def _read_invalidations(
        self, connection: AbstractConnection, last_reply: list[float]
    ) -> None:
        while True:
            message = await connection.read_response()
            last_reply[0] = self._clock()
            if not isinstance(message, list) or len(message) < 3:
                continue
            kind, channel, payload = message[0], message[1], message[2]
            if kind != b"message" or channel != _INVALIDATE_CHANNEL:
                continue  # a pong, or a subscription confirmation
            if payload is None:
                # FLUSHDB/FLUSHALL: every key may be gone.
                self._reload_wanted = True
            else:
                self._pending.update(payload)
            self._pending_event.set()

    async def _keep_alive(self, connection: AbstractConnection, last_reply: list[float]) -> None:
        while True:
            await asyncio.sleep(self._options.ping_interval)
            if self._clock() - last_reply[0] > self._options.dead_after:
                raise StoreError("the tracking connection stopped answering")
            await connection.send_command("PING")

    async def _refresh_pending(self) -> None:
        while True:
            await self._pending_event.wait()
            self._pending_event.clear()
            if self._reload_wanted:
                self._reload_wanted = False
                self._pending.clear()
                await self._full_load()
                continue
            while self._pending:
                batch = [self._pending.pop() for _ in range(min(len(self._pending), 1000))]
                await self._refresh(batch)

    async def _refresh(self, keys: list[bytes]) -> None:
        records = self._records
        self._updates += len(keys)
        for key, fields in zip(keys, await self._read(keys), strict=True):
            line = self._line(key)
            if line is None:
                continue
            if not fields:
                records.pop(line, None)
                continue
            try:
                records[line] = _packed(fields)
            except InvalidRecord as exc:
                records.pop(line, None)
                log.warning(
                    "invalid line record in Redis; the line is treated as unprovisioned",
                    extra={"key": key.decode(errors="replace"), "error": str(exc)},
                )

    async def _full_load(self) -> None:
        """Read every record under the prefix into a new dict, then swap it in."""
        started = self._clock()
        fresh: dict[int, str] = {}
        invalid = 0
        batch = self._options.batch
        cursor = 0
        next_report = started + 5.0
        while True:
            try:
                next_cursor, found = await self._reader.scan(
                    cursor=cursor, match=self._prefix + b"*", count=batch
                )
            except (RedisError, OSError) as exc:
                raise StoreError(f"redis scan failed: {exc}") from exc
            cursor = int(next_cursor)
            keys = [k if isinstance(k, bytes) else k.encode() for k in found]
            if keys:
                for key, fields in zip(keys, await self._read(keys), strict=True):
                    line = self._line(key)
                    if line is None or not fields:
                        continue
                    try:
                        fresh[line] = _packed(fields)
                    except InvalidRecord:
                        invalid += 1
            now = self._clock()
            if now >= next_report:
                log.info("loading location records", extra={"records": len(fresh)})
                next_report = now + 5.0
            if cursor == 0:
                break
        if not fresh and self._records and not await self._schema_present():
            if not self._holding_over:
                self._holding_over = True
                log.critical(
                    "Redis came back with no line records and no schema key: taken for a "
                    "lost database; serving the records held until it has records again",
                    extra={"records": len(self._records)},
                )
            raise StoreError("redis has no line records and no schema key (database lost?)")
        if self._holding_over:
            self._holding_over = False
            log.warning(
                "Redis has line records again; they replace the records held",
                extra={"records": len(fresh), "held": len(self._records)},
            )
        self._records = fresh
        self._loaded = True
        self._loads += 1
        self._synced_at = self._clock()
        log.info(
            "location records loaded into memory",
            extra={
                "records": len(fresh),
                "invalid": invalid,
                "seconds": round(self._clock() - started, 3),
            },
        )

    async def _schema_present(self) -> bool:
        try:
            return bool(await self._reader.exists(SCHEMA_KEY))
        except (RedisError, OSError) as exc:
            raise StoreError(f"redis read failed: {exc}") from exc

    async def _read(self, keys: list[bytes]) -> list[list[bytes]]:
        """HGETALL of every key, in one round trip and one reply (flat field/value lists;
        empty for a missing key or one that is not a hash).

        A pipeline of HGETALLs costs redis-py tens of microseconds of Python per reply; one
        script returning every hash is parsed by hiredis in C, which is what makes a million
        records load in seconds rather than minutes.
        """
        try:
            replies = await self._hgetall_many(keys=keys)
        except (RedisError, OSError) as exc:
            raise StoreError(f"redis read failed: {exc}") from exc
        return [flat if isinstance(flat, list) else [] for flat in replies]

    def _line(self, key: bytes) -> int | None:
        suffix = key[len(self._prefix) :]
        if len(suffix) != 10 or not suffix.isdigit():
            return None
        return int(suffix)
