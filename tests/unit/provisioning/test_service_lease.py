"""The service holds the state store's lease on a customer around a whole change, and a
change that cannot get it, or loses it, leaves nothing behind at Bandwidth or in state.

The lease is played by a memory state store whose lease is scripted (busy, waited, lost at
a chosen moment); the Redis lease itself runs against a real redis-server in
tests/integration/test_provisioning_concurrency.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from e911_sip.metrics import Metrics
from e911_sip.provisioning.audit import MemoryAuditLog
from e911_sip.provisioning.lease import Held
from e911_sip.provisioning.model import CustomerState
from e911_sip.provisioning.service import (
    AccountFields,
    CustomerFields,
    ProvisioningService,
    ServiceError,
    ServiceOptions,
)
from e911_sip.provisioning.state import (
    CustomerBusy,
    MemoryStateStore,
    StateConflict,
    StateError,
)
from e911_sip.store.base import LocationRecord
from e911_sip.store.memory import MemoryStore
from tests.unit.provisioning.test_service import (
    CARY,
    DURHAM,
    LINE,
    RALEIGH,
    Bw,
    Clock,
    PausingProvider,
)


@dataclasses.dataclass
class ScriptedLease:
    waited: float = 0.0
    lost: bool = False

    @property
    def contended(self) -> bool:
        return self.waited > 0.0


class LeasingStore(MemoryStateStore):
    """A memory store whose lease is scripted and whose use is logged in order."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[str] = []
        self.busy = False
        self.waited = 0.0
        self.current: ScriptedLease | None = None
        self.conflicts = 0
        """Saves still to refuse as if another writer saved first."""

    @asynccontextmanager
    async def lease(self, customer_id: str) -> AsyncIterator[Held]:
        if self.busy:
            raise CustomerBusy(customer_id, 60.0)
        self.current = ScriptedLease(waited=self.waited)
        self.events.append(f"lease {customer_id}")
        try:
            yield self.current
        finally:
            self.events.append(f"release {customer_id}")

    async def get(self, customer_id: str) -> CustomerState | None:
        self.events.append("get")
        return await super().get(customer_id)

    async def put(self, state: CustomerState) -> None:
        self.events.append("put")
        if self.conflicts:
            self.conflicts -= 1
            raise StateConflict(f"customer {state.customer_id} changed during the save")
        await super().put(state)


@dataclasses.dataclass
class Leased:
    service: ProvisioningService
    state: LeasingStore
    lines: MemoryStore
    provider: PausingProvider
    metrics: Metrics
    bw: Bw

    def leases(self, outcome: str) -> float:
        value = self.metrics.provisioning_leases.labels("customer", outcome)._value.get()
        return float(value)


@pytest.fixture
def leased(bw: Bw) -> Leased:
    state = LeasingStore()
    lines = MemoryStore()
    metrics = Metrics()
    provider = PausingProvider(bw.client, pause=False)
    service = ProvisioningService(
        provider=provider,
        lines=lines,
        state=state,
        audit=MemoryAuditLog(),
        options=ServiceOptions(),
        clock=Clock(),
        metrics=metrics,
    )
    return Leased(service, state, lines, provider, metrics, bw)


async def customer_with_line(w: Leased) -> None:
    await w.service.put_customer("hd365", CustomerFields(name="Helpdesk 365"), who="p")
    await w.service.put_account(LINE, AccountFields(customer_id="hd365"), who="p")
    await w.service.patch_customer("hd365", CustomerFields(address=RALEIGH), who="p")


async def test_a_change_reads_saves_and_completes_inside_the_lease(leased: Leased) -> None:
    await customer_with_line(leased)
    leased.state.events.clear()
    await leased.service.patch_customer("hd365", CustomerFields(address=CARY), who="p")
    events = leased.state.events
    # Read, save with the outbox, clear the outbox: all between taking and giving back.
    assert events[0] == "lease hd365" and events[-1] == "release hd365"
    assert events[1:-1] == ["get", "put", "put"]
    assert leased.leases("free") == 4  # the setup's three changes and this one
    assert leased.leases("waited") == leased.leases("busy") == leased.leases("lost") == 0


async def test_a_lease_held_elsewhere_too_long_is_503_customer_busy(leased: Leased) -> None:
    await customer_with_line(leased)
    before = await leased.state.get("hd365")
    addresses = len(await leased.bw.requests("POST", "/addresses"))
    leased.state.busy = True
    with pytest.raises(ServiceError) as caught:
        await leased.service.patch_customer("hd365", CustomerFields(address=CARY), who="p")
    error = caught.value
    assert (error.status, error.code, error.retry_after) == (503, "customer_busy", 1.0)
    assert "another provisioning process" in error.message
    assert await leased.state.get("hd365") == before
    assert len(await leased.bw.requests("POST", "/addresses")) == addresses
    assert leased.leases("busy") == 1
    wait = leased.metrics.provisioning_lease_wait
    assert wait._sum.get() == 60.0  # type: ignore[attr-defined]


async def test_a_lease_waited_for_is_counted_with_its_wait(leased: Leased) -> None:
    leased.state.waited = 2.5
    await leased.service.put_customer("hd365", CustomerFields(name="H"), who="p")
    assert leased.leases("waited") == 1 and leased.leases("free") == 0
    assert leased.metrics.provisioning_lease_wait._sum.get() == 2.5  # type: ignore[attr-defined]


async def test_a_change_that_lost_its_lease_before_bandwidth_orders_nothing(
    leased: Leased,
) -> None:
    await customer_with_line(leased)
    before = await leased.state.get("hd365")
    addresses = len(await leased.bw.requests("POST", "/addresses"))

    original = leased.state.get

    async def get_then_lose(customer_id: str) -> CustomerState | None:
        found = await original(customer_id)
        assert leased.state.current is not None
        leased.state.current.lost = True
        return found

    leased.state.get = get_then_lose  # type: ignore[method-assign]
    with pytest.raises(ServiceError) as caught:
        await leased.service.patch_customer("hd365", CustomerFields(address=CARY), who="p")
    assert (caught.value.status, caught.value.code) == (503, "lease_lost")
    assert await original("hd365") == before
    assert len(await leased.bw.requests("POST", "/addresses")) == addresses
    assert leased.leases("lost") == 1


async def test_a_lease_lost_during_bandwidth_undoes_the_steps_and_saves_nothing(
    leased: Leased,
) -> None:
    await customer_with_line(leased)
    before = await leased.state.get("hd365")
    endpoints_before = await leased.bw.endpoints()
    leased.provider.release.clear()
    leased.provider.entered.clear()
    change = asyncio.create_task(
        leased.service.patch_customer("hd365", CustomerFields(address=DURHAM), who="p")
    )
    await asyncio.wait_for(leased.provider.entered.wait(), 10)
    assert leased.state.current is not None
    leased.state.current.lost = True
    leased.provider.release.set()
    with pytest.raises(ServiceError) as caught:
        await change
    assert (caught.value.status, caught.value.code) == (503, "lease_lost")
    assert await leased.state.get("hd365") == before
    # The endpoint points at its old address again, and the new address is gone.
    endpoints = await leased.bw.endpoints()
    assert endpoints.keys() == endpoints_before.keys()
    for endpoint_id, endpoint in endpoints.items():
        assert endpoint["addressId"] == endpoints_before[endpoint_id]["addressId"]
    in_use = {e["addressId"] for e in endpoints.values()}
    assert set(await leased.bw.addresses()) == in_use
    record = await leased.lines.lookup(LINE)
    assert record is not None


async def test_a_save_refused_as_stale_undoes_its_bandwidth_steps(leased: Leased) -> None:
    await customer_with_line(leased)
    endpoints_before = await leased.bw.endpoints()
    addresses_before = set(await leased.bw.addresses())
    leased.state.conflicts = 1
    with pytest.raises(ServiceError) as caught:
        await leased.service.put_account(
            "1321551299", AccountFields(customer_id="hd365", address=CARY), who="p"
        )
    assert (caught.value.status, caught.value.code) == (409, "concurrent_change")
    assert await leased.bw.endpoints() == endpoints_before
    assert set(await leased.bw.addresses()) == addresses_before
    state = await leased.state.get("hd365")
    assert state is not None and "1321551299" not in state.accounts


async def test_resync_leaves_a_customer_changed_meanwhile_to_that_change(leased: Leased) -> None:
    await customer_with_line(leased)
    # The line's record is lost; resync would rewrite it from the state it reads.
    await leased.lines.put_records({}, frozenset({LINE}))
    store = leased.state
    leases = 0
    fresh = LocationRecord("5555555/fresh0000000", None, "x")
    original = store.lease

    @asynccontextmanager
    async def lease_then_race(customer_id: str) -> AsyncIterator[Held]:
        nonlocal leases
        leases += 1
        if leases == 2:
            # Between resync's read and its repair, another process saves the customer
            # and writes the line's record itself.
            stored = await MemoryStateStore.get(store, customer_id)
            assert stored is not None
            await MemoryStateStore.put(
                store, dataclasses.replace(stored, version=stored.version + 1)
            )
            await leased.lines.put_records({LINE: fresh}, frozenset())
        async with original(customer_id) as held:
            yield held

    store.lease = lease_then_race  # type: ignore[method-assign]
    report = await leased.service.resync()
    assert leases == 2
    assert report.written == () and report.errors == ()
    assert await leased.lines.lookup(LINE) == fresh


async def test_resync_keeps_the_records_of_a_customer_it_could_not_read(leased: Leased) -> None:
    await customer_with_line(leased)
    record = await leased.lines.lookup(LINE)
    assert record is not None
    store = leased.state
    original = store.get
    calls = 0

    async def first_read_fails(customer_id: str) -> CustomerState | None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise StateError("redis read timed out")
        return await original(customer_id)

    store.get = first_read_fails  # type: ignore[method-assign]
    report = await leased.service.resync()
    assert report.errors and "hd365" in report.errors[0]
    # Its line looked like nobody's, but the number is still held: not pruned.
    assert report.removed == ()
    assert await leased.lines.lookup(LINE) == record
