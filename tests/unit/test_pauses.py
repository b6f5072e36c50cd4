"""The waits of the background writers: one future each, ended by its timer, by the stop, or
(a wait that asks for it) by a wake."""

from __future__ import annotations

import asyncio

import pytest

from e911_sip.batching import Pauses

LONG = 3600.0
"""A timer that never fires within a test."""


async def test_a_wait_ends_at_its_timer() -> None:
    with Pauses(asyncio.Event()) as pauses:
        await pauses.sleep(0.001)
        loop = asyncio.get_running_loop()
        await pauses.until(loop.time())


async def test_the_stop_ends_a_wait_and_every_later_one_at_once() -> None:
    stop = asyncio.Event()
    with Pauses(stop) as pauses:
        waiting = asyncio.create_task(pauses.sleep(LONG))
        await asyncio.sleep(0)
        assert not waiting.done()
        stop.set()
        async with asyncio.timeout(10):
            await waiting
            await pauses.sleep(LONG)
            await pauses.until(None, wakeable=True)


async def test_a_wake_ends_a_wakeable_wait_only() -> None:
    stop = asyncio.Event()
    with Pauses(stop) as pauses:
        pauses.wake()  # nothing waits: nothing happens
        lingering = asyncio.create_task(pauses.sleep(LONG))
        await asyncio.sleep(0)
        pauses.wake()
        for _ in range(3):
            await asyncio.sleep(0)
        assert not lingering.done()  # not wakeable: only its timer or the stop ends it
        stop.set()
        await lingering
    stop = asyncio.Event()
    with Pauses(stop) as pauses:
        idle = asyncio.create_task(pauses.until(None, wakeable=True))
        await asyncio.sleep(0)
        assert not idle.done()
        pauses.wake()
        async with asyncio.timeout(10):
            await idle
        # A wake with nothing waiting is not kept for the next wait.
        pauses.wake()
        later = asyncio.create_task(pauses.sleep(LONG, wakeable=True))
        await asyncio.sleep(0)
        assert not later.done()
        pauses.wake()
        async with asyncio.timeout(10):
            await later


async def test_leaving_the_block_stops_watching_the_stop() -> None:
    before = asyncio.all_tasks()
    with Pauses(asyncio.Event()):
        assert len(asyncio.all_tasks() - before) == 1  # the one task that watches the stop
    await asyncio.sleep(0)  # the cancelled task finishes
    assert asyncio.all_tasks() == before
    with pytest.raises(RuntimeError):
        await Pauses(asyncio.Event()).sleep(0)
