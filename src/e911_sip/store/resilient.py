"""A location lookup that always answers in bounded time.

The emergency path may not wait on a store that is slow or down. Each lookup is bounded by a
timeout; a failed or timed-out lookup falls back to a cache of records seen recently, and
then to "no location" (the call still goes out). After a failure the store is left alone for
a short cool-down, so a dead Redis costs one timeout, not one per call.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from e911_sip.store.base import (
    ImmediateLocationStore,
    InvalidRecord,
    LocationRecord,
    LocationStore,
    StoreError,
    StoreNotReady,
)


class LookupSource(StrEnum):
    """Where an answer came from."""

    STORE = "store"
    """The store answered (with a record or with none)."""
    CACHE = "cache"
    """The store failed; a cached record was used."""
    NONE = "none"
    """The store failed and nothing was cached: no location."""
    INVALID = "invalid"
    """The store held a record that breaks the schema: treated as no location."""


@dataclass(frozen=True, slots=True)
class LookupResult:
    """The record to use (None for none) and how it was found."""

    record: LocationRecord | None
    source: LookupSource
    error: str | None = None
    """Why the store was not used, when it was not."""
    seconds: float = 0.0
    """Time spent waiting on the store."""


@dataclass(frozen=True, slots=True, kw_only=True)
class LookupOptions:
    """Bounds on the emergency lookup."""

    timeout: float = 0.05
    """Seconds one store lookup may take before the fallback is used."""
    cache_size: int = 100_000
    """Lines whose last record is kept for use while the store is unavailable."""
    cache_max_age: float = 86_400.0
    """Seconds a cached record stays usable."""
    cooldown: float = 1.0
    """Seconds the store is skipped after a failure."""


class ResilientLookup:
    """Wraps a LocationStore with a timeout, a recent-records cache and a cool-down."""

    def __init__(
        self,
        store: LocationStore,
        *,
        options: LookupOptions,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._immediate = store.lookup_now if isinstance(store, ImmediateLocationStore) else None
        self._options = options
        self._clock = clock
        self._cache: OrderedDict[str, tuple[float, LocationRecord]] = OrderedDict()
        self._skip_until = 0.0
        self.last_error: str | None = None

    @property
    def degraded(self) -> bool:
        """True while the store is in its cool-down after a failure."""
        return self._clock() < self._skip_until

    async def lookup(self, line: str) -> LookupResult:
        """The record for ``line``. Never raises and never waits longer than the timeout."""
        start = self._clock()
        if start < self._skip_until:
            return self._fallback(line, self.last_error or "store unavailable", 0.0)
        try:
            async with asyncio.timeout(self._options.timeout):
                record = await self._store.lookup(line)
        except (StoreError, TimeoutError) as exc:
            return self._failed(line, exc, start)
        return self._found(line, record, start)

    def lookup_now(self, line: str) -> LookupResult | None:
        """The answer at once when the store can give it without waiting, else None.

        An in-memory store answers here; a Redis store needs :meth:`lookup`.
        """
        immediate = self._immediate
        if immediate is None:
            return None
        start = self._clock()
        if start < self._skip_until:
            return self._fallback(line, self.last_error or "store unavailable", 0.0)
        try:
            record = immediate(line)
        except StoreNotReady:
            return None
        except StoreError as exc:
            return self._failed(line, exc, start)
        return self._found(line, record, start)

    def _found(self, line: str, record: LocationRecord | None, start: float) -> LookupResult:
        now = self._clock()
        if record is None:
            self._cache.pop(line, None)
        else:
            self._remember(line, record, now)
        return LookupResult(record, LookupSource.STORE, None, now - start)

    def _failed(self, line: str, exc: Exception, start: float) -> LookupResult:
        now = self._clock()
        if isinstance(exc, InvalidRecord):
            self._cache.pop(line, None)
            return LookupResult(None, LookupSource.INVALID, str(exc), now - start)
        reason = str(exc) or f"lookup exceeded {self._options.timeout * 1000:.0f} ms"
        self.last_error = reason
        self._skip_until = now + self._options.cooldown
        return self._fallback(line, reason, now - start)

    def _remember(self, line: str, record: LocationRecord, now: float) -> None:
        cache = self._cache
        cache[line] = (now, record)
        cache.move_to_end(line)
        while len(cache) > self._options.cache_size:
            cache.popitem(last=False)

    def _fallback(self, line: str, reason: str, seconds: float) -> LookupResult:
        entry = self._cache.get(line)
        if entry is not None and self._clock() - entry[0] <= self._options.cache_max_age:
            return LookupResult(entry[1], LookupSource.CACHE, reason, seconds)
        return LookupResult(None, LookupSource.NONE, reason, seconds)

    def reset_cooldown(self) -> None:
        """Try the store again on the next lookup (after a successful health check)."""
        self._skip_until = 0.0
