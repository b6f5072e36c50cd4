"""Seed 002, use case 1 (1.1–1.5, 1.7, 1.8), end to end over the provisioning HTTP API.

A real redis-server holds the provisioning state, the audit stream and the line records the
edge reads (``e911:line:{10 digits}``); the Bandwidth emulator runs in-process and is reached
over real HTTP on 127.0.0.1. Each use case is its own test and first replays, through the
API, the use cases the seed says it continues from.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
import redis
from aiohttp import web
from aiohttp.test_utils import TestServer
from multidict import CIMultiDictProxy

from e911_sip.provisioning.api import build_provisioning_app
from e911_sip.provisioning.audit import RedisAuditLog
from e911_sip.provisioning.bandwidth import BandwidthClient, BandwidthOptions, make_endpoint_id
from e911_sip.provisioning.emulator import EmulatorOptions, build_emulator_app
from e911_sip.provisioning.model import Account, Customer, CustomerState
from e911_sip.provisioning.service import ProvisioningService, ServiceOptions
from e911_sip.provisioning.state import NumberInUse, RedisStateStore, StateConflict
from e911_sip.store.redis import RedisStore
from tests.integration.harness import RedisServer

BW_ACCOUNT = "5555555"
LINE = "1321551234"
OTHER_LINE = "1321551299"
TOKEN = "integration-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}

NC_OFFICE = {
    "line1": "900 Main Campus Drive",
    "line2": "Suite 500",
    "city": "Raleigh",
    "state": "NC",
    "postal_code": "27606",
    "country": "US",
}
NC_OFFICE_STD = "900 MAIN CAMPUS DR, STE 500, RALEIGH, NC 27606-5177, US"
CARRY_OFFICE = {
    "line1": "600 Chatham Street",
    "city": "Cary",
    "state": "NC",
    "postal_code": "27513",
    "country": "US",
}
CARRY_OFFICE_STD = "600 CHATHAM ST, CARY, NC 27513, US"
BAD_OFFICE = {"line1": "1 Nowhere Street", "city": "Cary", "state": "NC", "postal_code": "27513"}

CUSTOMER_EP = make_endpoint_id("customer", "hd365")
CARRY_EP = make_endpoint_id("site", "hd365/carryoffice")
BAD_EP = make_endpoint_id("site", "hd365/badoffice")
ACCOUNT_EP = make_endpoint_id("account", f"hd365/{LINE}")


def pe(endpoint_id: str) -> str:
    return f"{BW_ACCOUNT}/{endpoint_id}"


@dataclass
class System:
    """The provisioning API, its Redis and the emulated Bandwidth, as a CSP integrator sees it."""

    api_base: str
    emulator_base: str
    session: aiohttp.ClientSession
    redis: redis.Redis
    service: ProvisioningService

    async def call(
        self, method: str, path: str, body: Any = None, *, headers: dict[str, str] | None = None
    ) -> tuple[int, Any, CIMultiDictProxy[str]]:
        async with self.session.request(
            method,
            f"{self.api_base}{path}",
            json=body,
            headers=AUTH if headers is None else headers,
        ) as response:
            payload = await response.json() if response.content_type == "application/json" else None
            return response.status, payload, response.headers

    async def ok(self, method: str, path: str, body: Any = None, status: int = 200) -> Any:
        got, payload, _ = await self.call(method, path, body)
        assert got == status, payload
        return payload

    async def bandwidth(self) -> dict[str, Any]:
        async with self.session.get(f"{self.emulator_base}/_emulator/state") as response:
            result: dict[str, Any] = await response.json()
            return result

    async def endpoints(self) -> dict[str, dict[str, Any]]:
        return {e["id"]: e for e in (await self.bandwidth())["endpoints"]}

    async def address_of(self, endpoint_id: str) -> dict[str, Any]:
        state = await self.bandwidth()
        [endpoint] = [e for e in state["endpoints"] if e["id"] == endpoint_id]
        [address] = [a for a in state["addresses"] if a["id"] == endpoint["addressId"]]
        result: dict[str, Any] = address
        return result

    def line(self, number: str) -> dict[str, str]:
        fields: Any = self.redis.hgetall(f"e911:line:{number}")
        return {str(k): str(v) for k, v in fields.items()}

    def audit(self, number: str) -> list[dict[str, str]]:
        rows: Any = self.redis.xrange(f"e911:audit:line:{number}")
        return [{str(k): str(v) for k, v in fields.items()} for _, fields in rows]


@pytest.fixture
async def system(redis_server: RedisServer) -> AsyncIterator[System]:
    runner = web.AppRunner(build_emulator_app(EmulatorOptions()), handler_cancellation=True)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    emulator_base = f"http://127.0.0.1:{runner.addresses[0][1]}"

    async def no_wait(seconds: float) -> None:
        await asyncio.sleep(0)

    client = BandwidthClient(
        BandwidthOptions(
            account_id=BW_ACCOUNT,
            client_id="e911-sip-emulator",
            client_secret="emulator-secret",
            api_base=f"{emulator_base}/api/v2",
            token_url=f"{emulator_base}/api/v1/oauth2/token",
            max_attempts=2,
            order_poll_interval=0.0,
        ),
        sleep=no_wait,
    )
    lines = RedisStore(url=redis_server.url)
    state = RedisStateStore(url=redis_server.url)
    audit = RedisAuditLog(url=redis_server.url)
    service = ProvisioningService(
        provider=client, lines=lines, state=state, audit=audit, options=ServiceOptions()
    )
    server = TestServer(
        build_provisioning_app(service, tokens={TOKEN: "helpdesk-admin"}), host="127.0.0.1"
    )
    await server.start_server()
    session = aiohttp.ClientSession()
    try:
        yield System(
            str(server.make_url("")).rstrip("/"),
            emulator_base,
            session,
            redis_server.client(),
            service,
        )
    finally:
        await session.close()
        await server.close()
        for backend in (lines, state, audit):
            await backend.close()
        await client.close()
        await runner.cleanup()


# --- the steps of use case 1, replayed as preconditions ---------------------------------------


async def precondition(system: System) -> None:
    """(Sub)customer "Helpdesk 365" with account 1321551234 (extension 1000)."""
    await system.ok("PUT", "/v1/customers/hd365", {"name": "Helpdesk 365"}, status=201)
    await system.ok(
        "PUT", f"/v1/accounts/{LINE}", {"customer_id": "hd365", "name": "ext 1000"}, status=201
    )


async def step_1_1(system: System) -> Any:
    await precondition(system)
    return await system.ok("PATCH", "/v1/customers/hd365", {"address": NC_OFFICE})


async def step_1_3(system: System) -> Any:
    await step_1_1(system)
    await system.ok(
        "PUT",
        "/v1/customers/hd365/sites/carryoffice",
        {"name": "CarryOffice", "address": CARRY_OFFICE},
        status=201,
    )
    return await system.ok("PATCH", f"/v1/accounts/{LINE}", {"site_id": "carryoffice"})


async def step_1_5(system: System) -> None:
    await step_1_3(system)
    await system.ok("PATCH", f"/v1/accounts/{LINE}", {"site_id": None})
    await system.ok("DELETE", "/v1/customers/hd365/sites/carryoffice", status=204)


async def step_1_7(system: System) -> Any:
    await step_1_5(system)
    return await system.ok("PATCH", f"/v1/accounts/{LINE}", {"address": CARRY_OFFICE})


# --- use case 1 -------------------------------------------------------------------------------


async def test_use_case_1_1_valid_location_is_provisioned(system: System) -> None:
    await precondition(system)
    body = await system.ok("PATCH", "/v1/customers/hd365", {"address": NC_OFFICE})
    # The standardised address is stored and returned; the endpoint id is on the customer.
    assert body["standardized_address"]["one_line"] == NC_OFFICE_STD
    assert body["standardized_address"]["validation_status"] == "VALID"
    assert body["provider_endpoint"] == pe(CUSTOMER_EP)
    stored = json.loads(system.redis.get("e911:prov:customer:hd365"))  # type: ignore[arg-type]
    assert stored["customer"]["endpoint"]["provider_endpoint"] == pe(CUSTOMER_EP)
    assert stored["customer"]["standardized"]["one_line"] == NC_OFFICE_STD
    # Bandwidth shows the endpoint with the standardised address.
    endpoint = (await system.endpoints())[CUSTOMER_EP]
    assert endpoint["phoneNumber"] == f"+1{LINE}"
    address = await system.address_of(CUSTOMER_EP)
    assert (address["houseNumber"], address["streetName"], address["streetSuffix"]) == (
        "900",
        "MAIN CAMPUS",
        "DR",
    )
    assert (address["addressLine2"], address["city"], address["postalCode"]) == (
        "STE 500",
        "RALEIGH",
        "27606-5177",
    )
    # The line record the edge reads points at it (no callback: it is the line itself).
    record = system.line(LINE)
    assert record["provider_endpoint"] == pe(CUSTOMER_EP)
    assert "callback" not in record
    assert record["updated_at"].endswith("Z")
    # All accounts use the same endpoint id.
    await system.ok("PUT", f"/v1/accounts/{OTHER_LINE}", {"customer_id": "hd365"}, status=201)
    assert system.line(OTHER_LINE)["provider_endpoint"] == pe(CUSTOMER_EP)
    assert list(await system.endpoints()) == [CUSTOMER_EP]
    [entry] = system.audit(LINE)
    assert (entry["who"], entry["old_provider_endpoint"], entry["new_provider_endpoint"]) == (
        "helpdesk-admin",
        "",
        pe(CUSTOMER_EP),
    )
    assert (entry["entity"], entry["address"]) == ("customer:hd365", NC_OFFICE_STD)


async def test_use_case_1_2_invalid_location_is_rejected(system: System) -> None:
    await step_1_1(system)
    record = system.line(LINE)
    endpoints = await system.endpoints()
    audit_length = system.redis.xlen("e911:audit")
    status, body, _ = await system.call("PATCH", "/v1/customers/hd365", {"address": BAD_OFFICE})
    assert status == 422
    assert body["error"]["code"] == "address_rejected"
    assert "1 NOWHERE ST was not found" in body["error"]["message"]
    assert "1 NOWHERE ST was not found" in body["error"]["bandwidth"]["description"]
    # Nothing changed: the customer, its provider_endpoint, the line record, Bandwidth.
    customer = await system.ok("GET", "/v1/customers/hd365")
    assert customer["address"] == NC_OFFICE
    assert customer["provider_endpoint"] == pe(CUSTOMER_EP)
    assert system.line(LINE) == record
    assert await system.endpoints() == endpoints
    assert system.redis.xlen("e911:audit") == audit_length


async def test_use_case_1_3_site_location_is_assigned_to_a_line(system: System) -> None:
    await step_1_1(system)
    site = await system.ok(
        "PUT",
        "/v1/customers/hd365/sites/carryoffice",
        {"name": "CarryOffice", "address": CARRY_OFFICE},
        status=201,
    )
    assert site["address_status"] == "unvalidated"  # validated when a line is assigned
    assert CARRY_EP not in await system.endpoints()
    account = await system.ok("PATCH", f"/v1/accounts/{LINE}", {"site_id": "carryoffice"})
    assert account["site_id"] == "carryoffice"
    assert account["effective"]["level"] == "site"
    assert account["effective"]["provider_endpoint"] == pe(CARRY_EP)
    assert account["effective"]["address"] == CARRY_OFFICE_STD
    endpoints = await system.endpoints()
    assert set(endpoints) == {CUSTOMER_EP, CARRY_EP}
    assert (await system.address_of(CARRY_EP))["streetName"] == "CHATHAM"
    site = await system.ok("GET", "/v1/customers/hd365/sites/carryoffice")
    assert site["provider_endpoint"] == pe(CARRY_EP)
    assert site["standardized_address"]["one_line"] == CARRY_OFFICE_STD
    assert system.line(LINE)["provider_endpoint"] == pe(CARRY_EP)
    last = system.audit(LINE)[-1]
    assert (last["old_provider_endpoint"], last["new_provider_endpoint"]) == (
        pe(CUSTOMER_EP),
        pe(CARRY_EP),
    )
    assert (last["entity"], last["source"]) == (f"account:{LINE}", "site:hd365/carryoffice")


async def test_use_case_1_4_invalid_site_location_is_refused(system: System) -> None:
    await step_1_3(system)
    await system.ok(
        "PUT",
        "/v1/customers/hd365/sites/badoffice",
        {"name": "BadOffice", "address": BAD_OFFICE},
        status=201,
    )
    record = system.line(LINE)
    audit = system.audit(LINE)
    status, body, _ = await system.call("PATCH", f"/v1/accounts/{LINE}", {"site_id": "badoffice"})
    assert status == 422
    assert body["error"]["code"] == "address_rejected"
    assert "1 NOWHERE ST was not found" in body["error"]["bandwidth"]["description"]
    account = await system.ok("GET", f"/v1/accounts/{LINE}")
    assert account["site_id"] == "carryoffice"
    assert account["effective"]["provider_endpoint"] == pe(CARRY_EP)
    assert system.line(LINE) == record
    assert system.audit(LINE) == audit
    assert BAD_EP not in await system.endpoints()


async def test_use_case_1_5_unused_site_location_is_deleted(system: System) -> None:
    await step_1_3(system)
    customer_endpoint = (await system.endpoints())[CUSTOMER_EP]
    account = await system.ok("PATCH", f"/v1/accounts/{LINE}", {"site_id": None})
    assert account["effective"]["level"] == "customer"
    assert system.line(LINE)["provider_endpoint"] == pe(CUSTOMER_EP)
    assert CARRY_EP in await system.endpoints()  # the site still has its address
    await system.ok("DELETE", "/v1/customers/hd365/sites/carryoffice", status=204)
    endpoints = await system.endpoints()
    assert CARRY_EP not in endpoints
    # The customer-level endpoint was reused, not recreated, and is untouched.
    assert endpoints == {CUSTOMER_EP: customer_endpoint}
    posts = [
        r
        for r in (await system.bandwidth())["requests"]
        if r["method"] == "POST" and r["path"].endswith("/endpoints")
    ]
    assert len(posts) == 2  # the customer's, then the site's
    status, _, _ = await system.call("GET", "/v1/customers/hd365/sites/carryoffice")
    assert status == 404


async def test_use_case_1_7_line_gets_its_own_location(system: System) -> None:
    await step_1_5(system)
    account = await system.ok("PATCH", f"/v1/accounts/{LINE}", {"address": CARRY_OFFICE})
    assert account["provider_endpoint"] == pe(ACCOUNT_EP)
    assert account["effective"]["level"] == "account"
    assert account["standardized_address"]["one_line"] == CARRY_OFFICE_STD
    endpoints = await system.endpoints()
    assert set(endpoints) == {CUSTOMER_EP, ACCOUNT_EP}  # the customer-level one stays
    assert endpoints[ACCOUNT_EP]["phoneNumber"] == f"+1{LINE}"
    assert (await system.address_of(ACCOUNT_EP))["city"] == "CARY"
    assert system.line(LINE)["provider_endpoint"] == pe(ACCOUNT_EP)
    last = system.audit(LINE)[-1]
    assert (last["old_provider_endpoint"], last["new_provider_endpoint"], last["address"]) == (
        pe(CUSTOMER_EP),
        pe(ACCOUNT_EP),
        CARRY_OFFICE_STD,
    )


async def test_use_case_1_8_terminated_line_loses_its_endpoint(system: System) -> None:
    await step_1_7(system)
    # A site with a line of its own, to show site endpoints are not affected either.
    await system.ok(
        "PUT", "/v1/customers/hd365/sites/carryoffice", {"address": CARRY_OFFICE}, status=201
    )
    await system.ok(
        "PUT",
        f"/v1/accounts/{OTHER_LINE}",
        {"customer_id": "hd365", "site_id": "carryoffice"},
        status=201,
    )
    before = await system.endpoints()
    assert set(before) == {CUSTOMER_EP, CARRY_EP, ACCOUNT_EP}
    await system.ok("DELETE", f"/v1/accounts/{LINE}", status=204)
    after = await system.endpoints()
    assert set(after) == {CUSTOMER_EP, CARRY_EP}
    assert after[CARRY_EP] == before[CARRY_EP]
    # The customer's endpoint stays, at the same address, but no longer carries the
    # terminated number: no line uses it, so it carries the customer's remaining line.
    assert after[CUSTOMER_EP]["addressId"] == before[CUSTOMER_EP]["addressId"]
    assert before[CUSTOMER_EP]["phoneNumber"] == f"+1{LINE}"
    assert after[CUSTOMER_EP]["phoneNumber"] == f"+1{OTHER_LINE}"
    assert system.redis.exists(f"e911:line:{LINE}") == 0
    assert system.line(OTHER_LINE)["provider_endpoint"] == pe(CARRY_EP)
    customer = await system.ok("GET", "/v1/customers/hd365")
    assert customer["address"] == NC_OFFICE and customer["provider_endpoint"] == pe(CUSTOMER_EP)
    assert customer["accounts"] == [OTHER_LINE]
    status, _, _ = await system.call("GET", f"/v1/accounts/{LINE}")
    assert status == 404
    last = system.audit(LINE)[-1]
    assert (last["entity"], last["new_provider_endpoint"], last["address"]) == (
        f"account:{LINE}",
        "",
        "",
    )
    assert system.redis.get(f"e911:prov:owner:{LINE}") is None


async def test_a_terminated_line_number_leaves_its_shared_endpoint(system: System) -> None:
    """The site endpoint carried the lowest line; after that line is terminated it carries the
    lowest-numbered line still using it, at Bandwidth too, and the other lines' records are
    not disturbed."""
    await system.ok("PUT", "/v1/customers/hd365", {"name": "Helpdesk 365"}, status=201)
    await system.ok(
        "PUT", "/v1/customers/hd365/sites/carryoffice", {"address": CARRY_OFFICE}, status=201
    )
    lines = ["3215550001", "3215550007", "3215550003"]
    for number in lines:
        body = {"customer_id": "hd365", "site_id": "carryoffice"}
        await system.ok("PUT", f"/v1/accounts/{number}", body, status=201)
    site = await system.ok("GET", "/v1/customers/hd365/sites/carryoffice")
    assert site["endpoint_phone_number"] == "3215550001"
    assert (await system.endpoints())[CARRY_EP]["phoneNumber"] == "+13215550001"
    address_id = (await system.endpoints())[CARRY_EP]["addressId"]

    await system.ok("DELETE", "/v1/accounts/3215550001", status=204)

    site = await system.ok("GET", "/v1/customers/hd365/sites/carryoffice")
    assert site["endpoint_phone_number"] == "3215550003"
    assert site["provider_endpoint"] == pe(CARRY_EP)
    endpoint = (await system.endpoints())[CARRY_EP]
    assert (endpoint["phoneNumber"], endpoint["addressId"]) == ("+13215550003", address_id)
    for number in ("3215550003", "3215550007"):
        assert system.line(number)["provider_endpoint"] == pe(CARRY_EP)
    assert system.redis.exists("e911:line:3215550001") == 0
    stored = json.loads(system.redis.get("e911:prov:customer:hd365"))  # type: ignore[arg-type]
    assert stored["sites"]["carryoffice"]["endpoint"]["phone_number"] == "3215550003"
    # A resync finds nothing to repair.
    report = await system.ok("POST", "/v1/resync")
    assert report["written"] == [] and report["orphan_endpoints"] == [] and report["ok"]


# --- durability and recovery with the real server ---------------------------------------------


async def test_resync_rebuilds_line_records_from_redis_state(system: System) -> None:
    await step_1_3(system)
    system.redis.delete(f"e911:line:{LINE}")
    system.redis.hset("e911:line:1999999999", mapping={"provider_endpoint": pe("stale00000")})
    report = await system.ok("POST", "/v1/resync")
    assert report["written"] == [LINE] and report["removed"] == ["1999999999"]
    assert report["without_endpoint"] == [] and report["orphan_endpoints"] == []
    assert system.line(LINE)["provider_endpoint"] == pe(CARRY_EP)
    assert system.redis.exists("e911:line:1999999999") == 0


async def test_audit_trail_is_readable_from_the_stream(system: System) -> None:
    await step_1_3(system)
    body = await system.ok("GET", f"/v1/audit?line={LINE}")
    assert [(e["old_provider_endpoint"], e["new_provider_endpoint"]) for e in body["entries"]] == [
        (None, pe(CUSTOMER_EP)),
        (pe(CUSTOMER_EP), pe(CARRY_EP)),
    ]
    assert system.redis.xlen("e911:audit") == 2


async def test_redis_down_is_503_and_changes_nothing(
    system: System, redis_server: RedisServer
) -> None:
    await step_1_1(system)
    redis_server.kill()
    endpoints = await system.endpoints()
    status, body, headers = await system.call(
        "PATCH", "/v1/customers/hd365", {"address": CARRY_OFFICE}
    )
    assert status == 503 and body["error"]["code"] == "state_unavailable"
    assert headers["Retry-After"] == "1"
    assert await system.endpoints() == endpoints
    status, _, _ = await system.call("GET", "/healthz", headers={})
    assert status == 503


async def test_redis_state_store_refuses_stale_saves_and_double_claims(
    redis_server: RedisServer,
) -> None:
    first = RedisStateStore(url=redis_server.url, key_prefix="t:")
    second = RedisStateStore(url=redis_server.url, key_prefix="t:")
    try:
        a = CustomerState(
            customer=Customer(customer_id="a"),
            accounts={LINE: Account(number=LINE, customer_id="a")},
            version=1,
        )
        await first.put(a)
        assert await second.owner(LINE) == "a"
        assert await second.get("a") == a
        with pytest.raises(StateConflict):
            await second.put(a)  # built on version 0, but 1 is stored
        b = CustomerState(
            customer=Customer(customer_id="b"),
            accounts={LINE: Account(number=LINE, customer_id="b")},
            version=1,
        )
        with pytest.raises(NumberInUse):
            await second.put(b)
        assert await first.customer_ids() == ["a"]
        await first.put(CustomerState(customer=a.customer, version=2))
        assert await second.owner(LINE) is None
        await second.delete("a", version=2)
        assert await first.customer_ids() == []
        assert redis_server.client().keys("t:*") == []
    finally:
        await first.close()
        await second.close()
