"""The in-memory location mirror against a real redis-server: load, follow, survive outages."""

from __future__ import annotations

import asyncio
import math
import os
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import redis

from e911_sip.store.base import LocationRecord, StoreNotReady
from e911_sip.store.mirror import MirroredRedisStore, MirrorOptions
from e911_sip.store.redis import RedisStore
from tests.integration.harness import RedisServer

FAST = MirrorOptions(ping_interval=0.1, dead_after=0.5, retry_delay=0.1, retry_delay_max=0.2)


async def until(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.005)
    assert condition(), what


def record(mirror: MirroredRedisStore, line: str) -> LocationRecord | None:
    return mirror.lookup_now(line)


@pytest.fixture
async def running(redis_server: RedisServer) -> AsyncIterator[MirroredRedisStore]:
    mirror = MirroredRedisStore(
        url=redis_server.url, direct=RedisStore(url=redis_server.url), options=FAST
    )
    stop = asyncio.Event()
    task = asyncio.create_task(mirror.run(stop))
    try:
        yield mirror
    finally:
        stop.set()
        await task
        await mirror.close()


def provision(server: RedisServer, count: int) -> None:
    client = server.client()
    for n in range(count):
        client.hset(f"e911:line:32155{n:05d}", "provider_endpoint", f"5555555/ep{n}")


async def test_loads_everything_and_skips_what_is_not_a_record(
    redis_server: RedisServer,
) -> None:
    provision(redis_server, 2500)  # more than one SCAN batch
    raw = redis_server.client()
    raw.hset("e911:line:9195550100", mapping={"provider_endpoint": "1/2", "callback": "9195550111"})
    raw.set("e911:line:9195550101", "a string, not a hash")
    raw.hset("e911:line:9195550102", "provider_endpoint", "not an endpoint")
    raw.hset("e911:line:not-a-line", "provider_endpoint", "1/2")
    raw.hset("other:9195550103", "provider_endpoint", "1/2")
    binary = redis.Redis(host="127.0.0.1", port=redis_server.port)  # raw bytes in
    binary.hset("e911:line:9195550104", "provider_endpoint", b"\xff\xfe/\x80")
    binary.close()

    mirror = MirroredRedisStore(
        url=redis_server.url, direct=RedisStore(url=redis_server.url), options=FAST
    )
    with pytest.raises(StoreNotReady):
        mirror.lookup_now("3215500001")
    # Before the load, lookups go to Redis directly.
    assert await mirror.lookup("3215500001") == LocationRecord("5555555/ep1")
    stop = asyncio.Event()
    task = asyncio.create_task(mirror.run(stop))
    try:
        await until(lambda: mirror.state().loaded, "the first load")
        state = mirror.state()
        assert state.records == 2501 and state.in_sync and state.age == 0.0
        assert record(mirror, "3215502499") == LocationRecord("5555555/ep2499")
        assert record(mirror, "9195550100") == LocationRecord("1/2", "9195550111")
        for line in ("9195550101", "9195550102", "9195550103", "9195550104", "2125550100"):
            assert record(mirror, line) is None, line
        assert await mirror.lookup("3215500007") == LocationRecord("5555555/ep7")
    finally:
        stop.set()
        await task
        await mirror.close()


async def test_follows_every_writer(running: MirroredRedisStore, redis_server: RedisServer) -> None:
    mirror = running
    await until(lambda: mirror.state().loaded, "the first load")
    client = redis_server.client()  # an operator with redis-cli, as far as Redis can tell
    client.hset("e911:line:3215551234", "provider_endpoint", "5555555/new")
    await until(lambda: record(mirror, "3215551234") is not None, "a new record")
    client.hset("e911:line:3215551234", "callback", "3215550000")
    await until(
        lambda: record(mirror, "3215551234") == LocationRecord("5555555/new", "3215550000"),
        "a changed record",
    )
    client.set("e911:line:3215551234", "clobbered")  # WRONGTYPE from now on
    await until(lambda: record(mirror, "3215551234") is None, "a record that broke")
    client.hset("e911:line:3215551235", "provider_endpoint", "5555555/other")
    await until(lambda: record(mirror, "3215551235") is not None, "another record")
    client.delete("e911:line:3215551235")
    await until(lambda: record(mirror, "3215551235") is None, "a deleted record")
    client.hset("e911:line:3215551236", "provider_endpoint", "5555555/x")
    await until(lambda: record(mirror, "3215551236") is not None, "one more record")
    loads = mirror.state().loads
    client.flushall()
    # Every record gone and no schema key: taken for a lost database, the records held
    # stay in use and the mirror says it is out of sync.
    await until(lambda: not mirror.state().in_sync, "the flush taken for a loss")
    assert record(mirror, "3215551236") == LocationRecord("5555555/x")
    assert mirror.state().loads == loads
    # With the schema key back, an empty database is what Redis means: the mirror follows.
    client.set("e911:schema", "1.1")
    await until(lambda: mirror.state().records == 0, "a flush")
    await until(lambda: mirror.state().in_sync, "back in sync")
    assert mirror.state().loads == loads + 1


async def test_a_redis_that_comes_back_empty_is_taken_for_a_lost_database(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    mirror = MirroredRedisStore(
        url=redis_server.url, direct=RedisStore(url=redis_server.url), options=FAST
    )
    stop = asyncio.Event()
    task = asyncio.create_task(mirror.run(stop))
    try:
        provision(redis_server, 3)
        redis_server.client().set("e911:schema", "1.1")
        await until(lambda: mirror.state().records == 3, "the records")
        # Restarted without persistence: nothing under the prefix, no schema key.
        redis_server.stop()
        redis_server.start()
        await until(
            lambda: any("lost database" in r.getMessage() for r in caplog.records),
            "the loss reported",
        )
        assert [r.levelname for r in caplog.records if "lost database" in r.getMessage()] == [
            "CRITICAL"
        ]
        assert record(mirror, "3215500001") == LocationRecord("5555555/ep1")
        assert mirror.state().records == 3 and not mirror.state().in_sync
        age = mirror.state().age
        await until(lambda: mirror.state().age > age, "the sync age growing")
        # Provisioning writes the records again (a resync): Redis is followed again.
        redis_server.client().hset("e911:line:3215500001", "provider_endpoint", "5555555/back")
        await until(lambda: mirror.state().in_sync, "back in sync")
        assert mirror.state().records == 1
        assert record(mirror, "3215500001") == LocationRecord("5555555/back")
        assert record(mirror, "3215500002") is None
    finally:
        stop.set()
        await task
        await mirror.close()


async def test_serves_what_it_holds_while_redis_is_paused_then_catches_up(
    running: MirroredRedisStore, redis_server: RedisServer
) -> None:
    mirror = running
    provision(redis_server, 10)
    await until(lambda: mirror.state().records == 10, "the records")
    assert redis_server.pid is not None
    os.kill(redis_server.pid, signal.SIGSTOP)
    try:
        await until(lambda: not mirror.state().in_sync, "the outage noticed")
        assert record(mirror, "3215500003") == LocationRecord("5555555/ep3")
        age = mirror.state().age
        await until(lambda: mirror.state().age > age, "the sync age growing")
        assert not math.isinf(mirror.state().age)
    finally:
        os.kill(redis_server.pid, signal.SIGCONT)
    await until(lambda: mirror.state().in_sync, "back in sync")
    redis_server.client().hset("e911:line:3215500003", "provider_endpoint", "5555555/moved")
    await until(
        lambda: record(mirror, "3215500003") == LocationRecord("5555555/moved"), "a new change"
    )


async def test_a_restarted_redis_is_reloaded_whole(tmp_path: Path) -> None:
    server = RedisServer(tmp_path, appendonly=True)
    server.start()
    mirror = MirroredRedisStore(url=server.url, direct=RedisStore(url=server.url), options=FAST)
    stop = asyncio.Event()
    task = asyncio.create_task(mirror.run(stop))
    try:
        provision(server, 3)
        await until(lambda: mirror.state().records == 3, "the records")
        server.stop()
        await until(lambda: not mirror.state().in_sync, "the outage noticed")
        assert record(mirror, "3215500001") == LocationRecord("5555555/ep1")
        loads = mirror.state().loads
        server.start()
        client = server.client()
        client.delete("e911:line:32155000002")  # not a line key: ignored either way
        client.delete("e911:line:3215500002")
        await until(lambda: mirror.state().loads > loads, "a reload after the restart")
        await until(lambda: record(mirror, "3215500002") is None, "the deletion")
        assert record(mirror, "3215500001") == LocationRecord("5555555/ep1")
    finally:
        stop.set()
        await task
        await mirror.close()
        server.stop()


async def test_loads_and_follows_over_a_unix_socket(tmp_path: Path) -> None:
    # A Redis on the same host is often reached over its Unix socket; the mirror's tracking
    # connection is then a Unix one (it was refused once, as not TCP or TLS).
    server = RedisServer(tmp_path, unix_socket=True)
    server.start()
    try:
        provision(server, 3)
        url = server.unix_url
        mirror = MirroredRedisStore(url=url, direct=RedisStore(url=url), options=FAST)
        stop = asyncio.Event()
        task = asyncio.create_task(mirror.run(stop))
        try:
            await until(lambda: mirror.state().records == 3, "loaded over the Unix socket")
            server.client().hset("e911:line:3215599999", "provider_endpoint", "5555555/new")
            await until(lambda: record(mirror, "3215599999") is not None, "a change followed")
            assert record(mirror, "3215599999") == LocationRecord("5555555/new")
        finally:
            stop.set()
            await task
            await mirror.close()
    finally:
        server.stop()
