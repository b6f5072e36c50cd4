"""The Redis queue's hand-over against a real redis-server: the deliveries' write and the
events' acknowledgement in one script; what it does when the server forgot its scripts or
refuses the write; two databases."""

from __future__ import annotations

from typing import Any

import pytest

from e911_sip.notify.queue import QueueError, RedisStreamQueue
from tests.integration.harness import RedisServer
from tests.unit.notify.test_hand_over import hand_over_behaviour


def open_queue(server: RedisServer, stream: str, *, db: int = 0) -> RedisStreamQueue:
    url = server.url.rsplit("/", 1)[0] + f"/{db}"
    return RedisStreamQueue.from_url(url, stream=stream, dead_list="h:dead", consumer="box1")


def calls(client: Any) -> dict[str, int]:
    stats: dict[str, Any] = client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}


def grew(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {
        name: count - before.get(name, 0)
        for name, count in after.items()
        if count != before.get(name, 0) and name != "info"
    }


async def test_the_redis_queue_hands_over_as_the_journaled_one_does(
    redis_server: RedisServer,
) -> None:
    events, deliveries = open_queue(redis_server, "h:events"), open_queue(redis_server, "h:d")
    await hand_over_behaviour(events, deliveries)
    await events.close()
    await deliveries.close()


async def test_a_hand_over_is_one_script(redis_server: RedisServer) -> None:
    events, deliveries = open_queue(redis_server, "o:events"), open_queue(redis_server, "o:d")
    await events.put_many([{"n": n} for n in range(3)])
    taken = await events.take(1.0)
    await events.hand_over([entry for entry, _ in taken[:1]], [{"d": 0}], deliveries)
    client = redis_server.client()
    before = calls(client)
    await events.hand_over([entry for entry, _ in taken[1:]], [{"d": 1}, {"d": 2}], deliveries)
    # One EVALSHA; the commands it ran count there too.
    assert grew(before, calls(client)) == {"evalsha": 1, "xadd": 2, "xack": 1, "xdel": 1}
    assert client.xpending("o:events", "notifier")["pending"] == 0
    assert client.xlen("o:events") == 0
    assert [item for _, item in await deliveries.take(1.0)] == [{"d": n} for n in range(3)]
    await events.close()
    await deliveries.close()


async def test_a_hand_over_after_the_server_forgot_its_scripts(
    redis_server: RedisServer,
) -> None:
    events, deliveries = open_queue(redis_server, "f:events"), open_queue(redis_server, "f:d")
    await events.put_many([{"n": n} for n in range(2500)])
    taken: list[str] = []
    while len(taken) < 2500:
        batch = await events.take(0.5)
        assert batch, "the queue handed out fewer entries than were put"
        taken += [entry for entry, _ in batch]
    await events.hand_over(taken[:10], [{"d": 0}], deliveries)
    redis_server.client().script_flush()  # as after a restart or a failover of the server
    # More entries than one call of Lua's unpack spreads.
    await events.hand_over(taken[10:], [{"d": n} for n in range(1, 1500)], deliveries)
    assert await events.depth() == 0
    assert redis_server.client().xpending("f:events", "notifier")["pending"] == 0
    assert await deliveries.depth() == 1500
    await events.close()
    await deliveries.close()


async def test_a_refused_hand_over_finishes_nothing(redis_server: RedisServer) -> None:
    """The deliveries' stream is not a stream (every XADD fails with WRONGTYPE): the events
    stay taken and unfinished, to be handed over again."""
    redis_server.client().set("w:d", "x")
    events, deliveries = open_queue(redis_server, "w:events"), open_queue(redis_server, "w:d")
    await events.put_many([{"n": 0}, {"n": 1}])
    taken = await events.take(1.0)
    with pytest.raises(QueueError):
        await events.hand_over([entry for entry, _ in taken], [{"d": 0}], deliveries)
    assert await events.depth() == 2
    assert redis_server.client().xpending("w:events", "notifier")["pending"] == 2
    assert redis_server.client().get("w:d") == "x"
    await events.close()
    await deliveries.close()


async def test_a_hand_over_to_another_database_writes_there_then_finishes(
    redis_server: RedisServer,
) -> None:
    events = open_queue(redis_server, "x:events")
    elsewhere = open_queue(redis_server, "x:d", db=1)
    await events.put_many([{"n": 0}, {"n": 1}])
    await events.put({"n": 2})
    taken = await events.take(1.0)
    entries = [entry for entry, _ in taken]
    await events.hand_over(entries[:2], [{"d": 0}], elsewhere)
    assert await events.depth() == 1
    assert await elsewhere.depth() == 1
    assert redis_server.client().xlen("x:d") == 0  # not in database 0
    assert [item for _, item in await elsewhere.take(1.0)] == [{"d": 0}]
    await events.hand_over(entries[2:], [], elsewhere)
    assert await events.depth() == 0
    await events.close()
    await elsewhere.close()
