"""Provisioning's side of call records: consume, resolve the cascade level, keep, serve.

The edge hands each finished emergency call record on (a Redis stream, or in-process in the
embedded box; :mod:`e911_sip.callrecords.stream`). :class:`CallRecordKeeper` reads them,
adds the cascade level the line's location came from (account, site or customer: known here,
not at the edge) when the endpoint the call carried is still the line's, stores them
durably and only then acknowledges them. It prunes records older than the retention period
(default five years) once an hour.

Backends (one record per id; storing a record again replaces it, so a redelivery is
harmless):

- :class:`MemoryCallStore`: tests and throwaway runs;
- :class:`JsonlCallStore`: one JSON object a line, appended and fsynced, for the embedded
  mode; a query reads the file, pruning rewrites it through a temporary file;
- :class:`RedisCallStore`: a hash of id → JSON, a sorted set of ids (ordered by INVITE time,
  read by lex range) and one such set per caller. Durability is the server's (enable AOF).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, cast

from redis.exceptions import RedisError

from e911_sip.callrecords.book import CallRecord, RecordError, time_key
from e911_sip.callrecords.stream import RecordSource, TransferError, decode, encode
from e911_sip.metrics import Metrics
from e911_sip.provisioning import cascade
from e911_sip.provisioning.audit import append_durably
from e911_sip.provisioning.service import ProvisioningService, ServiceError
from e911_sip.store.redis import connect

log = logging.getLogger("e911_sip.provisioning.calls")

DEFAULT_KEY_PREFIX = "e911:calls:"
DEFAULT_RETENTION_DAYS = 1826.0
"""Five years (with a leap day)."""
MAX_PAGE = 1000
"""Most records one query returns."""


class CallStoreError(Exception):
    """The call record store could not be written or read."""


@dataclass(frozen=True, slots=True, kw_only=True)
class CallQuery:
    """Which records, in INVITE order."""

    since: float | None = None
    """Epoch seconds; INVITEs at or after it."""
    until: float | None = None
    """Epoch seconds; INVITEs before it."""
    caller: str | None = None
    """Only this calling line."""
    after: str | None = None
    """A cursor: the id of the last record of the previous page."""
    limit: int = 100

    def matches(self, record_id: str, caller: str | None) -> bool:
        if self.after is not None and record_id <= self.after:
            return False
        if self.since is not None and record_id < time_key(self.since):
            return False
        if self.until is not None and record_id >= time_key(self.until):
            return False
        return self.caller is None or caller == self.caller


class CallStore(Protocol):
    """Durable call records."""

    async def append(self, records: Sequence[CallRecord]) -> None:
        """Store ``records`` (a record already stored is replaced).

        Raises:
            CallStoreError: not (all) stored.
        """
        ...

    async def query(self, query: CallQuery) -> list[CallRecord]:
        """Up to ``query.limit`` records, oldest first.

        Raises:
            CallStoreError: the store could not be read.
        """
        ...

    async def prune(self, before: float) -> int:
        """Delete the records whose INVITE is before ``before``; how many.

        Raises:
            CallStoreError: not pruned.
        """
        ...

    async def close(self) -> None: ...


def _page(records: Sequence[CallRecord], query: CallQuery) -> list[CallRecord]:
    chosen = sorted((r for r in records if query.matches(r.id, r.caller)), key=lambda r: r.id)
    return chosen[: max(0, min(query.limit, MAX_PAGE))]


class MemoryCallStore:
    """Records in a dict. Implements CallStore."""

    def __init__(self) -> None:
        self.records: dict[str, CallRecord] = {}
        self.available = True
        """Tests set this False to play a store that is down."""

    def _check(self) -> None:
        if not self.available:
            raise CallStoreError("call record store marked unavailable")

    async def append(self, records: Sequence[CallRecord]) -> None:
        self._check()
        for record in records:
            self.records[record.id] = record

    async def query(self, query: CallQuery) -> list[CallRecord]:
        self._check()
        return _page(list(self.records.values()), query)

    async def prune(self, before: float) -> int:
        self._check()
        old = [k for k in self.records if k < time_key(before)]
        for key in old:
            del self.records[key]
        return len(old)

    async def close(self) -> None:
        return None


class JsonlCallStore:
    """Records as JSON lines in one file. Implements CallStore."""

    def __init__(self, path: Path | str) -> None:
        self._path = Path(path)
        self._lock = asyncio.Lock()

    @property
    def path(self) -> Path:
        return self._path

    def _append(self, text: str) -> None:
        append_durably(self._path, text)

    def _load(self) -> dict[str, CallRecord]:
        records: dict[str, CallRecord] = {}
        try:
            handle = self._path.open(encoding="utf-8")
        except FileNotFoundError:
            return records
        with handle:
            for number, text in enumerate(handle, start=1):
                if not text.strip():
                    continue
                try:
                    record = decode(text)
                except RecordError as exc:
                    raise CallStoreError(f"{self._path}:{number}: corrupt record: {exc}") from exc
                records[record.id] = record
        return records

    def _rewrite(self, records: Sequence[CallRecord]) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        fd, temp = tempfile.mkstemp(dir=self._path.parent, prefix=self._path.name + ".")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.writelines(encode(r) + "\n" for r in records)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temp, self._path)
        except BaseException:
            Path(temp).unlink(missing_ok=True)
            raise

    async def append(self, records: Sequence[CallRecord]) -> None:
        if not records:
            return
        text = "".join(encode(r) + "\n" for r in records)
        async with self._lock:
            try:
                await asyncio.to_thread(self._append, text)
            except OSError as exc:
                raise CallStoreError(f"{self._path}: cannot append: {exc}") from exc

    async def query(self, query: CallQuery) -> list[CallRecord]:
        async with self._lock:
            try:
                records = await asyncio.to_thread(self._load)
            except OSError as exc:
                raise CallStoreError(f"{self._path}: cannot read: {exc}") from exc
        return _page(list(records.values()), query)

    async def prune(self, before: float) -> int:
        cutoff = time_key(before)
        async with self._lock:
            try:
                records = await asyncio.to_thread(self._load)
                kept = sorted((r for r in records.values() if r.id >= cutoff), key=lambda r: r.id)
                if len(kept) == len(records):
                    return 0
                await asyncio.to_thread(self._rewrite, kept)
            except OSError as exc:
                raise CallStoreError(f"{self._path}: cannot prune: {exc}") from exc
        return len(records) - len(kept)

    async def close(self) -> None:
        return None


class RedisCallStore:
    """Records in Redis. Implements CallStore.

    Keys: ``{prefix}records`` (hash id → JSON), ``{prefix}index`` (sorted set of every id,
    all scored 0, read by lex range: ids sort by INVITE time) and ``{prefix}caller:{line}``
    (the same, per calling line).
    """

    def __init__(
        self, *, url: str, key_prefix: str = DEFAULT_KEY_PREFIX, socket_timeout: float = 5.0
    ) -> None:
        self._prefix = key_prefix
        self._client = connect(url, socket_timeout=socket_timeout, max_connections=4)

    @property
    def records_key(self) -> str:
        return f"{self._prefix}records"

    @property
    def index_key(self) -> str:
        return f"{self._prefix}index"

    def caller_key(self, caller: str) -> str:
        return f"{self._prefix}caller:{caller}"

    async def append(self, records: Sequence[CallRecord]) -> None:
        if not records:
            return
        try:
            async with self._client.pipeline(transaction=True) as pipe:
                for record in records:
                    pipe.hset(self.records_key, record.id, encode(record))
                    pipe.zadd(self.index_key, {record.id: 0})
                    if record.caller is not None:
                        pipe.zadd(self.caller_key(record.caller), {record.id: 0})
                await pipe.execute()
        except (RedisError, OSError) as exc:
            raise CallStoreError(f"redis call record append failed: {exc}") from exc

    async def query(self, query: CallQuery) -> list[CallRecord]:
        limit = max(0, min(query.limit, MAX_PAGE))
        if limit == 0:
            return []
        since = time_key(query.since) if query.since is not None else None
        if query.after is not None and (since is None or query.after >= since):
            low = "(" + query.after
        else:
            low = "[" + since if since is not None else "-"
        high = "(" + time_key(query.until) if query.until is not None else "+"
        key = self.caller_key(query.caller) if query.caller is not None else self.index_key
        try:
            # Replies are decoded text (connect's decode_responses).
            ids = cast(list[str], await self._client.zrangebylex(key, low, high, 0, limit))
            texts = cast(
                list[str | None], await self._client.hmget(self.records_key, ids) if ids else []
            )
        except (RedisError, OSError) as exc:
            raise CallStoreError(f"redis call record read failed: {exc}") from exc
        out: list[CallRecord] = []
        for record_id, text in zip(ids, texts, strict=True):
            if text is None:
                continue  # pruned between the two reads
            try:
                out.append(decode(text))
            except RecordError as exc:
                raise CallStoreError(f"{self.records_key} {record_id}: corrupt: {exc}") from exc
        return out

    async def prune(self, before: float) -> int:
        high = "(" + time_key(before)
        pruned = 0
        try:
            while True:
                ids = cast(
                    list[str], await self._client.zrangebylex(self.index_key, "-", high, 0, 500)
                )
                if not ids:
                    return pruned
                texts = cast(list[str | None], await self._client.hmget(self.records_key, ids))
                async with self._client.pipeline(transaction=True) as pipe:
                    for record_id, text in zip(ids, texts, strict=True):
                        caller = _caller_of(text)
                        if caller is not None:
                            pipe.zrem(self.caller_key(caller), record_id)
                    pipe.hdel(self.records_key, *ids)
                    pipe.zrem(self.index_key, *ids)
                    await pipe.execute()
                pruned += len(ids)
        except (RedisError, OSError) as exc:
            raise CallStoreError(f"redis call record prune failed: {exc}") from exc

    async def close(self) -> None:
        try:
            await self._client.aclose()
        except (RedisError, OSError):
            pass


def _caller_of(text: str | None) -> str | None:
    if text is None:
        return None
    try:
        caller = json.loads(text).get("caller")
    except (ValueError, AttributeError):
        return None
    return caller if isinstance(caller, str) else None


def build_call_store(url: str, *, key_prefix: str = DEFAULT_KEY_PREFIX) -> CallStore:
    """The backend ``url`` names: ``memory://``, ``file:///path.jsonl`` or ``redis://...``."""
    if url.startswith("file://"):
        return JsonlCallStore(Path(url[len("file://") :]))
    if url.startswith("memory://"):
        return MemoryCallStore()
    return RedisCallStore(url=url, key_prefix=key_prefix)


def level_resolver(service: ProvisioningService) -> Callable[[CallRecord], Awaitable[str | None]]:
    """The cascade level (account, site, customer) of a record's endpoint, from provisioning
    state: the level the caller's location comes from now, when its endpoint is the one the
    call carried (a line changed since has no level that can be vouched for)."""

    async def resolve(record: CallRecord) -> str | None:
        if record.caller is None or record.provider_endpoint is None:
            return None
        try:
            state, account = await service.get_account(record.caller)
        except ServiceError:
            return None
        effective = cascade.effective(state, account)
        if effective.provider_endpoint != record.provider_endpoint or effective.level is None:
            return None
        return effective.level.value

    return resolve


@dataclass(frozen=True, slots=True, kw_only=True)
class KeeperOptions:
    """How provisioning keeps call records."""

    retention: float = DEFAULT_RETENTION_DAYS * 86_400.0
    """Seconds a record is kept after its INVITE."""
    prune_interval: float = 3600.0
    """Seconds between prunes."""
    batch_size: int = 100
    """Records read and stored at a time."""
    retry_max: float = 30.0
    """Longest pause between attempts while the store or the source fails."""
    stop_timeout: float = 5.0
    """Seconds a stopping keeper goes on storing what is still waiting."""
    backlog_interval: float = 10.0
    """Seconds between readings of the source's backlog."""
    read_block: float = 1.0
    """Seconds one read waits for records (and so the longest a stop waits for it)."""


class CallRecordKeeper:
    """Moves records from the source to the store, acknowledging only what is stored."""

    def __init__(
        self,
        *,
        source: RecordSource,
        store: CallStore,
        metrics: Metrics,
        options: KeeperOptions | None = None,
        resolve_level: Callable[[CallRecord], Awaitable[str | None]] | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._source = source
        self._store = store
        self._options = options or KeeperOptions()
        self._resolve = resolve_level
        self._wall = wall_clock
        self._results = metrics.call_records_stored
        self._backlog = metrics.call_records_backlog
        self.stored = 0

    async def run(self, stop: asyncio.Event) -> None:
        """Keep records until ``stop``."""
        options = self._options
        next_prune = next_backlog = self._wall()
        pause = 0.0
        while not stop.is_set():
            if self._wall() >= next_prune:
                next_prune = self._wall() + options.prune_interval
                await self._prune()
            if self._wall() >= next_backlog:
                next_backlog = self._wall() + options.backlog_interval
                await self._measure_backlog()
            try:
                ok = await self._step(block=options.read_block) is not False
            except Exception:
                log.exception("call record keeping failed; retrying")
                ok = False
            pause = 0.0 if ok else min(max(pause * 2, 0.5), options.retry_max)
            if pause:
                try:
                    async with asyncio.timeout(pause):
                        await stop.wait()
                except TimeoutError:
                    pass
        # What the edges wrote as they stopped (the embedded box stops its edge first).
        try:
            async with asyncio.timeout(options.stop_timeout):
                while await self._step(block=0.0):
                    pass
        except TimeoutError:
            pass
        except Exception:
            log.exception("call records left unstored at stop (the stream keeps them)")

    async def _step(self, *, block: float) -> bool | None:
        """Read, store and acknowledge one batch: True when stored, None when nothing came,
        False when the source or the store failed."""
        try:
            delivery = await self._source.read(count=self._options.batch_size, block=block)
        except TransferError as exc:
            log.warning("call records could not be read", extra={"error": str(exc)})
            return False
        if delivery is None:
            return None
        if delivery.invalid:
            self._results.labels("invalid").inc(delivery.invalid)
            log.error(
                "skipped entries that are not call records", extra={"count": delivery.invalid}
            )
        records = delivery.records
        if self._resolve is not None:
            for record in records:
                if record.level is None and record.provider_endpoint is not None:
                    try:
                        record.level = await self._resolve(record)
                    except Exception:
                        log.exception(
                            "cascade level not resolved", extra={"call_id": record.call_id}
                        )
        try:
            await self._store.append(records)
        except CallStoreError as exc:
            delivery.release()
            self._results.labels("store_error").inc()
            log.error("call records not stored; retrying", extra={"error": str(exc)})
            return False
        self._results.labels("stored").inc(len(records))
        self.stored += len(records)
        try:
            await delivery.ack()
        except TransferError as exc:
            # Stored already: a redelivery only stores them again.
            log.warning("stored call records not acknowledged", extra={"error": str(exc)})
        return True

    async def _measure_backlog(self) -> None:
        try:
            self._backlog.set(await self._source.backlog())
        except TransferError:
            pass  # the read that follows reports the source's trouble

    async def _prune(self) -> None:
        try:
            pruned = await self._store.prune(self._wall() - self._options.retention)
        except CallStoreError as exc:
            log.error("call records past retention not pruned", extra={"error": str(exc)})
            return
        except Exception:
            # Never ends the keeper (its TaskGroup would stop the process); tried next hour.
            log.exception("pruning call records failed")
            return
        if pruned:
            self._results.labels("pruned").inc(pruned)
            log.info("pruned call records past retention", extra={"count": pruned})
