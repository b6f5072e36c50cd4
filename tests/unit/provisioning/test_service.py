"""The provisioning service against the Bandwidth emulator over real HTTP on 127.0.0.1.

Line records live in a MemoryStore, state in the in-memory (or file) state store, audit in
memory. Time is injected: the service's clock is a fixed, manually advanced datetime, and
the Bandwidth client's back-off sleeps are recorded instead of waited.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from unittest.mock import ANY

import aiohttp
import pytest
from aiohttp import web

from e911_sip.metrics import Metrics
from e911_sip.provisioning.audit import JsonlAuditLog, MemoryAuditLog
from e911_sip.provisioning.bandwidth import (
    BandwidthClient,
    BandwidthOptions,
    make_endpoint_id,
)
from e911_sip.provisioning.emulator import EmulatorOptions, build_emulator_app
from e911_sip.provisioning.model import (
    Account,
    Address,
    AuditEntry,
    Customer,
    CustomerState,
    Site,
)
from e911_sip.provisioning.service import (
    AccountFields,
    CustomerFields,
    ProvisioningService,
    ServiceError,
    ServiceOptions,
    SiteFields,
)
from e911_sip.provisioning.state import (
    FileStateStore,
    MemoryStateStore,
    NumberInUse,
    StateConflict,
    StateError,
)
from e911_sip.store.base import LocationRecord
from e911_sip.store.memory import MemoryStore

ACCOUNT = "5555555"
LINE = "1321551234"
LINE2 = "1321551235"
RALEIGH = Address(
    line1="900 Main Campus Drive",
    line2="Suite 500",
    city="Raleigh",
    state="NC",
    postal_code="27606",
)
RALEIGH_STD = "900 MAIN CAMPUS DR, STE 500, RALEIGH, NC 27606-5177, US"
CARY = Address(line1="600 Chatham Street", city="Cary", state="NC", postal_code="27513")
CARY_STD = "600 CHATHAM ST, CARY, NC 27513, US"
DURHAM = Address(line1="1 Main Street", city="Durham", state="NC", postal_code="27701")
NOWHERE = Address(line1="1 Nowhere Street", city="Cary", state="NC", postal_code="27513")
BAD_ZIP = Address(line1="600 Chatham Street", city="Cary", state="NC", postal_code="99999")

CUSTOMER_EP = make_endpoint_id("customer", "hd365")
SITE_EP = make_endpoint_id("site", "hd365/cary")
ACCOUNT_EP = make_endpoint_id("account", f"hd365/{LINE}")


# --- fixtures ---------------------------------------------------------------------------------


class Clock:
    """The service's clock: a fixed instant, advanced by hand."""

    def __init__(self) -> None:
        self.now = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def tick(self, seconds: int = 60) -> None:
        self.now += timedelta(seconds=seconds)


@dataclass
class Bw:
    """The emulator, a client of it and a side channel to its admin endpoints."""

    base: str
    session: aiohttp.ClientSession
    client: BandwidthClient
    sleeps: list[float] = field(default_factory=list)

    async def fault(self, **spec: Any) -> None:
        async with self.session.post(f"{self.base}/_emulator/faults", json=spec) as response:
            assert response.status == 201, await response.text()

    async def clear_faults(self) -> None:
        async with self.session.delete(f"{self.base}/_emulator/faults") as response:
            assert response.status == 204

    async def state(self) -> dict[str, Any]:
        async with self.session.get(f"{self.base}/_emulator/state") as response:
            result: dict[str, Any] = await response.json()
            return result

    async def endpoints(self) -> dict[str, dict[str, Any]]:
        return {e["id"]: e for e in (await self.state())["endpoints"]}

    async def addresses(self) -> dict[str, dict[str, Any]]:
        return {a["id"]: a for a in (await self.state())["addresses"]}

    async def requests(self, method: str, fragment: str) -> list[dict[str, Any]]:
        return [
            r
            for r in (await self.state())["requests"]
            if r["method"] == method and fragment in r["path"]
        ]


def bandwidth_options(base: str) -> BandwidthOptions:
    """Client options for the emulator at ``base``, impatient so failures are quick."""
    return BandwidthOptions(
        account_id=ACCOUNT,
        client_id="e911-sip-emulator",
        client_secret="emulator-secret",
        api_base=f"{base}/api/v2",
        token_url=f"{base}/api/v1/oauth2/token",
        max_attempts=2,
        backoff_base=0.0,
        order_poll_interval=0.0,
        request_timeout=10.0,
    )


@asynccontextmanager
async def emulator() -> AsyncIterator[Bw]:
    """The emulator on a free port of 127.0.0.1 and a client of it that never really sleeps."""
    runner = web.AppRunner(build_emulator_app(EmulatorOptions()), handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    base = f"http://127.0.0.1:{runner.addresses[0][1]}"
    sleeps: list[float] = []

    async def no_wait(seconds: float) -> None:
        sleeps.append(seconds)
        await asyncio.sleep(0)

    session = aiohttp.ClientSession()
    client = BandwidthClient(bandwidth_options(base), sleep=no_wait)
    try:
        yield Bw(base, session, client, sleeps)
    finally:
        await client.close()
        await session.close()
        await runner.cleanup()


@pytest.fixture
async def bw() -> AsyncIterator[Bw]:
    async with emulator() as running:
        yield running


@dataclass
class World:
    service: ProvisioningService
    lines: MemoryStore
    state: MemoryStateStore
    audit: MemoryAuditLog
    bw: Bw
    clock: Clock
    metrics: Metrics

    async def record(self, line: str) -> LocationRecord | None:
        return await self.lines.lookup(line)

    async def customer(self, cid: str = "hd365") -> CustomerState:
        state = await self.state.get(cid)
        assert state is not None
        return state


def make_world(bw: Bw, **options: Any) -> World:
    lines = MemoryStore()
    state = MemoryStateStore()
    audit = MemoryAuditLog()
    clock = Clock()
    metrics = Metrics()
    service = ProvisioningService(
        provider=bw.client,
        lines=lines,
        state=state,
        audit=audit,
        options=ServiceOptions(**options),
        clock=clock,
        metrics=metrics,
    )
    return World(service, lines, state, audit, bw, clock, metrics)


@pytest.fixture
def world(bw: Bw) -> World:
    return make_world(bw)


class PausingProvider:
    """The real client, with a hook that holds endpoint provisioning until released."""

    def __init__(self, client: BandwidthClient, *, pause: bool = True) -> None:
        self._client = client
        self.entered = asyncio.Event()
        self.release = asyncio.Event()
        if not pause:
            self.release.set()
        self.listing = False
        self.on_delete: Callable[[str], Awaitable[None]] | None = None

    @property
    def account_id(self) -> str:
        return self._client.account_id

    async def create_address(self, address: Address, *, description: str) -> Any:
        return await self._client.create_address(address, description=description)

    async def delete_address(self, address_id: str) -> None:
        await self._client.delete_address(address_id)

    async def provision_endpoint(self, **kwargs: str) -> Any:
        self.entered.set()
        await self.release.wait()
        return await self._client.provision_endpoint(**kwargs)

    async def delete_endpoint(self, endpoint_id: str) -> None:
        if self.on_delete is not None:
            await self.on_delete(endpoint_id)
        await self._client.delete_endpoint(endpoint_id)

    async def list_endpoints(self, *, address_id: str | None = None) -> Any:
        self.listing = True
        return await self._client.list_endpoints(address_id=address_id)


async def helpdesk(
    w: World, *, address: Address | None = RALEIGH, lines: tuple[str, ...] = (LINE,)
) -> None:
    """Customer "Helpdesk 365" with its lines (precondition of seed 002, use case 1)."""
    await w.service.put_customer("hd365", CustomerFields(name="Helpdesk 365"), who="portal")
    for number in lines:
        await w.service.put_account(
            number, AccountFields(customer_id="hd365", name="ext 1000"), who="portal"
        )
    if address is not None:
        await w.service.patch_customer("hd365", CustomerFields(address=address), who="portal")


# --- use case 1.1 / 1.2: the customer's address ------------------------------------------------


async def test_customer_address_creates_one_endpoint_shared_by_all_lines(world: World) -> None:
    await helpdesk(world, lines=(LINE, LINE2))
    state = await world.customer()
    customer = state.customer
    assert customer.standardized is not None
    assert customer.standardized.one_line == RALEIGH_STD
    assert customer.endpoint is not None
    assert customer.endpoint.provider_endpoint == f"{ACCOUNT}/{CUSTOMER_EP}"
    endpoints = await world.bw.endpoints()
    assert list(endpoints) == [CUSTOMER_EP]
    assert endpoints[CUSTOMER_EP]["phoneNumber"] == f"+1{LINE}"  # the lowest line
    assert endpoints[CUSTOMER_EP]["addressId"] == customer.standardized.address_id
    for number in (LINE, LINE2):
        assert await world.record(number) == LocationRecord(
            f"{ACCOUNT}/{CUSTOMER_EP}", None, "2025-01-02T03:04:05Z"
        )
    assert [(e.line, e.new_provider_endpoint, e.address, e.who) for e in world.audit.entries] == [
        (LINE, f"{ACCOUNT}/{CUSTOMER_EP}", RALEIGH_STD, "portal"),
        (LINE2, f"{ACCOUNT}/{CUSTOMER_EP}", RALEIGH_STD, "portal"),
    ]
    assert state.outbox is None


@pytest.mark.parametrize(
    ("bad", "reason", "bw_type"),
    [
        (NOWHERE, "street 1 NOWHERE ST was not found", "address-validation"),
        (BAD_ZIP, "ZIP 99999 is not in NC", "request-validation"),
    ],
)
async def test_rejected_address_changes_nothing(
    world: World, bad: Address, reason: str, bw_type: str
) -> None:
    await helpdesk(world)
    before_state = await world.customer()
    before_records = await world.lines.all_lines()
    before_endpoints = await world.bw.endpoints()
    audit_before = list(world.audit.entries)
    world.clock.tick()
    with pytest.raises(ServiceError) as caught:
        await world.service.patch_customer("hd365", CustomerFields(address=bad), who="portal")
    error = caught.value
    assert (error.status, error.code) == (422, "address_rejected")
    assert reason in error.message
    assert error.bandwidth is not None and error.bandwidth.type == bw_type
    assert reason in error.bandwidth.description
    assert await world.customer() == before_state
    assert await world.lines.all_lines() == before_records
    assert await world.bw.endpoints() == before_endpoints
    assert world.audit.entries == audit_before


async def test_customer_without_lines_or_callback_is_validated_then_provisioned_on_first_line(
    world: World,
) -> None:
    saved = await world.service.put_customer(
        "hd365", CustomerFields(name="Helpdesk 365", address=RALEIGH), who="portal"
    )
    assert saved.created
    customer = saved.state.customer
    assert customer.standardized is not None and customer.endpoint is None
    assert len(await world.bw.addresses()) == 1 and await world.bw.endpoints() == {}
    await world.service.put_account(LINE, AccountFields(customer_id="hd365"), who="portal")
    endpoints = await world.bw.endpoints()
    assert endpoints[CUSTOMER_EP]["addressId"] == customer.standardized.address_id
    assert len(await world.bw.addresses()) == 1  # the validated address was reused
    record = await world.record(LINE)
    assert record is not None and record.provider_endpoint == f"{ACCOUNT}/{CUSTOMER_EP}"


async def test_callback_number_is_the_number_of_the_customer_endpoint(world: World) -> None:
    await world.service.put_customer(
        "hd365", CustomerFields(callback_number="9195550100", address=RALEIGH), who="portal"
    )
    assert (await world.bw.endpoints())[CUSTOMER_EP]["phoneNumber"] == "+19195550100"


async def test_changing_the_address_repoints_the_same_endpoint(world: World) -> None:
    await helpdesk(world)
    old = await world.customer()
    assert old.customer.endpoint is not None
    old_address_id = old.customer.endpoint.address_id
    world.clock.tick()
    state = await world.service.patch_customer("hd365", CustomerFields(address=CARY), who="ops")
    endpoint = state.customer.endpoint
    assert endpoint is not None and endpoint.endpoint_id == CUSTOMER_EP
    assert endpoint.address_id != old_address_id
    endpoints = await world.bw.endpoints()
    assert list(endpoints) == [CUSTOMER_EP]
    assert endpoints[CUSTOMER_EP]["addressId"] == endpoint.address_id
    assert len(await world.bw.requests("PATCH", "/endpoints/")) == 1
    assert old_address_id not in await world.bw.addresses()  # the old address is cleaned up
    # The record already points at the endpoint; only the audit shows the move.
    record = await world.record(LINE)
    assert record is not None and record.updated_at == "2025-01-02T03:04:05Z"
    last = world.audit.entries[-1]
    assert (last.who, last.line, last.address) == ("ops", LINE, CARY_STD)
    assert last.old_provider_endpoint == last.new_provider_endpoint == f"{ACCOUNT}/{CUSTOMER_EP}"


async def test_clearing_the_customer_address_deletes_its_endpoint_and_the_records(
    world: World,
) -> None:
    await helpdesk(world)
    state = await world.service.patch_customer("hd365", CustomerFields(address=None), who="ops")
    assert state.customer.endpoint is None and state.customer.standardized is None
    assert await world.bw.endpoints() == {}
    assert await world.bw.addresses() == {}
    assert await world.record(LINE) is None
    last = world.audit.entries[-1]
    assert (last.line, last.new_provider_endpoint, last.address) == (LINE, None, "")


async def test_put_replaces_and_resets_fields_not_given(world: World) -> None:
    await helpdesk(world)
    saved = await world.service.put_customer("hd365", CustomerFields(address=RALEIGH), who="x")
    assert not saved.created
    assert saved.state.customer.name == ""
    assert saved.state.customer.endpoint is not None  # same address: nothing at Bandwidth


async def test_a_request_that_changes_nothing_writes_nothing(world: World) -> None:
    await helpdesk(world)
    before = await world.customer()
    requests = len((await world.bw.state())["requests"])
    world.clock.tick()
    state = await world.service.patch_customer("hd365", CustomerFields(address=RALEIGH), who="x")
    assert state == before
    assert len((await world.bw.state())["requests"]) == requests


# --- use cases 1.3 / 1.4 / 1.5: sites -----------------------------------------------------------


async def test_site_address_is_stored_unvalidated_until_an_account_is_assigned(
    world: World,
) -> None:
    await helpdesk(world)
    saved = await world.service.put_site(
        "hd365", "cary", SiteFields(name="CarryOffice", address=CARY), who="portal"
    )
    site = saved.state.sites["cary"]
    assert saved.created and site.address == CARY and site.standardized is None
    assert list(await world.bw.endpoints()) == [CUSTOMER_EP]
    state = await world.service.patch_account(LINE, AccountFields(site_id="cary"), who="portal")
    site = state.sites["cary"]
    assert site.standardized is not None and site.standardized.one_line == CARY_STD
    assert site.endpoint is not None and site.endpoint.endpoint_id == SITE_EP
    endpoints = await world.bw.endpoints()
    assert set(endpoints) == {CUSTOMER_EP, SITE_EP}
    assert endpoints[SITE_EP]["phoneNumber"] == f"+1{LINE}"
    record = await world.record(LINE)
    assert record is not None and record.provider_endpoint == f"{ACCOUNT}/{SITE_EP}"


async def test_assignment_to_a_site_bandwidth_rejects_is_refused(world: World) -> None:
    await helpdesk(world)
    await world.service.put_site("hd365", "cary", SiteFields(address=CARY), who="p")
    await world.service.patch_account(LINE, AccountFields(site_id="cary"), who="p")
    await world.service.put_site("hd365", "bad", SiteFields(address=NOWHERE), who="p")
    before = await world.customer()
    record = await world.record(LINE)
    with pytest.raises(ServiceError) as caught:
        await world.service.patch_account(LINE, AccountFields(site_id="bad"), who="p")
    assert (caught.value.status, caught.value.code) == (422, "address_rejected")
    assert "site:hd365/bad" in caught.value.message
    after = await world.customer()
    assert after == before and after.accounts[LINE].site_id == "cary"
    assert await world.record(LINE) == record
    assert await world.bw.addresses() == {  # nothing left behind at Bandwidth
        a: v for a, v in (await world.bw.addresses()).items() if v["validationStatus"] == "VALID"
    }


async def test_site_with_accounts_cannot_be_deleted(world: World) -> None:
    await helpdesk(world)
    await world.service.put_site("hd365", "cary", SiteFields(address=CARY), who="p")
    await world.service.patch_account(LINE, AccountFields(site_id="cary"), who="p")
    with pytest.raises(ServiceError) as caught:
        await world.service.delete_site("hd365", "cary", who="p")
    assert (caught.value.status, caught.value.code) == (409, "site_in_use")
    assert SITE_EP in await world.bw.endpoints()
    assert "cary" in (await world.customer()).sites


async def test_unassign_falls_back_and_site_deletion_deletes_its_endpoint(world: World) -> None:
    await helpdesk(world)
    await world.service.put_site("hd365", "cary", SiteFields(address=CARY), who="p")
    await world.service.patch_account(LINE, AccountFields(site_id="cary"), who="p")
    customer_created = (await world.bw.endpoints())[CUSTOMER_EP]["created"]
    state = await world.service.patch_account(LINE, AccountFields(site_id=None), who="p")
    assert state.sites["cary"].endpoint is not None  # kept until the site goes
    record = await world.record(LINE)
    assert record is not None and record.provider_endpoint == f"{ACCOUNT}/{CUSTOMER_EP}"
    await world.service.delete_site("hd365", "cary", who="p")
    endpoints = await world.bw.endpoints()
    assert list(endpoints) == [CUSTOMER_EP]
    assert endpoints[CUSTOMER_EP]["created"] == customer_created  # reused, not recreated
    assert "cary" not in (await world.customer()).sites


async def test_clearing_a_site_address_moves_its_lines_before_deleting_its_endpoint(
    bw: Bw,
) -> None:
    world = make_world(bw)
    provider = PausingProvider(bw.client, pause=False)
    world.service = ProvisioningService(
        provider=provider,
        lines=world.lines,
        state=world.state,
        audit=world.audit,
        options=ServiceOptions(),
        clock=world.clock,
    )
    await helpdesk(world)
    await world.service.put_site("hd365", "cary", SiteFields(address=CARY), who="p")
    await world.service.patch_account(LINE, AccountFields(site_id="cary"), who="p")
    seen: list[tuple[str, str | None]] = []

    async def snapshot(endpoint_id: str) -> None:
        record = await world.record(LINE)
        seen.append((endpoint_id, record.provider_endpoint if record else None))

    provider.on_delete = snapshot
    await world.service.patch_site("hd365", "cary", SiteFields(address=None), who="p")
    # When Bandwidth is told to delete the site endpoint, the line already left it.
    assert seen == [(SITE_EP, f"{ACCOUNT}/{CUSTOMER_EP}")]
    assert list(await world.bw.endpoints()) == [CUSTOMER_EP]


async def test_new_account_on_a_site_provisions_the_site(world: World) -> None:
    await helpdesk(world)
    await world.service.put_site("hd365", "cary", SiteFields(address=CARY), who="p")
    await world.service.put_account(
        LINE2, AccountFields(customer_id="hd365", site_id="cary"), who="p"
    )
    assert (await world.bw.endpoints())[SITE_EP]["phoneNumber"] == f"+1{LINE2}"


async def test_unknown_site_is_refused(world: World) -> None:
    await helpdesk(world)
    with pytest.raises(ServiceError) as caught:
        await world.service.patch_account(LINE, AccountFields(site_id="nope"), who="p")
    assert (caught.value.status, caught.value.code) == (422, "unknown_site")


# --- use cases 1.7 / 1.8: an account's own address and termination -----------------------------


async def test_own_address_gets_an_account_endpoint_and_keeps_the_customer_one(
    world: World,
) -> None:
    await helpdesk(world)
    state = await world.service.patch_account(LINE, AccountFields(address=CARY), who="p")
    account = state.accounts[LINE]
    assert account.endpoint is not None and account.endpoint.endpoint_id == ACCOUNT_EP
    assert set(await world.bw.endpoints()) == {CUSTOMER_EP, ACCOUNT_EP}
    record = await world.record(LINE)
    assert record is not None and record.provider_endpoint == f"{ACCOUNT}/{ACCOUNT_EP}"


async def test_termination_deletes_the_own_endpoint_and_the_record(world: World) -> None:
    await helpdesk(world)
    await world.service.put_site("hd365", "cary", SiteFields(address=CARY), who="p")
    await world.service.put_account(
        LINE2, AccountFields(customer_id="hd365", site_id="cary"), who="p"
    )
    await world.service.patch_account(LINE, AccountFields(address=DURHAM), who="p")
    await world.service.terminate_account(LINE, who="p")
    assert set(await world.bw.endpoints()) == {CUSTOMER_EP, SITE_EP}
    assert await world.record(LINE) is None
    state = await world.customer()
    assert LINE not in state.accounts and state.customer.address == RALEIGH
    assert await world.state.owner(LINE) is None
    last = world.audit.entries[-1]
    assert (last.action, last.line, last.new_provider_endpoint) == ("terminate_account", LINE, None)


async def test_number_belongs_to_one_customer(world: World) -> None:
    await helpdesk(world)
    await world.service.put_customer("other", CustomerFields(), who="p")
    with pytest.raises(ServiceError) as caught:
        await world.service.put_account(LINE, AccountFields(customer_id="other"), who="p")
    assert (caught.value.status, caught.value.code) == (409, "number_in_use")
    with pytest.raises(ServiceError) as caught:
        await world.service.patch_account(LINE, AccountFields(customer_id="other"), who="p")
    assert (caught.value.status, caught.value.code) == (409, "customer_change")


async def test_account_needs_an_existing_customer(world: World) -> None:
    with pytest.raises(ServiceError) as caught:
        await world.service.put_account(LINE, AccountFields(), who="p")
    assert (caught.value.status, caught.value.field) == (422, "customer_id")
    with pytest.raises(ServiceError) as caught:
        await world.service.put_account(LINE, AccountFields(customer_id="ghost"), who="p")
    assert (caught.value.status, caught.value.code) == (422, "unknown_customer")


async def test_customer_deletion_needs_an_empty_customer_and_deletes_its_endpoint(
    world: World,
) -> None:
    await world.service.put_customer(
        "hd365", CustomerFields(callback_number="9195550100", address=RALEIGH), who="p"
    )
    await world.service.put_account(LINE, AccountFields(customer_id="hd365"), who="p")
    with pytest.raises(ServiceError) as caught:
        await world.service.delete_customer("hd365", who="p")
    assert caught.value.status == 409
    await world.service.terminate_account(LINE, who="p")
    await world.service.delete_customer("hd365", who="p")
    assert await world.bw.endpoints() == {}
    assert await world.state.get("hd365") is None
    with pytest.raises(ServiceError) as caught:
        await world.service.get_customer("hd365")
    assert caught.value.status == 404


# --- Bandwidth failures -------------------------------------------------------------------------


async def test_bandwidth_down_is_503_and_nothing_changes(world: World) -> None:
    await helpdesk(world, address=None)
    before = await world.customer()
    await world.bw.fault(status=500, count=2, method="POST")
    with pytest.raises(ServiceError) as caught:
        await world.service.patch_customer("hd365", CustomerFields(address=RALEIGH), who="p")
    assert (caught.value.status, caught.value.code) == (503, "provider_unavailable")
    assert await world.customer() == before
    assert await world.lines.all_lines() == {}


async def test_rate_limit_is_503_with_retry_after(world: World) -> None:
    await helpdesk(world, address=None)
    await world.bw.fault(status=429, retry_after=7, count=2)
    with pytest.raises(ServiceError) as caught:
        await world.service.patch_customer("hd365", CustomerFields(address=RALEIGH), who="p")
    assert (caught.value.status, caught.value.code) == (503, "provider_rate_limited")
    assert caught.value.retry_after == 7
    assert world.bw.sleeps == [7.0]


async def test_refused_credentials_are_502(world: World) -> None:
    await helpdesk(world, address=None)
    await world.bw.fault(status=401, count=2)
    with pytest.raises(ServiceError) as caught:
        await world.service.patch_customer("hd365", CustomerFields(address=RALEIGH), who="p")
    assert (caught.value.status, caught.value.code) == (502, "provider_authentication_failed")


async def test_failed_order_is_422_and_the_new_address_is_removed(world: World) -> None:
    await helpdesk(world, address=None)
    await world.bw.fault(order_error="PSAP lookup failed", order_error_code=13999)
    with pytest.raises(ServiceError) as caught:
        await world.service.patch_customer("hd365", CustomerFields(address=RALEIGH), who="p")
    assert (caught.value.status, caught.value.code) == (422, "endpoint_rejected")
    assert caught.value.bandwidth is not None and caught.value.bandwidth.code == 13999
    assert await world.bw.endpoints() == {}
    assert await world.bw.addresses() == {}
    assert (await world.customer()).customer.address is None


async def test_failure_mid_plan_puts_bandwidth_back_as_it_was(world: World) -> None:
    await helpdesk(world)
    # A site whose line has no endpoint yet (as resync would report): the next change must
    # provision it as well, after re-pointing the customer's endpoint.
    state = await world.customer()
    site = Site(customer_id="hd365", site_id="bad", address=NOWHERE)
    await world.state.put(
        dataclasses.replace(
            state,
            sites={"bad": site},
            accounts={LINE: dataclasses.replace(state.accounts[LINE], site_id="bad")},
            version=state.version + 1,
        )
    )
    before = await world.bw.endpoints()
    with pytest.raises(ServiceError) as caught:
        await world.service.patch_customer("hd365", CustomerFields(address=CARY), who="p")
    assert caught.value.code == "address_rejected" and "site:hd365/bad" in caught.value.message
    assert len(await world.bw.requests("PATCH", "/endpoints/")) == 2  # re-point, then back
    assert await world.bw.endpoints() == {CUSTOMER_EP: {**before[CUSTOMER_EP], "updated": ANY}}
    assert set(await world.bw.addresses()) == {before[CUSTOMER_EP]["addressId"]}
    assert (await world.customer()).customer.address == RALEIGH


async def test_number_claimed_meanwhile_undoes_the_new_endpoint(bw: Bw) -> None:
    class RacyStore(MemoryStateStore):
        async def owner(self, number: str) -> str | None:
            return None  # the claim by another customer lands after this check

    world = make_world(bw)
    world.state = RacyStore()
    world.service = ProvisioningService(
        provider=bw.client,
        lines=world.lines,
        state=world.state,
        audit=world.audit,
        options=ServiceOptions(),
        clock=world.clock,
    )
    await helpdesk(world)
    await world.service.put_customer("other", CustomerFields(), who="p")
    with pytest.raises(ServiceError) as caught:
        await world.service.put_account(
            LINE, AccountFields(customer_id="other", address=CARY), who="p"
        )
    assert (caught.value.status, caught.value.code) == (409, "number_in_use")
    assert list(await world.bw.endpoints()) == [CUSTOMER_EP]
    assert len(await world.bw.addresses()) == 1
    assert (await world.customer("other")).accounts == {}


# --- crash safety: outbox and retries -------------------------------------------------------------


async def test_line_store_down_after_save_is_finished_by_the_next_request(world: World) -> None:
    await helpdesk(world, address=None)
    world.lines.available = False
    with pytest.raises(ServiceError) as caught:
        await world.service.patch_customer("hd365", CustomerFields(address=RALEIGH), who="p")
    assert (caught.value.status, caught.value.code) == (503, "line_store_unavailable")
    pending = await world.customer()
    assert pending.outbox is not None and pending.customer.endpoint is not None
    assert world.audit.entries == []
    world.lines.available = True
    # The client retries the same request: it is idempotent and completes the change.
    state = await world.service.patch_customer("hd365", CustomerFields(address=RALEIGH), who="p")
    assert state.outbox is None
    record = await world.record(LINE)
    assert record is not None and record.provider_endpoint == f"{ACCOUNT}/{CUSTOMER_EP}"
    assert [e.line for e in world.audit.entries] == [LINE]
    assert list(await world.bw.endpoints()) == [CUSTOMER_EP]


async def test_audit_down_keeps_the_entries_for_the_next_request(world: World) -> None:
    await helpdesk(world, address=None)
    world.audit.available = False
    with pytest.raises(ServiceError) as caught:
        await world.service.patch_customer("hd365", CustomerFields(address=RALEIGH), who="p")
    assert caught.value.code == "audit_unavailable"
    assert await world.record(LINE) is not None  # the change is in effect
    world.audit.available = True
    await world.service.patch_customer("hd365", CustomerFields(name="HD"), who="q")
    assert [(e.who, e.line) for e in world.audit.entries] == [("p", LINE)]
    assert (await world.customer()).outbox is None


async def test_endpoint_deletion_failure_is_retried(world: World) -> None:
    await helpdesk(world)
    await world.service.put_site("hd365", "cary", SiteFields(address=CARY), who="p")
    await world.service.patch_account(LINE, AccountFields(site_id="cary"), who="p")
    await world.service.patch_account(LINE, AccountFields(site_id=None), who="p")
    await world.bw.fault(status=500, count=2, method="DELETE")
    with pytest.raises(ServiceError) as caught:
        await world.service.delete_site("hd365", "cary", who="p")
    assert caught.value.status == 503
    assert SITE_EP in await world.bw.endpoints()
    report = await world.service.resync()
    assert report.errors == ()
    assert SITE_EP not in await world.bw.endpoints()


async def test_state_store_down_then_retry_does_not_duplicate_the_endpoint(world: World) -> None:
    await helpdesk(world, address=None)
    world.state.available = False
    with pytest.raises(ServiceError) as caught:
        await world.service.patch_customer("hd365", CustomerFields(address=RALEIGH), who="p")
    assert (caught.value.status, caught.value.code) == (503, "state_unavailable")
    world.state.available = True
    # A crash between Bandwidth and the save looks the same: state never heard of it.
    saved = await world.customer()
    assert saved.customer.endpoint is None
    report = await world.service.resync()
    assert report.orphan_endpoints == ()
    state = await world.service.patch_customer("hd365", CustomerFields(address=RALEIGH), who="p")
    assert state.customer.endpoint is not None
    assert list(await world.bw.endpoints()) == [CUSTOMER_EP]


async def test_concurrent_changes_to_one_customer_do_not_interleave(world: World) -> None:
    await helpdesk(world)
    numbers = [f"13215560{i:02d}" for i in range(6)]
    # Each change waits on Bandwidth between reading and saving the customer: without the
    # per-customer lock they would all build on the same version and all but one would fail.
    await asyncio.gather(
        *(
            world.service.put_account(n, AccountFields(customer_id="hd365", address=CARY), who="p")
            for n in numbers
        )
    )
    state = await world.customer()
    assert set(numbers) <= set(state.accounts)
    endpoints = await world.bw.endpoints()
    for number in numbers:
        own = make_endpoint_id("account", f"hd365/{number}")
        assert endpoints[own]["phoneNumber"] == f"+1{number}"
        record = await world.record(number)
        assert record is not None and record.provider_endpoint == f"{ACCOUNT}/{own}"
    assert world.metrics.provisioning_operations.labels("put_account", "ok")._value.get() == 7


async def test_concurrent_writer_elsewhere_is_a_conflict(world: World) -> None:
    await helpdesk(world)
    stored = await world.customer()
    # Another process saves first: the next save from a stale version must fail.
    await world.state.put(dataclasses.replace(stored, version=stored.version + 1))
    with pytest.raises(StateConflict):
        await world.state.put(dataclasses.replace(stored, version=stored.version + 1))


# --- resync ---------------------------------------------------------------------------------------


async def test_resync_rebuilds_records_and_reports_lines_without_endpoint(world: World) -> None:
    await helpdesk(world, lines=(LINE, LINE2))
    await world.service.put_customer("empty", CustomerFields(), who="p")
    await world.service.put_account("1999999999", AccountFields(customer_id="empty"), who="p")
    # Damage: one record lost, one stale, one stray number nobody owns.
    await world.lines.put_records(
        {
            LINE2: LocationRecord(f"{ACCOUNT}/stale0000000", None, "x"),
            "1888888888": LocationRecord(f"{ACCOUNT}/stray0000000", None, "x"),
        },
        frozenset({LINE}),
    )
    world.clock.tick()
    report = await world.service.resync(who="ops")
    assert report.written == (LINE, LINE2)
    assert report.removed == ("1888888888",)
    assert report.orphan_lines == ("1888888888",)
    assert [(p.line, p.reason) for p in report.without_endpoint] == [("1999999999", "no_address")]
    assert not report.ok
    for number in (LINE, LINE2):
        record = await world.record(number)
        assert record == LocationRecord(f"{ACCOUNT}/{CUSTOMER_EP}", None, "2025-01-02T03:05:05Z")
    assert await world.record("1888888888") is None
    resync_entries = [e for e in world.audit.entries if e.action == "resync"]
    assert {(e.who, e.line) for e in resync_entries} == {
        ("ops", LINE),
        ("ops", LINE2),
        ("ops", "1888888888"),
    }
    again = await world.service.resync()
    assert again.written == () and again.removed == ()


async def test_resync_waits_for_changes_in_flight(bw: Bw) -> None:
    world = make_world(bw)
    provider = PausingProvider(bw.client)
    world.service = ProvisioningService(
        provider=provider,
        lines=world.lines,
        state=world.state,
        audit=world.audit,
        options=ServiceOptions(),
        clock=world.clock,
    )
    await helpdesk(world, address=None)
    change = asyncio.create_task(
        world.service.patch_customer("hd365", CustomerFields(address=RALEIGH), who="p")
    )
    await provider.entered.wait()
    resync = asyncio.create_task(world.service.resync())
    for _ in range(50):  # let resync run as far as it can without the change finishing
        await asyncio.sleep(0)
    assert not provider.listing and not resync.done()
    provider.release.set()
    await change
    report = await resync
    # Resync saw the change complete: the line has its endpoint and needed no repair.
    assert report.without_endpoint == ()
    assert report.written == ()


async def test_resync_keeps_orphan_lines_when_told(bw: Bw) -> None:
    world = make_world(bw, resync_prunes_orphan_lines=False)
    await world.lines.put_records({"1888888888": LocationRecord(f"{ACCOUNT}/stray0000000")})
    report = await world.service.resync()
    assert report.orphan_lines == ("1888888888",) and report.removed == ()
    assert await world.record("1888888888") is not None


class ClaimedMeanwhile(MemoryStore):
    """A line store where another host claims ``number`` and writes its record between the
    resync's owner check and its deletion of the orphan."""

    def __init__(self, number: str, record: LocationRecord) -> None:
        super().__init__()
        self.claim = (number, record)

    async def delete_unchanged(self, records: Mapping[str, LocationRecord]) -> frozenset[str]:
        number, record = self.claim
        await self.put_records({number: record})
        return await super().delete_unchanged(records)


async def test_resync_never_prunes_a_record_another_host_wrote_meanwhile(bw: Bw) -> None:
    fresh = LocationRecord(f"{ACCOUNT}/fresh00000000", None, "2025-01-02T03:05:06Z")
    world = make_world(bw)
    world.lines = ClaimedMeanwhile("1888888888", fresh)
    world.service = ProvisioningService(
        provider=bw.client,
        lines=world.lines,
        state=world.state,
        audit=world.audit,
        options=ServiceOptions(),
        clock=world.clock,
    )
    await world.lines.put_records(
        {
            "1888888888": LocationRecord(f"{ACCOUNT}/stray0000000", None, "x"),
            "1777777777": LocationRecord(f"{ACCOUNT}/stray0000001", None, "x"),
        }
    )
    report = await world.service.resync()
    assert report.orphan_lines == ("1777777777", "1888888888")
    assert report.removed == ("1777777777",)  # the other one changed after it was read
    assert await world.record("1888888888") == fresh
    assert await world.record("1777777777") is None


async def test_memory_store_deletes_only_unchanged_records() -> None:
    store = MemoryStore()
    old, new = LocationRecord("1/a"), LocationRecord("1/b")
    await store.put_records({"1": old, "2": old, "3": new})
    assert await store.delete_unchanged({"1": old, "2": new, "4": old}) == frozenset({"1"})
    assert await store.all_lines() == {"2": old, "3": new}


async def test_resync_checks_endpoints_at_bandwidth(world: World) -> None:
    await helpdesk(world)
    await world.bw.client.delete_endpoint(CUSTOMER_EP)  # gone behind our back
    stray = await world.bw.client.create_address(
        Address(line1="600 Chatham St", city="Cary", state="NC", postal_code="27513"),
        description="elsewhere",
    )
    await world.bw.client.provision_endpoint(
        endpoint_id="strayendpoint1",
        phone_number="9195550199",
        name="x",
        address_id=stray.address_id,
    )
    report = await world.service.resync()
    assert report.provider_checked
    assert [(p.line, p.reason, p.provider_endpoint) for p in report.without_endpoint] == [
        (LINE, "missing_at_provider", f"{ACCOUNT}/{CUSTOMER_EP}")
    ]
    assert report.orphan_endpoints == ("strayendpoint1",)


async def test_resync_survives_bandwidth_being_down(world: World) -> None:
    await helpdesk(world)
    await world.bw.fault(status=500, count=2, method="GET")
    report = await world.service.resync()
    assert not report.provider_checked
    assert report.provider_error is not None and "could not list" in report.provider_error
    assert report.written == ()


async def test_resync_finishes_a_pending_outbox(world: World) -> None:
    await helpdesk(world, address=None)
    world.lines.available = False
    with pytest.raises(ServiceError):
        await world.service.patch_customer("hd365", CustomerFields(address=RALEIGH), who="p")
    world.lines.available = True
    report = await world.service.resync()
    assert report.errors == ()
    assert (await world.customer()).outbox is None
    assert [e.action for e in world.audit.entries] == ["patch_customer"]
    assert await world.record(LINE) is not None


# --- input checks ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda s: s.get_customer("bad id"), "customer_id"),
        (lambda s: s.get_account("12345"), "number"),
        (
            lambda s: s.put_customer("x", CustomerFields(callback_number="1"), who="p"),
            "callback_number",
        ),
        (lambda s: s.put_site("x", "-bad", SiteFields(), who="p"), "site_id"),
        (lambda s: s.audit_trail(line="abc"), "line"),
    ],
)
async def test_invalid_identifiers_are_422(world: World, call: Any, field: str) -> None:
    with pytest.raises(ServiceError) as caught:
        await call(world.service)
    assert (caught.value.status, caught.value.field) == (422, field)


# --- state and audit backends (memory and file) ---------------------------------------------------


async def test_memory_state_store_claims_numbers_atomically() -> None:
    store = MemoryStateStore()
    a = CustomerState(customer=Customer(customer_id="a"), version=1)
    await store.put(a)
    with_line = CustomerState(
        customer=a.customer, accounts={LINE: Account(number=LINE, customer_id="a")}, version=2
    )
    await store.put(with_line)
    b = CustomerState(
        customer=Customer(customer_id="b"),
        accounts={LINE: Account(number=LINE, customer_id="b")},
        version=1,
    )
    with pytest.raises(NumberInUse) as caught:
        await store.put(b)
    assert caught.value.owner == "a"
    assert await store.get("b") is None
    assert await store.owner(LINE) == "a"
    await store.put(CustomerState(customer=a.customer, version=3))
    assert await store.owner(LINE) is None
    with pytest.raises(StateConflict):
        await store.delete("a", version=2)
    await store.delete("a", version=3)
    assert await store.customer_ids() == []


async def test_file_state_store_persists_and_replaces_atomically(tmp_path: Path) -> None:
    path = tmp_path / "state" / "provisioning.json"
    store = FileStateStore(path)
    assert await store.get("a") is None
    state = CustomerState(customer=Customer(customer_id="a", name="A"), version=1)
    await store.put(state)
    await store.close()
    reopened = FileStateStore(path)
    assert await reopened.get("a") == state
    assert await reopened.customer_ids() == ["a"]
    assert sorted(p.name for p in path.parent.iterdir()) == ["provisioning.json"]
    assert json.loads(path.read_text())["customers"]["a"]["customer"]["name"] == "A"


async def test_file_state_store_refuses_a_corrupt_file(tmp_path: Path) -> None:
    path = tmp_path / "provisioning.json"
    path.write_text('{"customers": {"a": {"schema": 1}}}')
    store = FileStateStore(path)
    with pytest.raises(StateError, match="corrupt"):
        await store.get("a")
    assert not await store.ping()


async def test_file_state_store_keeps_memory_and_file_in_step_when_a_write_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "provisioning.json"
    store = FileStateStore(path)
    await store.put(CustomerState(customer=Customer(customer_id="a"), version=1))

    def disk_full(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", disk_full)
    with pytest.raises(StateError, match="No space left"):
        await store.put(CustomerState(customer=Customer(customer_id="b"), version=1))
    monkeypatch.undo()
    assert await store.customer_ids() == ["a"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["provisioning.json"]
    assert await FileStateStore(path).customer_ids() == ["a"]


async def test_jsonl_audit_log_appends_and_filters(tmp_path: Path) -> None:
    log = JsonlAuditLog(tmp_path / "audit.jsonl")
    entries = [
        AuditEntry(
            at=f"2025-01-02T03:04:0{i}Z",
            who="p",
            action="put_account",
            entity=f"account:{line}",
            line=line,
            old_provider_endpoint=None,
            new_provider_endpoint=f"{ACCOUNT}/ep{i}00000000",
            source="customer:hd365",
            address=RALEIGH_STD,
        )
        for i, line in enumerate((LINE, LINE2, LINE))
    ]
    await log.append(entries[:2])
    await log.append(entries[2:])
    assert await log.read() == entries
    assert await log.read(line=LINE) == [entries[0], entries[2]]
    assert await log.read(line=LINE, limit=1) == [entries[2]]
    assert len((tmp_path / "audit.jsonl").read_text().splitlines()) == 3
    await log.close()
