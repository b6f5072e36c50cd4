"""The edge's side of notifications: the event's queued form, and how the publisher waits."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from e911_sip.notify.dispatch import Publisher
from e911_sip.notify.event import CallEvent
from e911_sip.notify.queue import FileQueue, QueueError


def event(n: int, *, caller: str | None = "3215551234") -> CallEvent:
    return CallEvent(
        call_id=f"call-{n}@softswitch",
        caller=caller,
        callback=None,
        dialed="911",
        provider_endpoint=None if caller is None else "5555555/acco0123456789",
        outcome="enriched" if caller else "no_caller",
        received_at=1_764_000_000.25 + n,
    )


def test_the_queued_form_has_every_field_and_reads_back() -> None:
    for sample in (event(1), event(2, caller=None)):
        data = sample.to_dict()
        assert data == dataclasses.asdict(sample)
        assert CallEvent.from_dict(data) == sample


class SlowQueue(FileQueue):
    """Writes after a turn of the loop, failing while ``failing``."""

    def __init__(self) -> None:
        super().__init__(None)
        self.failing = False
        self.writes: list[list[str]] = []

    async def put_many(self, items: Sequence[Mapping[str, Any]]) -> None:
        await asyncio.sleep(0)
        if self.failing:
            raise QueueError("refused")
        self.writes.append([str(item["call_id"]) for item in items])
        await super().put_many(items)


async def until(predicate: Any, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.001)


async def test_an_idle_publisher_wakes_for_each_event_and_stops_at_once() -> None:
    queue = SlowQueue()
    publisher = Publisher(queue, linger=0.0)
    stop = asyncio.Event()
    running = asyncio.create_task(publisher.run(stop))
    for n in range(3):
        await asyncio.sleep(0.01)  # idle between events: each one wakes it
        publisher.publish(event(n))
        await until(lambda: publisher.pending == 0)
    assert queue.writes == [["call-0@softswitch"], ["call-1@softswitch"], ["call-2@softswitch"]]
    stop.set()
    async with asyncio.timeout(10):
        await running
    await queue.close()


async def test_a_stop_ends_the_back_off_of_a_failing_queue_and_flushes() -> None:
    queue = SlowQueue()
    queue.failing = True
    publisher = Publisher(queue, linger=0.0)
    stop = asyncio.Event()
    running = asyncio.create_task(publisher.run(stop))
    publisher.publish(event(1))
    await asyncio.sleep(0.05)  # failed once, backing off for 0.5 s
    assert publisher.pending == 1
    queue.failing = False
    stop.set()
    async with asyncio.timeout(10):
        await running
    assert queue.writes == [["call-1@softswitch"]]
    await queue.close()
