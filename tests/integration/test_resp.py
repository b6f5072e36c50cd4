"""The pipelined RESP connections (store/resp.py) against a real redis-server."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis

from e911_sip.batching import XADD_ALL, WriteError
from e911_sip.store.base import StoreTimeout, StoreUnreachable
from e911_sip.store.resp import ReplyError, RespPool, RespStreamWriter, run_script
from tests.integration.harness import LOOPBACK, RedisServer


@contextlib.asynccontextmanager
async def opened_writer(url: str) -> AsyncIterator[RespStreamWriter]:
    """A stream writer on a connection of its own to ``url``, closed on the way out."""
    writer = RespStreamWriter.open(url, timeout=5.0)
    try:
        yield writer
    finally:
        await writer.close()


async def test_commands_take_text_bytes_and_numbers_and_return_hiredis_replies(
    redis_server: RedisServer,
) -> None:
    pool = RespPool(redis_server.url, socket_timeout=5.0)
    try:
        assert await pool.execute("SET", "k", b"\xff\x00v", timeout=5.0) == b"OK"
        assert await pool.execute("GET", b"k", timeout=5.0) == b"\xff\x00v"
        assert await pool.execute("INCRBY", "n", 41, timeout=5.0) == 41
        assert await pool.execute("GET", "missing") is None
        assert await pool.execute("HSET", "h", "a", "é", timeout=5.0) == 1
        assert await pool.execute("HGETALL", "h", timeout=5.0) == [b"a", "é".encode()]
    finally:
        await pool.close()


async def test_many_concurrent_commands_share_one_connection_in_order(
    redis_server: RedisServer,
) -> None:
    pool = RespPool(redis_server.url, size=1, socket_timeout=5.0)
    try:
        replies = await asyncio.gather(
            *(pool.execute("INCR", "counter", timeout=5.0) for _ in range(2000))
        )
        assert replies == list(range(1, 2001))
        clients = await pool.execute("CLIENT", "LIST", "TYPE", "normal", timeout=5.0)
        # This pool's one connection, and the harness's own client at most.
        assert clients.count(b"\n") <= 2
    finally:
        await pool.close()


async def test_an_error_reply_is_its_own_exception_and_leaves_the_connection(
    redis_server: RedisServer,
) -> None:
    pool = RespPool(redis_server.url, socket_timeout=5.0)
    try:
        await pool.execute("SET", "text", "x", timeout=5.0)
        with pytest.raises(ReplyError) as caught:
            await pool.execute("HGETALL", "text", timeout=5.0)
        assert caught.value.code == "WRONGTYPE"
        assert not isinstance(caught.value, StoreUnreachable)
        with pytest.raises(ReplyError, match="unknown command"):
            await pool.execute("NO-SUCH-COMMAND", timeout=5.0)
        assert await pool.execute("PING", timeout=5.0) == b"PONG"
    finally:
        await pool.close()


async def test_a_script_is_loaded_again_after_script_flush(redis_server: RedisServer) -> None:
    pool = RespPool(redis_server.url, socket_timeout=5.0)
    writer = RespStreamWriter(pool, timeout=5.0)
    try:
        await writer.xadd_all("s", "item", ["a", "b"])
        assert await pool.execute("SCRIPT", "FLUSH", timeout=5.0) == b"OK"
        assert await run_script(pool, XADD_ALL, ("s",), (0, "item", "c", "d"), timeout=5.0) == 2
        assert await pool.execute("SCRIPT", "FLUSH", timeout=5.0) == b"OK"
        await writer.xadd_all("s", "item", ["e", "f", "g"])
        entries = await pool.execute("XRANGE", "s", "-", "+", timeout=5.0)
        assert [fields for _id, fields in entries] == [[b"item", bytes([v])] for v in b"abcdefg"]
    finally:
        await writer.close()


async def test_the_writer_writes_one_entry_as_xadd_and_trims_approximately(
    redis_server: RedisServer,
) -> None:
    client = redis_server.client()
    async with opened_writer(redis_server.url) as writer:
        await writer.xadd_all("one", "record", ["only"], maxlen=5)
        assert [f for _i, f in client.xrange("one")] == [{"record": "only"}]
        for start in range(0, 1000, 100):
            await writer.xadd_all(
                "trimmed", "record", [str(i) for i in range(start, start + 100)], maxlen=10
            )
        # MAXLEN ~: whole macro nodes are dropped, so a little more than 10 may stay.
        assert 10 <= client.xlen("trimmed") < 1000
        assert client.xrevrange("trimmed", count=1)[0][1] == {"record": "999"}
        assert await _nothing_written(writer) is None


async def _nothing_written(writer: RespStreamWriter) -> None:
    await writer.xadd_all("never", "record", [])


async def test_a_lost_connection_fails_its_commands_and_the_next_one_reconnects(
    redis_server: RedisServer,
) -> None:
    pool = RespPool(redis_server.url, socket_timeout=5.0)
    try:
        assert await pool.execute("PING", timeout=5.0) == b"PONG"
        blocked = asyncio.ensure_future(pool.execute("BLPOP", "nothing", 30, timeout=10.0))
        await asyncio.sleep(0.2)  # the BLPOP is on the wire
        client = redis_server.client()
        assert client.client_kill_filter(_type="normal", skipme=True) >= 1
        with pytest.raises(StoreUnreachable, match="connection lost"):
            await blocked
        assert await pool.execute("PING", timeout=5.0) == b"PONG"

        redis_server.kill()
        with pytest.raises(StoreUnreachable):
            await pool.execute("PING", timeout=5.0)
        redis_server.start()
        assert await pool.execute("PING", timeout=5.0) == b"PONG"
    finally:
        await pool.close()


async def test_a_command_unanswered_in_its_bound_times_out(redis_server: RedisServer) -> None:
    pool = RespPool(redis_server.url, size=2, socket_timeout=5.0)
    try:
        with pytest.raises(StoreTimeout):
            await pool.execute("BLPOP", "nothing", 5, timeout=0.2)
        assert await pool.execute("PING", timeout=5.0) == b"PONG"
    finally:
        await pool.close()


async def test_auth_with_and_without_a_user_and_select(redis_server: RedisServer) -> None:
    admin = redis_server.client()
    admin.execute_command("ACL", "SETUSER", "writer", "on", ">w-pass", "~*", "+@all")
    admin.config_set("requirepass", "s3cret")
    port = redis_server.port
    with_user = RespPool(f"redis://writer:w-pass@{LOOPBACK}:{port}/3", socket_timeout=5.0)
    password_only = RespPool(f"redis://:s3cret@{LOOPBACK}:{port}/2", socket_timeout=5.0)
    wrong = RespPool(f"redis://:wrong@{LOOPBACK}:{port}/0", socket_timeout=5.0)
    none = RespPool(f"redis://{LOOPBACK}:{port}/0", socket_timeout=5.0)
    try:
        await with_user.execute("SET", "where", "three", timeout=5.0)
        await password_only.execute("SET", "where", "two", timeout=5.0)
        for db, value in ((3, "three"), (2, "two")):
            with redis.Redis(host=LOOPBACK, port=port, db=db, password="s3cret") as client:
                assert client.get("where") == value.encode()
        with pytest.raises(StoreUnreachable, match="refused the connection setup"):
            await wrong.execute("PING", timeout=5.0)
        with pytest.raises(ReplyError, match="NOAUTH"):
            await none.execute("PING", timeout=5.0)
    finally:
        admin.config_set("requirepass", "")
        for pool in (with_user, password_only, wrong, none):
            await pool.close()


async def test_a_unix_socket_url(tmp_path: Path) -> None:
    with RedisServer(tmp_path, unix_socket=True) as server:
        async with opened_writer(server.unix_url) as writer:
            await writer.xadd_all("u", "item", ["x", "y"])
            assert server.client().xlen("u") == 2


async def test_a_closed_pool_or_an_unreachable_server_fails_the_write(
    redis_server: RedisServer,
) -> None:
    writer = RespStreamWriter.open(redis_server.url, timeout=5.0)
    await writer.close()
    with pytest.raises(WriteError, match="closed"):
        await writer.xadd_all("s", "item", ["x"])
    redis_server.stop()
    async with opened_writer(redis_server.url) as writer:
        with pytest.raises(WriteError, match="connect failed"):
            await writer.xadd_all("s", "item", ["x", "y"])
