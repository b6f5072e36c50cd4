"""The in-memory store, the record schema and the resilient lookup in front of any store."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from e911_sip.store.base import InvalidRecord, LocationRecord, StoreError
from e911_sip.store.memory import MemoryStore
from e911_sip.store.resilient import LookupOptions, LookupSource, ResilientLookup

RECORD = LocationRecord("5555555/e911abc123def", None, "2026-11-01T12:00:00Z")


def test_record_schema() -> None:
    assert LocationRecord.from_fields({"provider_endpoint": "555/abc"}).callback is None
    fields = {"provider_endpoint": "555/abc", "callback": "3215550100", "updated_at": "t"}
    assert LocationRecord.from_fields(fields).to_fields() == fields
    for bad in (
        {},
        {"provider_endpoint": "no-slash"},
        {"provider_endpoint": "5/a", "callback": "1"},
    ):
        with pytest.raises(InvalidRecord):
            LocationRecord.from_fields(bad)


def test_seed_file(tmp_path: Path) -> None:
    path = tmp_path / "seed.json"
    path.write_text(json.dumps({"_comment": "x", "3215551234": {"provider_endpoint": "5/a"}}))
    store = MemoryStore.from_file(path)
    assert asyncio.run(store.lookup("3215551234")) == LocationRecord("5/a")
    path.write_text(json.dumps({"123": {"provider_endpoint": "5/a"}}))
    with pytest.raises(ValueError, match="'123'"):
        MemoryStore.from_file(path)


def test_example_seed_file_is_valid() -> None:
    example = Path(__file__).resolve().parents[3] / "config" / "locations.example.json"
    store = MemoryStore.from_file(example)
    assert asyncio.run(store.lookup("3215551234")) is not None


class SlowStore(MemoryStore):
    def __init__(self) -> None:
        super().__init__({"3215551234": RECORD})
        self.release = asyncio.Event()
        self.calls = 0

    async def lookup(self, line: str) -> LocationRecord | None:
        self.calls += 1
        await self.release.wait()
        return await super().lookup(line)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_lookup_from_the_store_fills_the_cache() -> None:
    store = MemoryStore({"3215551234": RECORD})
    clock = Clock()
    lookup = ResilientLookup(store, options=LookupOptions(), clock=clock)
    assert (await lookup.lookup("3215551234")).source is LookupSource.STORE
    store.available = False
    result = await lookup.lookup("3215551234")
    assert (result.source, result.record) == (LookupSource.CACHE, RECORD)
    assert result.error == "memory store marked unavailable"
    assert (await lookup.lookup("9195550000")).source is LookupSource.NONE


async def test_cache_entries_expire() -> None:
    store = MemoryStore({"3215551234": RECORD})
    clock = Clock()
    lookup = ResilientLookup(store, options=LookupOptions(cache_max_age=60), clock=clock)
    await lookup.lookup("3215551234")
    store.available = False
    clock.now += 61
    assert (await lookup.lookup("3215551234")).source is LookupSource.NONE


async def test_slow_store_is_cut_off_by_the_timeout_and_tried_again_for_the_next_call() -> None:
    store = SlowStore()
    clock = Clock()
    lookup = ResilientLookup(store, options=LookupOptions(timeout=0.01), clock=clock)
    result = await lookup.lookup("3215551234")
    assert result.source is LookupSource.NONE
    assert result.failure == "timeout" and "ms" in (result.error or "")
    assert not lookup.degraded  # one slow lookup is that call's problem only
    store.release.set()
    assert (await lookup.lookup("3215551234")).source is LookupSource.STORE
    assert store.calls == 2


async def test_removed_record_leaves_the_cache() -> None:
    store = MemoryStore({"3215551234": RECORD})
    lookup = ResilientLookup(store, options=LookupOptions(), clock=Clock())
    await lookup.lookup("3215551234")
    await store.put_records({}, frozenset({"3215551234"}))
    assert (await lookup.lookup("3215551234")).record is None
    store.available = False
    assert (await lookup.lookup("3215551234")).source is LookupSource.NONE


async def test_invalid_record_is_reported_not_raised() -> None:
    class Broken(MemoryStore):
        async def lookup(self, line: str) -> LocationRecord | None:
            raise InvalidRecord("provider_endpoint '' is not account/endpoint")

    result = await ResilientLookup(Broken(), options=LookupOptions()).lookup("3215551234")
    assert result.source is LookupSource.INVALID


async def test_cache_is_bounded() -> None:
    store = MemoryStore({f"321555{i:04d}": RECORD for i in range(10)})
    lookup = ResilientLookup(store, options=LookupOptions(cache_size=3), clock=Clock())
    for i in range(10):
        await lookup.lookup(f"321555{i:04d}")
    store.available = False
    sources = [(await lookup.lookup(f"321555{i:04d}")).source for i in range(10)]
    assert sources.count(LookupSource.CACHE) == 3


async def test_memory_store_writes() -> None:
    store = MemoryStore()
    await store.put_records({"3215551234": RECORD})
    assert await store.all_lines() == {"3215551234": RECORD}
    store.available = False
    with pytest.raises(StoreError):
        await store.put_records({"3215551234": RECORD})
