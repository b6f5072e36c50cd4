"""Records from the edge's recorder to provisioning's store: the handoff, failures, retention."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import pytest

from e911_sip.callrecords.book import BookOptions, CallRecord, TrunkAttempt
from e911_sip.callrecords.recorder import CallRecorder, RecorderOptions
from e911_sip.callrecords.stream import LocalHandoff, TransferError
from e911_sip.metrics import Metrics
from e911_sip.provisioning.calls import (
    CallQuery,
    CallRecordKeeper,
    CallStore,
    JsonlCallStore,
    KeeperOptions,
    MemoryCallStore,
)
from e911_sip.proxy.core import CallCompleted, EmergencyCall, EmergencyForwarded
from tests.unit.callrecords.test_book import FIRST, T0, invite

DAY = 86_400.0
QUICK = KeeperOptions(read_block=0.02)


def record(n: int, *, at: float = T0, caller: str = "1321551234") -> CallRecord:
    return CallRecord(
        call_id=f"call-{n}",
        number="911",
        invite_at=at + n,
        caller=caller,
        callback=caller,
        provider_endpoint="5555555/1",
        outcome="enriched",
        trunks=[TrunkAttempt(FIRST, 1, True, "200")],
        status=200,
        answered_at=at + n + 1,
        bye_at=at + n + 30,
        end="bye",
    )


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not await check():
            await asyncio.sleep(0.01)


def counter(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def answered_and_hung_up(recorder: CallRecorder, call_id: str) -> None:
    recorder.on_event(EmergencyCall(1, invite(call_id), "911", call_id))
    recorder.on_enrichment(
        call_id,
        outcome="enriched",
        caller="1321551234",
        callback="1321551234",
        provider_endpoint="5555555/1",
    )
    recorder.on_event(EmergencyForwarded(1, call_id, FIRST, 1, True))
    recorder.on_event(CallCompleted(call_id, "INVITE", True, 200, FIRST))
    recorder.on_event(CallCompleted(call_id, "BYE", False, 200, None))


class FlakySink:
    """Fails the first ``failures`` writes, then hands on to ``target``."""

    def __init__(self, target: LocalHandoff, failures: int) -> None:
        self.target = target
        self.failures = failures
        self.closed = False

    async def write(self, records: Sequence[CallRecord]) -> None:
        if self.failures > 0:
            self.failures -= 1
            raise TransferError("redis down")
        await self.target.write(records)

    async def close(self) -> None:
        self.closed = True


async def test_records_reach_the_store_through_the_in_process_handoff() -> None:
    metrics = Metrics()
    handoff = LocalHandoff()
    store = MemoryCallStore()
    recorder = CallRecorder(sink=handoff, metrics=metrics)
    levels: list[str] = []

    async def level(rec: CallRecord) -> str | None:
        levels.append(rec.call_id)
        return "site"

    keeper = CallRecordKeeper(
        source=handoff,
        store=store,
        metrics=metrics,
        options=QUICK,
        resolve_level=level,
    )
    stop, keeper_stop = asyncio.Event(), asyncio.Event()
    async with asyncio.TaskGroup() as tasks:
        writing = tasks.create_task(recorder.run(stop))
        tasks.create_task(keeper.run(keeper_stop))
        answered_and_hung_up(recorder, "a")

        async def stored() -> bool:
            return len(store.records) == 1

        await eventually(stored)
        # A call still up when the edge stops is recorded as it is, and still kept.
        recorder.on_event(EmergencyCall(2, invite("b"), "911", "b"))
        stop.set()
        await writing  # its last records are in the handoff: the keeper stops after them
        keeper_stop.set()
    ends = {r.call_id: (r.end, r.level) for r in store.records.values()}
    assert ends == {"a": ("bye", "site"), "b": ("shutdown", None)}
    assert levels == ["a"]  # b carried no endpoint: nothing to resolve
    assert counter(metrics, "e911_sip_call_records_total", result="written") == 2
    assert counter(metrics, "e911_sip_call_records_stored_total", result="stored") == 2


async def test_keeper_drains_what_the_edge_wrote_as_it_stopped() -> None:
    metrics = Metrics()
    handoff = LocalHandoff()
    store = MemoryCallStore()
    await handoff.write([record(1), record(2)])
    stop = asyncio.Event()
    stop.set()
    await CallRecordKeeper(source=handoff, store=store, metrics=metrics).run(stop)
    assert sorted(r.call_id for r in store.records.values()) == ["call-1", "call-2"]


async def test_a_failing_sink_is_retried_and_the_call_path_never_waits() -> None:
    metrics = Metrics()
    handoff = LocalHandoff()
    sink = FlakySink(handoff, failures=2)
    recorder = CallRecorder(sink=sink, metrics=metrics, options=RecorderOptions(retry_min=0.01))
    stop = asyncio.Event()
    task = asyncio.create_task(recorder.run(stop))
    answered_and_hung_up(recorder, "a")  # returns at once whatever the sink does
    assert recorder.queued == 1

    async def written() -> bool:
        return counter(metrics, "e911_sip_call_records_total", result="written") == 1

    await eventually(written)
    stop.set()
    await task
    assert counter(metrics, "e911_sip_call_records_total", result="write_failed") == 2
    delivery = await handoff.read(count=10, block=0)
    assert delivery is not None and [r.call_id for r in delivery.records] == ["a"]
    assert sink.closed


async def test_a_full_queue_drops_and_counts_and_a_stop_counts_what_is_left() -> None:
    metrics = Metrics()
    sink = FlakySink(LocalHandoff(), failures=10**6)
    recorder = CallRecorder(
        sink=sink, metrics=metrics, options=RecorderOptions(queue_size=2, stop_timeout=0.2)
    )
    for call_id in ("a", "b", "c"):
        answered_and_hung_up(recorder, call_id)
    assert recorder.queued == 2
    assert counter(metrics, "e911_sip_call_records_total", result="queue_full") == 1
    stop = asyncio.Event()
    stop.set()
    await recorder.run(stop)
    assert counter(metrics, "e911_sip_call_records_total", result="lost_at_stop") == 2
    assert recorder.queued == 0


async def test_records_in_progress_are_bounded() -> None:
    metrics = Metrics()
    recorder = CallRecorder(
        sink=LocalHandoff(),
        metrics=metrics,
        options=RecorderOptions(book=BookOptions(max_calls=1)),
    )
    recorder.on_event(EmergencyCall(1, invite("a"), "911", "a"))
    recorder.on_event(EmergencyCall(2, invite("b"), "911", "b"))
    assert counter(metrics, "e911_sip_call_records_in_progress") == 1
    assert counter(metrics, "e911_sip_call_records_finished_total", end="capacity") == 1


async def test_a_failing_store_is_retried_without_losing_the_batch() -> None:
    metrics = Metrics()
    handoff = LocalHandoff()
    store = MemoryCallStore()
    store.available = False
    await handoff.write([record(1)])
    keeper = CallRecordKeeper(
        source=handoff,
        store=store,
        metrics=metrics,
        options=dataclasses.replace(QUICK, retry_max=0.05),
    )
    stop = asyncio.Event()
    task = asyncio.create_task(keeper.run(stop))

    async def failed() -> bool:
        return counter(metrics, "e911_sip_call_records_stored_total", result="store_error") >= 1

    await eventually(failed)
    store.available = True

    async def stored() -> bool:
        return len(store.records) == 1

    await eventually(stored)
    stop.set()
    await task


async def test_keeper_prunes_past_retention() -> None:
    metrics = Metrics()
    store = MemoryCallStore()
    now = T0 + 10 * DAY
    await store.append([record(1, at=T0), record(2, at=now - DAY)])
    stop = asyncio.Event()
    keeper = CallRecordKeeper(
        source=LocalHandoff(),
        store=store,
        metrics=metrics,
        options=dataclasses.replace(QUICK, retention=5 * DAY),
        wall_clock=lambda: now,
    )
    task = asyncio.create_task(keeper.run(stop))

    async def pruned() -> bool:
        return len(store.records) == 1

    await eventually(pruned)
    stop.set()
    await task
    assert [r.call_id for r in store.records.values()] == ["call-2"]
    assert counter(metrics, "e911_sip_call_records_stored_total", result="pruned") == 1


@pytest.fixture(params=["memory", "jsonl"])
def call_store(request: pytest.FixtureRequest, tmp_path: Path) -> CallStore:
    if request.param == "memory":
        return MemoryCallStore()
    return JsonlCallStore(tmp_path / "calls" / "calls.jsonl")


async def test_store_queries_by_time_caller_and_cursor(call_store: CallStore) -> None:
    records = [record(n, caller="3215550001" if n % 2 else "3215550002") for n in range(10)]
    await call_store.append(records[:6])
    await call_store.append(records[6:])
    await call_store.append([records[3]])  # redelivered: stored once

    everything = await call_store.query(CallQuery(limit=100))
    assert [r.call_id for r in everything] == [f"call-{n}" for n in range(10)]
    assert everything[0].to_dict() == records[0].to_dict()

    window = await call_store.query(CallQuery(since=T0 + 2, until=T0 + 5))
    assert [r.call_id for r in window] == ["call-2", "call-3", "call-4"]

    odd = await call_store.query(CallQuery(caller="3215550001", limit=2))
    assert [r.call_id for r in odd] == ["call-1", "call-3"]
    more = await call_store.query(CallQuery(caller="3215550001", limit=2, after=odd[-1].id))
    assert [r.call_id for r in more] == ["call-5", "call-7"]

    assert await call_store.prune(T0 + 4) == 4
    remaining = await call_store.query(CallQuery())
    assert [r.call_id for r in remaining] == [f"call-{n}" for n in range(4, 10)]
    assert await call_store.prune(T0 + 4) == 0


async def test_keeper_reports_the_backlog() -> None:
    metrics = Metrics()
    handoff = LocalHandoff()
    store = MemoryCallStore()
    store.available = False  # nothing leaves the handoff while the store is down
    await handoff.write([record(1), record(2)])
    stop = asyncio.Event()
    keeper = CallRecordKeeper(
        source=handoff,
        store=store,
        metrics=metrics,
        options=dataclasses.replace(QUICK, backlog_interval=0.01, retry_max=0.02),
    )
    task = asyncio.create_task(keeper.run(stop))

    async def measured() -> bool:
        return counter(metrics, "e911_sip_call_records_backlog") == 2

    await eventually(measured)
    stop.set()
    await task
