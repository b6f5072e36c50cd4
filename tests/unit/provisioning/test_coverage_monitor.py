"""The coverage monitor with the real service and the Bandwidth emulator over HTTP: order
tracking, refresh on writes, the gauges and ``GET /v1/coverage``."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from e911_sip.metrics import Metrics
from e911_sip.provisioning.api import build_provisioning_app
from e911_sip.provisioning.audit import MemoryAuditLog
from e911_sip.provisioning.bandwidth import ProviderUnavailable
from e911_sip.provisioning.coverage import LineState, OrderStatus, endpoint_id_of
from e911_sip.provisioning.coverage_monitor import (
    CoverageMonitor,
    CoverageOptions,
    NotifyingStateStore,
    OrderTracker,
    TrackedProvider,
)
from e911_sip.provisioning.model import EntityRef
from e911_sip.provisioning.service import (
    AccountFields,
    CustomerFields,
    ProvisioningService,
    ServiceError,
    ServiceOptions,
)
from e911_sip.provisioning.state import MemoryStateStore
from e911_sip.store.base import LocationRecord
from e911_sip.store.memory import MemoryStore
from tests.unit.provisioning.test_service import (
    LINE,
    LINE2,
    RALEIGH,
    Bw,
    PausingProvider,
    emulator,
)

TOKEN = "coverage-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@dataclass
class Rig:
    service: ProvisioningService
    monitor: CoverageMonitor
    tracker: OrderTracker
    lines: MemoryStore
    metrics: Metrics
    bw: Bw

    def gauge(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(name, labels)
        assert value is not None, name
        return value


def make_rig(bw: Bw, provider: Any = None, **options: Any) -> Rig:
    metrics = Metrics()
    lines = MemoryStore()
    tracker = OrderTracker(max_failed=2, on_forgotten=metrics.coverage_orders_forgotten.inc)
    state = NotifyingStateStore(MemoryStateStore(), on_write=tracker.changed)
    service = ProvisioningService(
        provider=TrackedProvider(provider or bw.client, tracker),
        lines=lines,
        state=state,
        audit=MemoryAuditLog(),
        options=ServiceOptions(),
        metrics=metrics,
    )
    monitor = CoverageMonitor(
        customers=service.list_customers,
        lines=lines,
        tracker=tracker,
        options=CoverageOptions(**options),
        metrics=metrics,
    )
    return Rig(service, monitor, tracker, lines, metrics, bw)


@pytest.fixture
async def bw() -> AsyncIterator[Bw]:
    async with emulator() as running:
        yield running


async def bare_line(rig: Rig, number: str = LINE) -> None:
    """Customer "hd365" with no address and one line: no location."""
    await rig.service.put_customer("hd365", CustomerFields(name="Helpdesk 365"), who="t")
    await rig.service.put_account(number, AccountFields(customer_id="hd365"), who="t")


async def test_a_failed_order_is_listed_until_a_later_order_succeeds(bw: Bw) -> None:
    rig = make_rig(bw)
    await bare_line(rig)
    await bw.fault(order_error="PSAP lookup failed", order_error_code=13999)
    with pytest.raises(ServiceError):
        await rig.service.patch_account(LINE, AccountFields(address=RALEIGH), who="t")
    result = await rig.monitor.current()
    [failed] = result.failed
    assert failed.entity == EntityRef.account("hd365", LINE)
    assert failed.endpoint_id == endpoint_id_of(failed.entity)
    assert "PSAP lookup failed" in failed.reason
    assert failed.order_id
    [line] = result.uncovered
    assert (line.line, line.state, line.order) == (LINE, LineState.NO_ADDRESS, OrderStatus.FAILED)
    assert rig.gauge("e911_sip_coverage_endpoints_failed") == 1
    assert rig.gauge("e911_sip_coverage_lines", state="no_address") == 1
    assert rig.gauge("e911_sip_coverage_share") == 0.0
    # The retry goes through: the failure is gone and the line is covered at its own level.
    await rig.service.patch_account(LINE, AccountFields(address=RALEIGH), who="t")
    result = await rig.monitor.current()
    assert (result.failed, result.uncovered, result.share) == ((), (), 1.0)
    assert rig.gauge("e911_sip_coverage_lines", state="account") == 1
    assert rig.gauge("e911_sip_coverage_endpoints_failed") == 0
    assert rig.gauge("e911_sip_coverage_alert_below") == 0.99


async def test_an_order_in_flight_is_pending(bw: Bw) -> None:
    provider = PausingProvider(bw.client)
    rig = make_rig(bw, provider)
    await bare_line(rig)
    change = asyncio.create_task(
        rig.service.patch_customer("hd365", CustomerFields(address=RALEIGH), who="t")
    )
    await asyncio.wait_for(provider.entered.wait(), 10)
    result = await rig.monitor.current()
    [pending] = result.pending
    assert (pending.entity, pending.reason, pending.lines) == (
        EntityRef.customer("hd365"),
        "order_in_progress",
        1,
    )
    assert rig.gauge("e911_sip_coverage_endpoints_pending") == 1
    provider.release.set()
    await asyncio.wait_for(change, 10)
    result = await rig.monitor.current()
    assert (result.pending, result.covered) == ((), 1)


async def test_failed_orders_are_bounded_and_the_oldest_forgotten(bw: Bw) -> None:
    rig = make_rig(bw)  # remembers two
    tracker = rig.tracker
    for n in range(3):
        tracker.started(f"ep{n}", f"202555000{n}")
        tracker.finished(f"ep{n}", ProviderUnavailable("down"))
    assert [a.endpoint_id for a in tracker.attempts()] == ["ep1", "ep2"]
    assert rig.metrics.registry.get_sample_value("e911_sip_coverage_orders_forgotten_total") == 1


async def wait_until(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)
    assert condition(), what


async def test_writes_refresh_the_gauges_without_waiting_for_the_interval(bw: Bw) -> None:
    rig = make_rig(bw, interval=3600.0, min_gap=0.0)
    stop = asyncio.Event()
    task = asyncio.create_task(rig.monitor.run(stop))
    try:
        await wait_until(
            lambda: rig.gauge("e911_sip_coverage_refreshes_total", result="ok") >= 1,
            "the first computation",
        )
        await bare_line(rig)
        await wait_until(
            lambda: rig.gauge("e911_sip_coverage_lines", state="no_address") == 1,
            "a refresh after the write",
        )
        await rig.service.patch_customer("hd365", CustomerFields(address=RALEIGH), who="t")
        await wait_until(
            lambda: (
                rig.gauge("e911_sip_coverage_lines", state="customer") == 1
                and rig.gauge("e911_sip_coverage_share") == 1.0
            ),
            "a refresh after the address",
        )
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


async def test_a_malformed_or_missing_record_is_not_covered(bw: Bw) -> None:
    rig = make_rig(bw)
    await bare_line(rig)
    await rig.service.put_account(LINE2, AccountFields(customer_id="hd365"), who="t")
    await rig.service.patch_customer("hd365", CustomerFields(address=RALEIGH), who="t")
    await rig.lines.put_records({}, frozenset({LINE2}))
    await rig.lines.put_records({LINE: LocationRecord("5555555/elsewhere")})
    result = await rig.monitor.current()
    assert {(u.line, u.state) for u in result.uncovered} == {
        (LINE, LineState.RECORD_MISMATCH),
        (LINE2, LineState.RECORD_MISSING),
    }


@pytest.fixture
async def api(bw: Bw) -> AsyncIterator[tuple[Rig, str, aiohttp.ClientSession]]:
    rig = make_rig(bw, alert_below=0.5)
    server = TestServer(
        build_provisioning_app(rig.service, tokens={TOKEN: "noc"}, coverage=rig.monitor),
        host="127.0.0.1",
    )
    await server.start_server()
    session = aiohttp.ClientSession()
    try:
        yield rig, str(server.make_url("/v1/coverage")), session
    finally:
        await session.close()
        await server.close()


async def test_the_api_reports_coverage_with_exact_counts_and_a_page(
    api: tuple[Rig, str, aiohttp.ClientSession],
) -> None:
    rig, url, session = api
    await bare_line(rig)
    await rig.service.put_account(LINE2, AccountFields(customer_id="hd365"), who="t")
    async with session.get(url, headers=AUTH, params={"limit": "1", "offset": "1"}) as response:
        assert response.status == 200
        body = await response.json()
    assert (body["lines"], body["covered"], body["share"], body["alert_below"]) == (2, 0, 0, 0.5)
    assert body["uncovered"]["total"] == 2
    assert [u["line"] for u in body["uncovered"]["lines"]] == [LINE2]
    assert body["uncovered_by_reason"]["no_address"] == 2
    async with session.get(url) as response:
        assert response.status == 401
    async with session.get(url, headers=AUTH, params={"limit": "0"}) as response:
        assert response.status == 422
        assert (await response.json())["error"]["field"] == "limit"


async def test_without_a_monitor_coverage_is_503(bw: Bw) -> None:
    rig = make_rig(bw)
    server = TestServer(build_provisioning_app(rig.service, tokens={TOKEN: "noc"}))
    await server.start_server()
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.get(str(server.make_url("/v1/coverage")), headers=AUTH) as response,
        ):
            assert response.status == 503
    finally:
        await server.close()


async def test_all_customers_reads_every_store_in_bulk_or_one_by_one() -> None:
    from e911_sip.provisioning.model import Customer, CustomerState

    memory = MemoryStateStore()
    for cid in ("b", "a", "c"):
        await memory.put(CustomerState(customer=Customer(customer_id=cid), version=1))
    writes: list[None] = []
    wrapped = NotifyingStateStore(memory, on_write=lambda: writes.append(None))
    assert [s.customer_id for s in await wrapped.all_customers()] == ["a", "b", "c"]

    class OneByOne:
        """A store with only the StateStore protocol (no bulk read)."""

        get = memory.get
        put = memory.put
        delete = memory.delete
        customer_ids = memory.customer_ids
        owner = memory.owner
        ping = memory.ping
        close = memory.close

    plain = NotifyingStateStore(OneByOne(), on_write=lambda: writes.append(None))  # type: ignore[arg-type]
    assert [s.customer_id for s in await plain.all_customers()] == ["a", "b", "c"]
    await wrapped.put(CustomerState(customer=Customer(customer_id="d"), version=1))
    assert len(writes) == 1


async def test_a_cancelled_order_leaves_an_earlier_failure_in_place(bw: Bw) -> None:
    provider = PausingProvider(bw.client)
    rig = make_rig(bw, provider)
    eid = endpoint_id_of(EntityRef.customer("hd365"))
    rig.tracker.started(eid, LINE)
    rig.tracker.finished(eid, ProviderUnavailable("down", type="order-timeout"))
    await bare_line(rig)
    change = asyncio.create_task(
        rig.service.patch_customer("hd365", CustomerFields(address=RALEIGH), who="t")
    )
    await asyncio.wait_for(provider.entered.wait(), 10)
    assert [a.status for a in rig.tracker.attempts()] == [OrderStatus.PENDING]
    change.cancel()
    with pytest.raises(asyncio.CancelledError):
        await change
    [attempt] = rig.tracker.attempts()
    assert (attempt.status, attempt.error) == (OrderStatus.FAILED, "order-timeout: down")
