"""A queue hands taken entries over to another queue: the items stored there, the entries
finished, in one step. The journaled queue here, the Redis one against a real redis-server in
tests/integration/test_notify_hand_over.py: both run :func:`hand_over_behaviour`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from e911_sip.notify.queue import FileQueue, Queue, QueueError, _database
from e911_sip.store.redis import connect


async def hand_over_behaviour(events: Queue, deliveries: Queue) -> None:
    """What every queue does with ``hand_over`` (both queues empty, on one store)."""
    await events.put_many([{"n": n} for n in range(3)])
    taken = await events.take(1.0)
    assert [item["n"] for _, item in taken] == [0, 1, 2]
    await events.put_many([{"n": n} for n in range(3, 5)])
    items = [{"d": n, "for": item["n"]} for n, (_, item) in enumerate(taken)]
    await events.hand_over([entry for entry, _ in taken], items, deliveries)
    assert await events.depth() == 2
    assert [item["n"] for _, item in await events.take(1.0)] == [3, 4]
    assert await events.take(0.05) == []  # each handed out once
    stored = await deliveries.take(1.0)
    assert [item for _, item in stored] == items
    # Nothing to store: the entries are finished all the same; an empty hand-over is nothing.
    await events.put({"n": 5})
    [(entry, _)] = await events.take(1.0)
    await events.hand_over([entry], [], deliveries)
    await events.hand_over([], [], deliveries)
    assert await events.depth() == 2  # 3 and 4, taken and not finished
    assert await deliveries.depth() == 3


async def test_the_journaled_queue_hands_over(tmp_path: Path) -> None:
    events, deliveries = FileQueue(tmp_path / "events"), FileQueue(tmp_path / "deliveries")
    await hand_over_behaviour(events, deliveries)
    await events.close()
    await deliveries.close()


async def test_the_journaled_queue_hands_over_in_memory() -> None:
    await hand_over_behaviour(FileQueue(None), FileQueue(None))


async def test_a_journaled_hand_over_survives_a_restart(tmp_path: Path) -> None:
    events, deliveries = FileQueue(tmp_path / "events"), FileQueue(tmp_path / "deliveries")
    await events.put_many([{"n": n} for n in range(4)])
    taken = await events.take(0.1)
    await events.hand_over([entry for entry, _ in taken[:3]], [{"d": 0}, {"d": 1}], deliveries)
    await events.close()
    await deliveries.close()
    events, deliveries = FileQueue(tmp_path / "events"), FileQueue(tmp_path / "deliveries")
    assert [item for _, item in await events.take(0.1)] == [{"n": 3}]
    assert [item for _, item in await deliveries.take(0.1)] == [{"d": 0}, {"d": 1}]
    await events.close()
    await deliveries.close()


class Refusing(FileQueue):
    """Refuses the next ``refuse_puts`` writes and ``refuse_acks`` acknowledgements."""

    def __init__(self) -> None:
        super().__init__(None)
        self.refuse_puts = 0
        self.refuse_acks = 0
        self.writes: list[int] = []

    async def put_many(self, items: Sequence[Mapping[str, Any]]) -> None:
        if self.refuse_puts:
            self.refuse_puts -= 1
            raise QueueError("refused")
        self.writes.append(len(items))
        await super().put_many(items)

    async def done_many(self, entries: Sequence[str]) -> None:
        if self.refuse_acks:
            self.refuse_acks -= 1
            raise QueueError("refused")
        await super().done_many(entries)


async def test_a_hand_over_tried_again_stores_its_items_once() -> None:
    """Two journals are written one after the other: a refused acknowledgement is tried again
    without storing the items again; a refused write finishes nothing."""
    events, deliveries = Refusing(), Refusing()
    await events.put_many([{"n": n} for n in range(2)])
    entries = [entry for entry, _ in await events.take(0.1)]
    deliveries.refuse_puts = 1
    events.refuse_acks = 1
    attempts = 0
    while True:
        attempts += 1
        try:
            await events.hand_over(entries, [{"d": 0}, {"d": 1}], deliveries)
            break
        except QueueError:
            if attempts == 1:
                assert await deliveries.depth() == 0 and await events.depth() == 2
            continue
    assert attempts == 3
    assert deliveries.writes == [2]
    assert await events.depth() == 0 and await deliveries.depth() == 2
    # The next batch is stored again even with the same number of entries.
    await events.put_many([{"n": 2}, {"n": 3}])
    entries = [entry for entry, _ in await events.take(0.1)]
    await events.hand_over(entries, [{"d": 2}], deliveries)
    assert deliveries.writes == [2, 1]


def test_a_script_touches_two_queues_only_on_one_database() -> None:
    def where(url: str) -> tuple[object, ...]:
        return _database(connect(url, socket_timeout=1.0, replica_acks=False))

    same = (
        "redis://127.0.0.1:6379/0",
        "unix:///run/redis.sock?db=2",
        "redis+sentinel://127.0.0.1:26379,127.0.0.1:26380/e911/1",
    )
    for url in same:
        assert where(url) == where(url)
    assert where("redis://127.0.0.1:6379/0") != where("redis://127.0.0.1:6379/1")
    assert where("redis://127.0.0.1:6379/0") != where("redis://127.0.0.2:6379/0")
    assert where("redis+sentinel://127.0.0.1:26379/e911/1") != where(
        "redis+sentinel://127.0.0.9:26379/e911/1"
    )
    assert where("redis+sentinel://127.0.0.1:26379/e911/1") != where(
        "redis+sentinel://127.0.0.1:26379/other/1"
    )
