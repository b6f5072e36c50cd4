"""A batch of call records, or of notification events, goes to its Redis stream in one script:
the entries keep the shape they had as one ``XADD`` each (one field, the JSON), the record
stream stays trimmed to about its ``MAXLEN``, and a server that forgot the script (a restart,
a failover, ``SCRIPT FLUSH``) is given it again."""

from __future__ import annotations

import json

import redis.asyncio as aioredis

from e911_sip.batching import ClientStreamWriter
from e911_sip.callrecords.book import CallRecord, TrunkAttempt
from e911_sip.callrecords.stream import RedisStreamSink, RedisStreamSource, encode
from e911_sip.notify.queue import RedisStreamQueue
from tests.integration.harness import RedisServer

T0 = 1_796_000_000.0


def record(n: int) -> CallRecord:
    return CallRecord(
        call_id=f"call-{n}@softswitch",
        number="911",
        invite_at=T0 + n,
        caller="3215550100",
        callback="3215550100",
        provider_endpoint="5555555/e911abc123def456",
        outcome="enriched",
        trunks=[TrunkAttempt("trunk-a", 1, True, "200")],
        status=200,
        answered_at=T0 + n + 0.1,
        bye_at=T0 + n + 0.2,
        end="bye",
    )


async def test_records_keep_their_entry_shape_and_survive_a_forgotten_script(
    redis_server: RedisServer,
) -> None:
    sink = RedisStreamSink(url=redis_server.url, stream="r:calls", maxlen=1000, timeout=5.0)
    await sink.write([record(n) for n in range(3)])
    redis_server.client().script_flush()
    await sink.write([record(n) for n in range(3, 5)])
    await sink.write([record(5)])
    entries = redis_server.client().xrange("r:calls")
    assert [fields for _, fields in entries] == [{"record": encode(record(n))} for n in range(6)]

    source = RedisStreamSource(url=redis_server.url, stream="r:calls", consumer="p1")
    delivery = await source.read(count=10, block=0.5)
    assert delivery is not None and delivery.invalid == 0
    assert [r.to_dict() for r in delivery.records] == [record(n).to_dict() for n in range(6)]
    await delivery.ack()
    await source.close()
    await sink.close()


async def test_the_record_stream_is_trimmed_to_about_its_maxlen(
    redis_server: RedisServer,
) -> None:
    sink = RedisStreamSink(url=redis_server.url, stream="t:calls", maxlen=1000, timeout=5.0)
    for batch in range(30):
        await sink.write([record(batch * 100 + n) for n in range(100)])
    await sink.close()
    client = redis_server.client()
    length = client.xlen("t:calls")
    # Approximate trimming (MAXLEN ~) drops whole stream nodes (100 entries by default).
    assert 1000 <= length <= 1100
    newest = client.xrevrange("t:calls", count=1)
    assert json.loads(newest[0][1]["record"])["call_id"] == "call-2999@softswitch"


async def test_a_batch_of_events_keeps_its_shape_and_order_after_a_forgotten_script(
    redis_server: RedisServer,
) -> None:
    queue = RedisStreamQueue.from_url(
        redis_server.url, stream="s:events", dead_list="s:dead", consumer="box1"
    )
    await queue.put_many([{"n": n} for n in range(3)])
    redis_server.client().script_flush()
    await queue.put_many([{"n": n} for n in range(3, 6)])
    entries = redis_server.client().xrange("s:events")
    assert [fields for _, fields in entries] == [{"item": json.dumps({"n": n})} for n in range(6)]
    taken = await queue.take(0.5)
    assert [item["n"] for _, item in taken] == list(range(6))
    await queue.close()


async def test_the_redis_py_writer_writes_as_the_edge_writer_does(
    redis_server: RedisServer,
) -> None:
    client = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    writer = ClientStreamWriter(client)
    try:
        await writer.xadd_all("c:one", "record", ["only"], maxlen=5)
        await writer.xadd_all("c:one", "record", [])
        redis_server.client().script_flush()
        await writer.xadd_all("c:many", "item", ["a", "b", "c"])
        for start in range(0, 1000, 100):
            await writer.xadd_all(
                "c:trimmed", "record", [str(i) for i in range(start, start + 100)], maxlen=10
            )
    finally:
        await writer.close()
        await client.aclose()
    check = redis_server.client()
    assert [fields for _, fields in check.xrange("c:one")] == [{"record": "only"}]
    assert [fields for _, fields in check.xrange("c:many")] == [{"item": v} for v in "abc"]
    # MAXLEN ~: whole macro nodes are dropped, so a little more than 10 may stay.
    assert 10 <= check.xlen("c:trimmed") < 1000
