"""An import job runs only where its lease is: a runner that finds it held elsewhere watches
the job and takes it over once the lease is free, and one that loses the lease stops.

The lease is scripted on a memory job store; the Redis lease runs against a real
redis-server in tests/integration/test_provisioning_concurrency.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from e911_sip.metrics import Metrics
from e911_sip.provisioning.imports import (
    Format,
    ImportOptions,
    ImportRunner,
    JobInfo,
    JobState,
    MemoryJobStore,
    parse_file,
)
from e911_sip.provisioning.lease import Held
from tests.unit.provisioning.test_imports import onboarding_csv
from tests.unit.provisioning.test_service import World

JOB = "00000000000000bb"


@dataclasses.dataclass
class ScriptedLease:
    waited: float = 0.0
    contended: bool = False
    lost: bool = False


class GatedStore(MemoryJobStore):
    """A job store whose lease another process may hold, or take away."""

    def __init__(self) -> None:
        super().__init__()
        self.elsewhere = True
        self.looks = 0
        self.looked = asyncio.Event()
        self.current: ScriptedLease | None = None
        self.lose_after_records: int | None = None

    @asynccontextmanager
    async def lease(self, job_id: str) -> AsyncIterator[Held | None]:
        self.looks += 1
        self.looked.set()
        if self.elsewhere:
            yield None
            return
        self.current = ScriptedLease()
        yield self.current

    async def record(self, job_id: str, results: Any) -> None:
        await super().record(job_id, results)
        if self.lose_after_records is not None and self.current is not None:
            self.lose_after_records -= 1
            if self.lose_after_records == 0:
                # Another process takes the job over; this one must stop before more.
                self.current.lost = True
                self.lose_after_records = None
                self.elsewhere = True


async def saved_job(store: GatedStore) -> int:
    rows, _ = parse_file(onboarding_csv(1, 6, 2).encode(), Format.CSV, max_rows=100)
    info = JobInfo(job_id=JOB, who="t", created_at="x", state=JobState.QUEUED, total=len(rows))
    await store.create(info, rows)
    return len(rows)


def runner_for(world: World, store: GatedStore, metrics: Metrics) -> ImportRunner:
    return ImportRunner(
        service=world.service,
        store=store,
        options=ImportOptions(import_batch_size=2),
        metrics=metrics,
        watch_interval=0.01,
    )


def leases(metrics: Metrics, outcome: str) -> float:
    return float(metrics.provisioning_leases.labels("import_job", outcome)._value.get())


async def test_a_job_held_elsewhere_is_watched_then_taken_over(world: World) -> None:
    store = GatedStore()
    total = await saved_job(store)
    metrics = Metrics()
    runner = runner_for(world, store, metrics)
    try:
        assert await runner.resume() == 1
        while store.looks < 3:
            store.looked.clear()
            await asyncio.wait_for(store.looked.wait(), 10)
        # Nothing applied while another process held it.
        view = await runner.status(JOB)
        assert view is not None and (view["state"], view["done"]) == ("queued", 0)
        assert await world.service.list_customers() == []
        store.elsewhere = False  # that process died; its lease expired
        await asyncio.wait_for(runner.wait(JOB), 60)
    finally:
        await runner.close()
    view = await runner.status(JOB)
    assert view is not None
    assert (view["state"], view["done"], view["failed"]) == ("completed", total, 0)
    assert len((await world.customer("cust0")).accounts) == 6
    assert (leases(metrics, "busy"), leases(metrics, "free")) == (1, 1)


async def test_a_job_finished_elsewhere_is_left_alone(world: World) -> None:
    store = GatedStore()
    await saved_job(store)
    runner = runner_for(world, store, Metrics())
    try:
        await runner.resume()
        await asyncio.wait_for(store.looked.wait(), 10)
        await store.set_state(JOB, JobState.COMPLETED, "y")
        await asyncio.wait_for(runner.wait(JOB), 10)
    finally:
        await runner.close()
    assert await world.service.list_customers() == []


async def test_a_runner_that_loses_the_lease_stops_and_watches(world: World) -> None:
    store = GatedStore()
    store.elsewhere = False
    store.lose_after_records = 1
    total = await saved_job(store)
    metrics = Metrics()
    runner = runner_for(world, store, metrics)
    try:
        await runner.resume()
        while leases(metrics, "lost") == 0:
            store.looked.clear()
            await asyncio.wait_for(store.looked.wait(), 10)
        # Stopped after the batch in flight: rows of later batches are still pending.
        stopped = await runner.status(JOB)
        assert stopped is not None and 0 < stopped["done"] < total
        store.elsewhere = False  # the other process went away again
        await asyncio.wait_for(runner.wait(JOB), 60)
    finally:
        await runner.close()
    view = await runner.status(JOB)
    assert view is not None
    assert (view["state"], view["done"], view["failed"]) == ("completed", total, 0)
    assert leases(metrics, "lost") == 1 and leases(metrics, "free") == 2


async def test_a_job_another_process_submits_is_found_and_watched(world: World) -> None:
    store = GatedStore()
    metrics = Metrics()
    runner = runner_for(world, store, metrics)
    try:
        assert await runner.resume() == 0
        total = await saved_job(store)  # submitted through another process
        await asyncio.wait_for(store.looked.wait(), 10)
        store.elsewhere = False
        await asyncio.wait_for(runner.wait(JOB), 60)
    finally:
        await runner.close()
    view = await runner.status(JOB)
    assert view is not None and (view["state"], view["done"]) == ("completed", total)
