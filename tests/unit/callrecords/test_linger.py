"""The recorder's linger (``[records] linger``): how finished records are batched into writes.

The tests run the recorder on an event loop whose clock moves only when the test moves it, so
"within the linger" and "after it" are decided by the test, never by how fast the host is.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence

from e911_sip.callrecords.book import CallRecord
from e911_sip.callrecords.recorder import CallRecorder, RecorderOptions
from e911_sip.callrecords.stream import Delivery, LocalHandoff
from e911_sip.metrics import Metrics
from e911_sip.proxy.core import EmergencyCall
from tests.unit.callrecords.test_book import T0, invite
from tests.unit.callrecords.test_keeping import answered_and_hung_up, counter

LINGER = 30.0
"""Seconds of the loop's own clock: long, so that only the test's moving it ends a linger."""


class ManualClockLoop(asyncio.SelectorEventLoop):
    """An event loop whose clock stands still until :meth:`advance` moves it."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0

    def time(self) -> float:
        return self.now

    async def advance(self, seconds: float) -> None:
        """Move the clock on, and let every timer now due and what it wakes run."""
        self.now += seconds
        await settle()


async def settle() -> None:
    """Let every task that can run without the clock moving run until it waits again."""
    for _ in range(50):
        await asyncio.sleep(0)


def on_manual_clock(test: Callable[[ManualClockLoop], Awaitable[None]]) -> None:
    loop = ManualClockLoop()
    try:
        loop.run_until_complete(test(loop))
    finally:
        # A failed assertion leaves the writer's task behind: end it before the loop closes.
        for task in asyncio.all_tasks(loop):
            task.cancel()
            loop.run_until_complete(asyncio.wait([task]))
        loop.close()


class CountingHandoff:
    """The in-process handoff, remembering the Call-IDs of each write it was given (a
    wrapper: the compiled handoff cannot be subclassed here)."""

    def __init__(self) -> None:
        self.handoff = LocalHandoff()
        self.writes: list[list[str]] = []
        self.closed = False

    async def write(self, records: Sequence[CallRecord]) -> None:
        self.writes.append([r.call_id for r in records])
        await self.handoff.write(records)

    async def read(self, *, count: int, block: float) -> Delivery | None:
        return await self.handoff.read(count=count, block=block)

    async def close(self) -> None:
        self.closed = True


class Writer:
    """A recorder on ``loop`` with ``linger``, writing to a CountingHandoff in a task."""

    def __init__(self, loop: ManualClockLoop, linger: float) -> None:
        self.metrics = Metrics()
        self.handoff = CountingHandoff()
        self.recorder = CallRecorder(
            sink=self.handoff,
            metrics=self.metrics,
            options=RecorderOptions(linger=linger),
            wall_clock=lambda: T0 + loop.now,
        )
        self.stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self.recorder.run(self.stop))
        await settle()

    async def stopped(self) -> None:
        self.stop.set()
        if self._task is not None:
            await self._task

    @property
    def writes(self) -> list[list[str]]:
        return self.handoff.writes

    def counted(self, result: str) -> float:
        return counter(self.metrics, "e911_sip_call_records_total", result=result)

    async def handed_on(self) -> list[str]:
        """The Call-IDs waiting in the handoff, in order."""
        delivery = await self.handoff.read(count=100, block=0)
        return [] if delivery is None else [r.call_id for r in delivery.records]


def test_records_arriving_within_the_linger_go_out_in_one_write() -> None:
    async def scenario(loop: ManualClockLoop) -> None:
        writer = Writer(loop, LINGER)
        await writer.start()
        answered_and_hung_up(writer.recorder, "a")
        await settle()
        assert writer.writes == []  # alone, it waits for company
        await loop.advance(LINGER - 1.0)
        assert writer.writes == []
        answered_and_hung_up(writer.recorder, "b")
        answered_and_hung_up(writer.recorder, "c")
        await settle()
        assert writer.writes == []
        await loop.advance(1.0)
        assert writer.writes == [["a", "b", "c"]]
        assert writer.counted("written") == 3
        assert writer.recorder.queued == 0
        await writer.stopped()
        assert writer.writes == [["a", "b", "c"]]
        assert await writer.handed_on() == ["a", "b", "c"]

    on_manual_clock(scenario)


def test_without_a_linger_each_record_is_written_at_once() -> None:
    async def scenario(loop: ManualClockLoop) -> None:
        writer = Writer(loop, 0.0)
        await writer.start()
        answered_and_hung_up(writer.recorder, "a")
        await settle()
        assert writer.writes == [["a"]]  # the clock never moved
        answered_and_hung_up(writer.recorder, "b")
        await settle()
        assert writer.writes == [["a"], ["b"]]
        assert writer.counted("written") == 2
        assert loop.now == 0.0
        await writer.stopped()
        assert await writer.handed_on() == ["a", "b"]

    on_manual_clock(scenario)


def test_a_stop_while_a_record_lingers_writes_it_and_the_calls_still_up() -> None:
    async def scenario(loop: ManualClockLoop) -> None:
        writer = Writer(loop, LINGER)
        await writer.start()
        answered_and_hung_up(writer.recorder, "a")
        writer.recorder.on_event(EmergencyCall(2, invite("b"), "911", "b"))  # still up
        await settle()
        assert writer.writes == []
        writer.stop.set()
        await settle()  # the clock stands still: the stop, not the linger, ends the wait
        assert writer.writes == [["a"], ["b"]]
        await writer.stopped()
        assert writer.writes == [["a"], ["b"]]
        assert writer.handoff.closed
        assert writer.counted("written") == 2
        assert writer.counted("lost_at_stop") == 0
        assert await writer.handed_on() == ["a", "b"]

    on_manual_clock(scenario)


def test_records_queued_before_the_writer_runs_are_written_at_a_stop_without_lingering() -> None:
    async def scenario(loop: ManualClockLoop) -> None:
        writer = Writer(loop, LINGER)
        answered_and_hung_up(writer.recorder, "a")
        answered_and_hung_up(writer.recorder, "b")
        writer.stop.set()
        await writer.recorder.run(writer.stop)
        assert writer.writes == [["a", "b"]]
        assert loop.now == 0.0

    on_manual_clock(scenario)
