"""The RESP writer's commands and error mapping, and the writers built on it, with a pool
double (the wire itself is in tests/integration/test_resp.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest

from e911_sip.batching import XADD_ALL, StreamWriter, WriteError
from e911_sip.callrecords.book import CallRecord
from e911_sip.callrecords.stream import RedisStreamSink, TransferError
from e911_sip.notify.queue import QueueError, RedisStreamQueue
from e911_sip.store.base import StoreError, StoreTimeout, StoreUnreachable
from e911_sip.store.resp import Connection, ReplyError, RespPool, RespStreamWriter, pack
from tests.unit.store.transport_double import made_ready


class _Pool:
    """Answers as told, and keeps the commands it was given with their bounds."""

    def __init__(self, *answers: object) -> None:
        self.answers = list(answers)
        self.commands: list[tuple[tuple[Any, ...], float | None]] = []
        self.closed = False

    async def execute(self, *args: Any, timeout: float | None = None) -> Any:
        self.commands.append((args, timeout))
        answer = self.answers.pop(0) if self.answers else 1
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def close(self) -> None:
        self.closed = True


def _writer(*answers: object) -> tuple[RespStreamWriter, _Pool]:
    pool = _Pool(*answers)
    return RespStreamWriter(pool, timeout=5.0), pool  # type: ignore[arg-type]


def test_arguments_are_text_bytes_or_numbers() -> None:
    assert pack("XADD", b"s\xff", 12, "é") == (
        b"*4\r\n$4\r\nXADD\r\n$2\r\ns\xff\r\n$2\r\n12\r\n$2\r\n\xc3\xa9\r\n"
    )


def test_a_reply_error_names_its_code_and_is_a_store_error() -> None:
    error = ReplyError("NOSCRIPT No matching script. Please use EVAL.")
    assert error.code == "NOSCRIPT" and isinstance(error, StoreError)
    assert ReplyError("ERR").code == "ERR"


async def test_one_entry_is_a_plain_xadd_trimmed_when_asked() -> None:
    writer, pool = _writer()
    await writer.xadd_all("s", "record", ["a"], maxlen=100)
    await writer.xadd_all("s", "item", ["b"])
    await writer.xadd_all("s", "item", [])
    assert pool.commands == [
        (("XADD", "s", "MAXLEN", "~", 100, "*", "record", "a"), 5.0),
        (("XADD", "s", "*", "item", "b"), 5.0),
    ]


async def test_a_batch_is_one_evalsha_loaded_again_when_redis_forgot_the_script() -> None:
    writer, pool = _writer(ReplyError("NOSCRIPT No matching script"), XADD_ALL.sha.encode(), 2)
    await writer.xadd_all("s", "item", ["a", "b"], maxlen=7)
    evalsha = ("EVALSHA", XADD_ALL.sha, 1, "s", 7, "item", "a", "b")
    assert [args for args, _ in pool.commands] == [
        evalsha,
        ("SCRIPT", "LOAD", XADD_ALL.source),
        evalsha,
    ]
    # One bound for the three: what is left of the write's 5 s.
    assert pool.commands[0][1] == 5.0
    assert all(t is not None and 0 < t <= 5.0 for _, t in pool.commands)


@pytest.mark.parametrize(
    "failure",
    [
        ReplyError("ERR Error running script"),
        StoreUnreachable("redis connection lost: reset"),
        StoreTimeout("redis did not answer in time"),
        StoreError("redis connection pool closed"),
    ],
)
async def test_every_failure_is_a_write_error(failure: StoreError) -> None:
    writer, pool = _writer(failure)
    with pytest.raises(WriteError, match=str(failure)):
        await writer.xadd_all("s", "item", ["a", "b"])
    assert len(pool.commands) == 1  # only NOSCRIPT is tried again
    await writer.close()
    assert pool.closed


class _FailingWriter:
    def __init__(self) -> None:
        self.batches: list[tuple[str, str, list[str], int]] = []
        self.fail = True
        self.closed = False

    async def xadd_all(
        self, stream: str, field: str, values: Sequence[str], *, maxlen: int = 0
    ) -> None:
        self.batches.append((stream, field, list(values), maxlen))
        if self.fail:
            raise WriteError("redis connection lost: reset")

    async def close(self) -> None:
        self.closed = True


def _record() -> CallRecord:
    return CallRecord(call_id="c1@x", number="911", caller="3215550100", invite_at=1_796_000_000.0)


async def test_the_sink_writes_through_its_writer_and_maps_its_failures() -> None:
    sink = RedisStreamSink(url="redis://127.0.0.1:1/0", stream="e911:calls", maxlen=9, timeout=1)
    writer = _FailingWriter()
    sink._writer = writer
    with pytest.raises(TransferError, match="XADD to e911:calls failed: redis connection lost"):
        await sink.write([_record()])
    writer.fail = False
    await sink.write([_record(), _record()])
    assert [(s, f, len(v), m) for s, f, v, m in writer.batches] == [
        ("e911:calls", "record", 1, 9),
        ("e911:calls", "record", 2, 9),
    ]
    await sink.close()
    assert writer.closed


async def test_the_queue_puts_through_its_writer_and_maps_its_failures() -> None:
    writer = _FailingWriter()
    client: Any = _Client()
    typed: StreamWriter = writer
    queue = RedisStreamQueue(client, stream="q", dead_list="q:dead", writer=typed)
    with pytest.raises(QueueError, match="redis connection lost"):
        await queue.put({"a": 1})
    writer.fail = False
    await queue.put_many([{"a": 1}, {"b": 2}])
    assert writer.batches[-1] == ("q", "item", ['{"a": 1}', '{"b": 2}'], 0)
    await queue.close()
    assert writer.closed and client.closed


class _Client:
    closed = False

    async def aclose(self) -> None:
        self.closed = True


def test_a_pool_needs_a_connection() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        RespPool("redis://127.0.0.1:1/0", size=0)


@pytest.mark.parametrize("sentinel", [True, False])
async def test_a_readonly_reply_behind_sentinel_retires_the_connection(sentinel: bool) -> None:
    url = "redis+sentinel://127.0.0.1:1/e911" if sentinel else "redis://127.0.0.1:1/0"
    pool = RespPool(url, size=1)
    connection = Connection(pool, silence=60.0)
    transport = made_ready(connection, ("10.0.0.1", 6379) if sentinel else None)
    pool._slots = [connection]
    write = asyncio.ensure_future(pool.execute("XADD", "s", "*", "f", "v", timeout=5.0))
    await asyncio.sleep(0)
    assert transport.written == [pack("XADD", "s", "*", "f", "v")]
    connection.data_received(b"-READONLY You can't write against a read only replica.\r\n")
    with pytest.raises(ReplyError, match="READONLY"):
        await write
    # Behind Sentinel the next command opens a connection to the master the sentinels name;
    # without, there is no other master to go to.
    assert transport.aborted is sentinel
    assert pool._slots == ([None] if sentinel else [connection])
    await pool.close()
