"""The notifier expands the events it takes as one batch: contacts for each, every delivery in
one write, every event acknowledged in one, and only after the deliveries are stored."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from e911_sip.notify.dispatch import Notifier, NotifierOptions
from e911_sip.notify.event import CallEvent, Delivery, Resolution, Targets, deliveries
from e911_sip.notify.queue import FileQueue, Queue, QueueError
from tests.unit.notify.test_notify import WAIT, call, until

FALLBACK = Targets(webhooks=("https://noc.example.net/e911",))
OWN = Resolution(
    targets=Targets(emails=("desk@example.com",), sms=("3215550100",)),
    level="site",
    address="600 CHATHAM ST, CARY, NC 27513, US",
)


class Journal(FileQueue):
    """A journaled queue that counts its writes and acknowledgements, and can refuse or
    hang them."""

    def __init__(self, path: Path | None) -> None:
        super().__init__(path)
        self.writes: list[int] = []
        self.acks: list[int] = []
        self.refuse_puts = 0
        self.refuse_acks = 0
        self.hang_acks = False
        self.ack_tried = asyncio.Event()

    async def put_many(self, items: Sequence[Mapping[str, Any]]) -> None:
        if self.refuse_puts:
            self.refuse_puts -= 1
            raise QueueError("refused")
        self.writes.append(len(items))
        await super().put_many(items)

    async def done_many(self, entries: Sequence[str]) -> None:
        self.ack_tried.set()
        if self.hang_acks:
            await asyncio.Event().wait()
        if self.refuse_acks:
            self.refuse_acks -= 1
            raise QueueError("refused")
        self.acks.append(len(entries))
        await super().done_many(entries)


class Accepting:
    """A channel that accepts every delivery at once and notes its id."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.sent: list[Delivery] = []

    async def send(self, delivery: Delivery) -> None:
        self.sent.append(delivery)

    async def close(self) -> None:
        return None


CHANNELS = ("webhook", "email", "sms")


class Box:
    """A notifier on two queues, with an accepting channel of every kind."""

    def __init__(self, events: Queue, queue: Queue, resolve: Any, **options: Any) -> None:
        self.channels = {name: Accepting(name) for name in CHANNELS}
        self.events = events
        self.queue = queue
        self.notifier = Notifier(
            events=events,
            deliveries=queue,
            channels=self.channels,
            resolve=resolve,
            options=NotifierOptions(
                fallback=FALLBACK, poll_interval=0.05, backoff_base=0.01, **options
            ),
        )
        self.stop = asyncio.Event()
        self.task = asyncio.create_task(self.notifier.run(self.stop))

    def sent(self) -> list[Delivery]:
        return [d for channel in self.channels.values() for d in channel.sent]

    async def settled(self) -> bool:
        return await self.events.depth() == 0 and await self.queue.depth() == 0

    async def halt(self) -> None:
        self.stop.set()
        async with asyncio.timeout(WAIT):
            await self.task


async def own_contacts(event: CallEvent) -> Resolution:
    return OWN


def expected(calls: range, resolution: Resolution = OWN) -> set[str]:
    return {d.delivery_id for n in calls for d in deliveries(call(n), resolution, FALLBACK)}


async def test_a_batch_is_stored_in_one_write_and_acknowledged_in_one(tmp_path: Path) -> None:
    events, queue = Journal(tmp_path / "events"), Journal(tmp_path / "deliveries")
    await events.put_many([call(n).to_dict() for n in range(10)])
    events.writes.clear()
    box = Box(events, queue, own_contacts)
    await until(lambda: len(box.sent()) == 20)
    await until(box.settled)
    await box.halt()
    assert queue.writes == [20]  # two targets per call, every call's in one write
    assert events.acks == [10]
    assert {d.delivery_id for d in box.sent()} == expected(range(10))
    assert all(d.body["address"] == OWN.address for d in box.sent())
    await events.close()
    await queue.close()


async def test_a_crash_between_storing_and_acknowledging_takes_the_batch_again(
    tmp_path: Path,
) -> None:
    """The deliveries are stored, the acknowledgement never happens (the process stops
    inside it): the next notifier takes the same events again and queues their deliveries
    once more, under the same idempotency keys. Nothing is lost."""
    events, queue = Journal(tmp_path / "events"), Journal(tmp_path / "deliveries")
    await events.put_many([call(n).to_dict() for n in range(5)])
    events.hang_acks = True
    first = Box(events, queue, own_contacts)
    async with asyncio.timeout(WAIT):
        await events.ack_tried.wait()
    assert queue.writes == [10]
    await first.halt()
    await events.close()
    await queue.close()

    events, queue = Journal(tmp_path / "events"), Journal(tmp_path / "deliveries")
    assert await events.depth() == 5  # not one of them was acknowledged
    second = Box(events, queue, own_contacts)
    await until(second.settled)
    await second.halt()
    assert queue.writes == [10]  # the batch's deliveries stored again
    assert events.acks == [5]
    ids = [d.delivery_id for d in first.sent() + second.sent()]
    assert set(ids) == expected(range(5))
    assert all(ids.count(i) <= 2 for i in ids)
    await events.close()
    await queue.close()


async def test_refused_writes_are_retried_and_nothing_is_acknowledged_before_they_pass(
    tmp_path: Path,
) -> None:
    events, queue = Journal(tmp_path / "events"), Journal(tmp_path / "deliveries")
    await events.put_many([call(n).to_dict() for n in range(4)])
    queue.refuse_puts = 3
    events.refuse_acks = 2
    box = Box(events, queue, own_contacts)
    await until(lambda: len(box.sent()) == 8)
    await until(box.settled)
    await box.halt()
    assert queue.refuse_puts == 0 and events.refuse_acks == 0
    assert queue.writes == [8]  # stored once: only the refused acknowledgement was repeated
    assert events.acks == [4]
    assert {d.delivery_id for d in box.sent()} == expected(range(4))
    await events.close()
    await queue.close()


async def test_an_event_whose_contacts_fail_or_hang_gets_the_fallback_the_rest_their_own(
    tmp_path: Path,
) -> None:
    async def resolve(event: CallEvent) -> Resolution:
        if event.call_id == call(1).call_id:
            raise RuntimeError("provisioning is broken for this line")
        if event.call_id == call(2).call_id:
            await asyncio.Event().wait()  # never answers: resolve_timeout ends it
        return OWN

    events, queue = Journal(tmp_path / "events"), Journal(tmp_path / "deliveries")
    await events.put_many([call(n).to_dict() for n in range(6)])
    box = Box(events, queue, resolve, resolve_timeout=0.2)
    await until(lambda: len(box.sent()) == 2 + 4 * 2)
    await until(box.settled)
    await box.halt()
    fallback = {d.delivery_id for n in (1, 2) for d in deliveries(call(n), Resolution(), FALLBACK)}
    assert {d.delivery_id for d in box.sent()} == expected(range(0, 1)) | expected(
        range(3, 6)
    ) | fallback
    for delivery in box.sent():
        if delivery.delivery_id in fallback:
            assert delivery.target == FALLBACK.webhooks[0]
            assert delivery.body["address"] is None
    assert events.acks == [6]
    await events.close()
    await queue.close()


async def test_each_event_has_its_own_resolve_timeout_within_a_batch(tmp_path: Path) -> None:
    """Twenty-four answers of 0.1 s each take longer together than one resolve_timeout
    (1.5 s), yet none of them comes near it alone: every call gets its own contacts."""

    async def slow(event: CallEvent) -> Resolution:
        await asyncio.sleep(0.1)
        return OWN

    events, queue = Journal(tmp_path / "events"), Journal(tmp_path / "deliveries")
    await events.put_many([call(n).to_dict() for n in range(24)])
    box = Box(events, queue, slow, resolve_timeout=1.5)
    await until(lambda: len(box.sent()) == 48)
    await until(box.settled)
    await box.halt()
    assert {d.delivery_id for d in box.sent()} == expected(range(24))
    assert events.acks == [24]
    await events.close()
    await queue.close()


async def test_an_unreadable_event_is_acknowledged_with_its_batch(tmp_path: Path) -> None:
    events, queue = Journal(tmp_path / "events"), Journal(tmp_path / "deliveries")
    await events.put_many([call(0).to_dict(), {"call_id": "no-fields"}, call(2).to_dict()])
    box = Box(events, queue, own_contacts)
    await until(lambda: len(box.sent()) == 4)
    await until(box.settled)
    await box.halt()
    assert events.acks == [3]
    assert {d.delivery_id for d in box.sent()} == expected(range(0, 1)) | expected(range(2, 3))
    await events.close()
    await queue.close()


async def test_acknowledgements_in_one_journal_write_survive_a_restart(tmp_path: Path) -> None:
    first = FileQueue(tmp_path / "q")
    await first.put_many([{"n": n} for n in range(4)])
    taken = await first.take(0.1)
    await first.done_many([entry for entry, item in taken if item["n"] != 2])
    await first.done_many([taken[0][0]])  # twice: harmless
    assert await first.depth() == 1
    await first.close()
    second = FileQueue(tmp_path / "q")
    assert [item["n"] for _, item in await second.take(0.1)] == [2]
    await second.close()


async def test_deliveries_accepted_together_are_acknowledged_together(tmp_path: Path) -> None:
    events, queue = Journal(tmp_path / "events"), Journal(tmp_path / "deliveries")
    await events.put_many([call(n).to_dict() for n in range(10)])
    queue.refuse_acks = 1  # the first group's write is refused once, then retried
    box = Box(events, queue, own_contacts)
    await until(lambda: len(box.sent()) == 20)
    await until(box.settled)
    await box.halt()
    assert sum(queue.acks) == 20
    assert len(queue.acks) < 20  # in groups, not one write each
    assert len(box.sent()) == 20  # a refused acknowledgement does not send again
    await events.close()
    await queue.close()


async def test_acknowledgements_keep_coming_while_one_group_is_being_written(
    tmp_path: Path,
) -> None:
    """Deliveries accepted while a group's write hangs wait for the next group; when the
    write ends, the first of them writes theirs."""
    events, queue = Journal(tmp_path / "events"), Journal(tmp_path / "deliveries")
    release = asyncio.Event()
    original = queue.done_many

    async def slow_done_many(entries: Sequence[str]) -> None:
        if not release.is_set():
            queue.ack_tried.set()
            await release.wait()
        await original(entries)

    queue.done_many = slow_done_many  # type: ignore[method-assign]
    box = Box(events, queue, own_contacts)
    await events.put(call(0).to_dict())
    async with asyncio.timeout(WAIT):
        await queue.ack_tried.wait()
    await events.put_many([call(n).to_dict() for n in range(1, 6)])
    await until(lambda: len(box.sent()) == 12)
    assert await queue.depth() == 12  # none acknowledged while the first write hangs
    release.set()
    await until(box.settled)
    await box.halt()
    assert sum(queue.acks) == 12
    assert {d.delivery_id for d in box.sent()} == expected(range(6))
    await events.close()
    await queue.close()
