"""The Bandwidth emulator's HTTP behaviour, exercised over real HTTP on 127.0.0.1."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from e911_sip.provisioning.emulator import (
    ORDER_ERROR_ADDRESS_NOT_FOUND,
    ORDER_ERROR_ADDRESS_NOT_VALID,
    ORDER_ERROR_DUPLICATE_ENDPOINT,
    ORDER_ERROR_ENDPOINT_NOT_FOUND,
    EmulatorOptions,
    build_emulator_app,
    serve_emulator,
)

ACCOUNT = "5555555"
PHONE = "+13215551234"
ENDPOINTS_PATH = f"/api/v2/accounts/{ACCOUNT}/emergency/endpoints"
RALEIGH = {
    "description": "Helpdesk 365",
    "addressLine1": "900 Main Campus Drive",
    "addressLine2": "Suite 500",
    "city": "Raleigh",
    "state": "NC",
    "postalCode": "27606",
    "country": "US",
}
CARY = {
    "addressLine1": "600 Chatham Street",
    "city": "Cary",
    "state": "NC",
    "postalCode": "27513",
    "country": "US",
}


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Reply:
    status: int
    body: Any
    headers: Any


@dataclass
class Emu:
    base: str
    session: aiohttp.ClientSession
    clock: FakeClock
    options: EmulatorOptions
    token: str = ""

    async def fetch_token(
        self, client_id: str | None = None, secret: str | None = None, **form: str
    ) -> Reply:
        user = client_id if client_id is not None else self.options.client_id
        password = secret if secret is not None else self.options.client_secret
        basic = base64.b64encode(f"{user}:{password}".encode()).decode()
        data = form or {"grant_type": "client_credentials"}
        async with self.session.post(
            f"{self.base}/api/v1/oauth2/token",
            headers={"Authorization": f"Basic {basic}"},
            data=data,
        ) as response:
            return Reply(response.status, await response.json(), response.headers)

    async def login(self) -> None:
        reply = await self.fetch_token()
        assert reply.status == 200
        self.token = reply.body["access_token"]

    async def api(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: dict[str, str] | None = None,
        token: str | None = None,
        account: str = ACCOUNT,
        region: str | None = "NA",
    ) -> Reply:
        query = dict(params or {})
        if region is not None:
            query["region"] = region
        headers = {}
        bearer = self.token if token is None else token
        if bearer:
            headers["Authorization"] = f"Bearer {bearer}"
        url = f"{self.base}/api/v2/accounts/{account}/emergency{path}"
        async with self.session.request(
            method, url, json=json, params=query, headers=headers
        ) as response:
            body = await response.json() if response.content_type == "application/json" else None
            return Reply(response.status, body, response.headers)

    async def admin(self, method: str, path: str, json: Any = None) -> Reply:
        async with self.session.request(method, f"{self.base}/_emulator{path}", json=json) as r:
            body = await r.json() if r.content_type == "application/json" else await r.text()
            return Reply(r.status, body, r.headers)

    async def state(self) -> dict[str, Any]:
        reply = await self.admin("GET", "/state")
        assert reply.status == 200
        result: dict[str, Any] = reply.body
        return result

    async def address(self, fields: dict[str, str] = RALEIGH) -> str:
        reply = await self.api("POST", "/addresses", json=fields)
        assert reply.status == 201, reply.body
        address_id: str = reply.body["id"]
        return address_id

    async def add_endpoint(
        self, endpoint_id: str, address_id: str, phone: str = "+13215551234"
    ) -> Reply:
        item = {"id": endpoint_id, "phoneNumber": phone, "name": "x", "addressId": address_id}
        return await self.api("POST", "/endpoints", json={"endpoints": [item]})

    async def finish(self, order_id: str) -> dict[str, Any]:
        """Poll an order until it is final, as a client would."""
        for _ in range(self.options.order_polls_until_complete + 1):
            reply = await self.api("GET", f"/orders/{order_id}")
            assert reply.status == 200
        details = await self.api("GET", f"/orders/{order_id}/details")
        result: dict[str, Any] = details.body
        return result


StartEmu = Callable[..., Awaitable[Emu]]


@pytest.fixture
async def start() -> AsyncIterator[StartEmu]:
    runners: list[web.AppRunner] = []
    sessions: list[aiohttp.ClientSession] = []

    async def _start(options: EmulatorOptions | None = None) -> Emu:
        options = options or EmulatorOptions()
        clock = FakeClock()
        runner = web.AppRunner(build_emulator_app(options, clock=clock), handler_cancellation=True)
        await runner.setup()
        runners.append(runner)
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        session = aiohttp.ClientSession()
        sessions.append(session)
        return Emu(f"http://127.0.0.1:{port}", session, clock, options)

    yield _start
    for session in sessions:
        await session.close()
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
async def emu(start: StartEmu) -> Emu:
    emulator = await start()
    await emulator.login()
    return emulator


def assert_error(reply: Reply, status: int, error_type: str, field: str | None = None) -> str:
    """Check Bandwidth's error shape; return the first description."""
    assert reply.status == status, reply.body
    [first, *_] = reply.body["errors"]
    assert set(first) == {"id", "type", "description", "code", "source", "meta"}
    assert first["type"] == error_type
    assert first["source"] == {"field": field}
    assert first["meta"] == {}
    assert isinstance(first["id"], str) and first["id"]
    assert isinstance(first["code"], int)
    description: str = first["description"]
    return description


# -- OAuth2 ---------------------------------------------------------------------------------


async def test_token_for_the_configured_credentials(start: StartEmu) -> None:
    emulator = await start(EmulatorOptions(token_ttl=120))
    reply = await emulator.fetch_token()
    assert reply.status == 200
    assert reply.body["token_type"] == "Bearer"
    assert reply.body["expires_in"] == 120
    assert len(reply.body["access_token"]) >= 32
    assert (await emulator.state())["tokensIssued"] == 1


@pytest.mark.parametrize(
    ("client_id", "secret"),
    [("e911-sip-emulator", "wrong"), ("someone-else", "emulator-secret")],
)
async def test_token_refused_for_other_credentials(emu: Emu, client_id: str, secret: str) -> None:
    reply = await emu.fetch_token(client_id, secret)
    assert_error(reply, 401, "authentication-credentials")


async def test_token_needs_basic_auth(emu: Emu) -> None:
    async with emu.session.post(
        f"{emu.base}/api/v1/oauth2/token", data={"grant_type": "client_credentials"}
    ) as response:
        reply = Reply(response.status, await response.json(), response.headers)
    assert_error(reply, 401, "authentication-credentials")


async def test_token_needs_the_client_credentials_grant(emu: Emu) -> None:
    reply = await emu.fetch_token(grant_type="password")
    assert_error(reply, 400, "request-validation", "grant_type")


async def test_api_without_a_token_is_401(emu: Emu) -> None:
    reply = await emu.api("GET", "/endpoints", token="")
    description = assert_error(reply, 401, "authentication-credentials")
    assert "Authorization" in description


async def test_api_with_an_unknown_token_is_401(emu: Emu) -> None:
    reply = await emu.api("GET", "/endpoints", token="not-a-token")
    assert_error(reply, 401, "authentication-credentials")


async def test_token_expires_after_its_ttl(start: StartEmu) -> None:
    emulator = await start(EmulatorOptions(token_ttl=100))
    await emulator.login()
    emulator.clock.now += 99
    assert (await emulator.api("GET", "/endpoints")).status == 200
    emulator.clock.now += 1
    assert_error(await emulator.api("GET", "/endpoints"), 401, "authentication-credentials")


async def test_admin_can_expire_every_token(emu: Emu) -> None:
    assert (await emu.admin("POST", "/tokens/expire")).status == 204
    assert_error(await emu.api("GET", "/endpoints"), 401, "authentication-credentials")


async def test_another_account_is_forbidden(emu: Emu) -> None:
    reply = await emu.api("GET", "/endpoints", account="1234567")
    assert "1234567" in assert_error(reply, 403, "forbidden")


async def test_another_account_can_be_configured_as_404(start: StartEmu) -> None:
    emulator = await start(EmulatorOptions(wrong_account_status=404))
    await emulator.login()
    reply = await emulator.api("GET", "/endpoints", account="1234567")
    assert_error(reply, 404, "resource-not-found")


async def test_region_is_required(emu: Emu) -> None:
    assert_error(
        await emu.api("GET", "/endpoints", region=None), 400, "request-validation", "region"
    )
    assert_error(
        await emu.api("GET", "/endpoints", region="EU"), 400, "request-validation", "region"
    )
    assert (await emu.api("GET", "/endpoints", region="ROW")).status == 200


# -- addresses ------------------------------------------------------------------------------


async def test_valid_address_is_standardised(emu: Emu) -> None:
    reply = await emu.api("POST", "/addresses", json=RALEIGH)
    assert reply.status == 201
    body = reply.body
    assert body["validationStatus"] == "VALID"
    assert {k: body[k] for k in body if k not in ("id", "created", "updated")} == {
        "validationStatus": "VALID",
        "houseNumber": "900",
        "predirectional": "",
        "streetName": "MAIN CAMPUS",
        "streetSuffix": "DR",
        "postdirectional": "",
        "addressLine2": "STE 500",
        "city": "RALEIGH",
        "state": "NC",
        "postalCode": "27606-5177",
        "country": "US",
        "description": "Helpdesk 365",
    }
    assert [a["id"] for a in (await emu.state())["addresses"]] == [body["id"]]


async def test_nonexistent_street_is_201_invalid(emu: Emu) -> None:
    reply = await emu.api("POST", "/addresses", json={**CARY, "addressLine1": "1 Nowhere Street"})
    assert reply.status == 201
    assert reply.body["validationStatus"] == "INVALID"
    assert (reply.body["houseNumber"], reply.body["streetName"]) == ("1", "NOWHERE")


async def test_configured_nonexistent_streets(start: StartEmu) -> None:
    emulator = await start(EmulatorOptions(nonexistent_streets=("600 chatham st",)))
    await emulator.login()
    reply = await emulator.api("POST", "/addresses", json=CARY)
    assert reply.body["validationStatus"] == "INVALID"


async def test_malformed_address_is_400_with_the_field(emu: Emu) -> None:
    reply = await emu.api("POST", "/addresses", json={**CARY, "postalCode": "99999"})
    description = assert_error(reply, 400, "request-validation", "postalCode")
    assert description == "ZIP 99999 is not in NC"
    assert (await emu.state())["addresses"] == []


async def test_missing_address_fields_are_each_reported(emu: Emu) -> None:
    reply = await emu.api("POST", "/addresses", json={"addressLine1": "600 Chatham St"})
    assert reply.status == 400
    fields = [e["source"]["field"] for e in reply.body["errors"]]
    assert fields == ["city", "state", "postalCode"]


async def test_address_body_must_be_a_json_object(emu: Emu) -> None:
    reply = await emu.api("POST", "/addresses", json=["not", "an", "object"])
    assert_error(reply, 400, "request-validation")


async def test_get_patch_and_delete_an_address(emu: Emu) -> None:
    address_id = await emu.address(CARY)
    got = await emu.api("GET", f"/addresses/{address_id}")
    assert got.status == 200 and got.body["streetName"] == "CHATHAM"
    patched = await emu.api("PATCH", f"/addresses/{address_id}", json={"addressLine2": "Floor 2"})
    assert patched.status == 200
    assert (patched.body["addressLine2"], patched.body["streetName"]) == ("FL 2", "CHATHAM")
    bad = await emu.api("PATCH", f"/addresses/{address_id}", json={"state": "ZZ"})
    assert_error(bad, 400, "request-validation", "state")
    assert (await emu.api("DELETE", f"/addresses/{address_id}")).status == 204
    gone = await emu.api("GET", f"/addresses/{address_id}")
    assert address_id in assert_error(gone, 404, "resource-not-found")


async def test_address_list_pages(emu: Emu) -> None:
    for _ in range(3):
        await emu.address(CARY)
    reply = await emu.api("GET", "/addresses", params={"limit": "2", "offset": "0"})
    assert len(reply.body["addresses"]) == 2
    assert "next" in [link["rel"] for link in reply.body["links"]]


async def test_an_address_in_use_cannot_be_deleted(emu: Emu) -> None:
    address_id = await emu.address(CARY)
    await emu.finish((await emu.add_endpoint("abcdefghij", address_id)).body["orderId"])
    reply = await emu.api("DELETE", f"/addresses/{address_id}")
    assert "abcdefghij" in assert_error(reply, 400, "address-in-use")


# -- endpoints and orders -------------------------------------------------------------------


async def test_endpoint_create_goes_through_an_order(start: StartEmu) -> None:
    emulator = await start(EmulatorOptions(order_polls_until_complete=2))
    await emulator.login()
    address_id = await emulator.address()
    accepted = await emulator.add_endpoint("helpdesk365main", address_id)
    assert accepted.status == 202
    order = accepted.body
    assert set(order) == {
        "orderId",
        "orderType",
        "orderStatus",
        "acceptedCount",
        "invalidCount",
        "updated",
        "totalNumber",
    }
    assert (order["orderType"], order["orderStatus"], order["totalNumber"]) == (
        "ADD_ENDPOINTS",
        "RECEIVED",
        1,
    )
    order_id = order["orderId"]
    pending = await emulator.api("GET", f"/orders/{order_id}/details")
    assert pending.body["endpoints"] == [{"id": "helpdesk365main", "status": "INPROGRESS"}]
    statuses = [
        (await emulator.api("GET", f"/orders/{order_id}")).body["orderStatus"] for _ in range(3)
    ]
    assert statuses == ["PROCESSING", "PROCESSING", "COMPLETED"]
    details = await emulator.api("GET", f"/orders/{order_id}/details")
    assert details.body["endpoints"] == [{"id": "helpdesk365main", "status": "SUCCESS"}]
    assert (details.body["acceptedCount"], details.body["invalidCount"]) == (1, 0)
    history = await emulator.api("GET", f"/orders/{order_id}/history")
    assert [h["orderStatus"] for h in history.body["history"]] == [
        "RECEIVED",
        "PROCESSING",
        "COMPLETED",
    ]
    endpoint = await emulator.api("GET", "/endpoints/helpdesk365main")
    assert endpoint.status == 200
    assert {k: endpoint.body[k] for k in ("id", "accountId", "phoneNumber", "addressId")} == {
        "id": "helpdesk365main",
        "accountId": ACCOUNT,
        "phoneNumber": "+13215551234",
        "addressId": address_id,
    }
    assert {"name", "lang", "created", "updated", "country"} <= set(endpoint.body)


async def test_orders_can_be_final_at_once(start: StartEmu) -> None:
    emulator = await start(EmulatorOptions(order_polls_until_complete=0))
    await emulator.login()
    accepted = await emulator.add_endpoint("helpdesk365main", await emulator.address())
    assert accepted.body["orderStatus"] == "COMPLETED"


async def test_duplicate_endpoint_id_fails_in_the_order_details(emu: Emu) -> None:
    address_id = await emu.address()
    await emu.finish((await emu.add_endpoint("helpdesk365main", address_id)).body["orderId"])
    again = await emu.add_endpoint("helpdesk365main", address_id, phone="+13215550000")
    assert again.status == 202
    details = await emu.finish(again.body["orderId"])
    assert details["orderStatus"] == "FAILED"
    [result] = details["endpoints"]
    assert result["status"] == "ERROR"
    assert result["errorCode"] == ORDER_ERROR_DUPLICATE_ENDPOINT
    assert "helpdesk365main" in result["error"]
    [endpoint] = (await emu.state())["endpoints"]
    assert endpoint["phoneNumber"] == "+13215551234"


async def test_one_bad_endpoint_makes_the_order_partial(emu: Emu) -> None:
    address_id = await emu.address()
    items = [
        {"id": "goodendpoint1", "phoneNumber": "+13215551234", "addressId": address_id},
        {"id": "badendpoint01", "phoneNumber": "+13215551235", "addressId": "no-such-address"},
    ]
    accepted = await emu.api("POST", "/endpoints", json={"endpoints": items})
    details = await emu.finish(accepted.body["orderId"])
    assert details["orderStatus"] == "PARTIAL"
    assert (details["acceptedCount"], details["invalidCount"]) == (1, 1)
    errors = {r["id"]: r.get("errorCode") for r in details["endpoints"]}
    assert errors == {"goodendpoint1": None, "badendpoint01": ORDER_ERROR_ADDRESS_NOT_FOUND}


async def test_an_invalid_address_cannot_carry_an_endpoint(emu: Emu) -> None:
    invalid = await emu.address({**CARY, "addressLine1": "1 Nowhere St"})
    details = await emu.finish((await emu.add_endpoint("helpdesk365main", invalid)).body["orderId"])
    assert details["endpoints"][0]["errorCode"] == ORDER_ERROR_ADDRESS_NOT_VALID


@pytest.mark.parametrize(
    ("item", "field"),
    [
        ({"id": "short", "phoneNumber": PHONE, "addressId": "a"}, "endpoints[0].id"),
        ({"id": "has-dashes-00", "phoneNumber": PHONE, "addressId": "a"}, "endpoints[0].id"),
        ({"id": "x" * 31, "phoneNumber": PHONE, "addressId": "a"}, "endpoints[0].id"),
        (
            {"id": "helpdesk365", "phoneNumber": "3215551234", "addressId": "a"},
            "endpoints[0].phoneNumber",
        ),
        ({"id": "helpdesk365", "phoneNumber": PHONE}, "endpoints[0].addressId"),
    ],
)
async def test_endpoint_request_validation(emu: Emu, item: dict[str, str], field: str) -> None:
    reply = await emu.api("POST", "/endpoints", json={"endpoints": [item]})
    assert_error(reply, 400, "request-validation", field)
    assert (await emu.state())["orders"] == []


async def test_endpoints_must_be_a_non_empty_array(emu: Emu) -> None:
    reply = await emu.api("POST", "/endpoints", json={"endpoints": []})
    assert_error(reply, 400, "request-validation", "endpoints")


async def test_endpoint_list_pages_with_links(emu: Emu) -> None:
    raleigh = await emu.address()
    cary = await emu.address(CARY)
    for n in range(5):
        await emu.add_endpoint(f"endpoint{n:05d}", raleigh if n < 3 else cary)
    first = await emu.api("GET", "/endpoints", params={"limit": "2"})
    assert [e["id"] for e in first.body["endpoints"]] == ["endpoint00000", "endpoint00001"]
    rels = {link["rel"]: link for link in first.body["links"]}
    assert set(rels) == {"first", "next", "last"}
    assert "offset=2" in rels["next"]["href"] and "region=NA" in rels["next"]["href"]
    last = await emu.api("GET", "/endpoints", params={"limit": "2", "offset": "4"})
    assert [e["id"] for e in last.body["endpoints"]] == ["endpoint00004"]
    assert "next" not in {link["rel"] for link in last.body["links"]}
    assert "previous" in {link["rel"] for link in last.body["links"]}
    at_cary = await emu.api("GET", "/endpoints", params={"addressId": cary})
    assert [e["id"] for e in at_cary.body["endpoints"]] == ["endpoint00003", "endpoint00004"]


async def test_bad_paging_parameters(emu: Emu) -> None:
    reply = await emu.api("GET", "/endpoints", params={"limit": "0"})
    assert_error(reply, 400, "request-validation", "limit")
    reply = await emu.api("GET", "/endpoints", params={"offset": "x"})
    assert_error(reply, 400, "request-validation", "offset")


async def test_patch_re_points_an_endpoint(emu: Emu) -> None:
    raleigh = await emu.address()
    cary = await emu.address(CARY)
    await emu.add_endpoint("helpdesk365main", raleigh)
    accepted = await emu.api(
        "PATCH", "/endpoints/helpdesk365main", json={"action": "PROVISION", "addressId": cary}
    )
    assert (accepted.status, accepted.body["orderType"]) == (202, "UPDATE_ENDPOINTS")
    assert (await emu.finish(accepted.body["orderId"]))["orderStatus"] == "COMPLETED"
    assert (await emu.api("GET", "/endpoints/helpdesk365main")).body["addressId"] == cary


async def test_patch_validates_its_body(emu: Emu) -> None:
    await emu.add_endpoint("helpdesk365main", await emu.address())
    reply = await emu.api(
        "PATCH", "/endpoints/helpdesk365main", json={"action": "MOVE", "addressId": "a"}
    )
    assert_error(reply, 400, "request-validation", "action")
    missing = await emu.api("PATCH", "/endpoints/nosuchendpoint", json={"action": "PROVISION"})
    assert_error(missing, 404, "resource-not-found")


async def test_delete_an_endpoint(emu: Emu) -> None:
    await emu.add_endpoint("helpdesk365main", await emu.address())
    accepted = await emu.api("DELETE", "/endpoints/helpdesk365main")
    assert (accepted.status, accepted.body["orderType"]) == (202, "DELETE_ENDPOINTS")
    assert (await emu.finish(accepted.body["orderId"]))["orderStatus"] == "COMPLETED"
    assert_error(await emu.api("GET", "/endpoints/helpdesk365main"), 404, "resource-not-found")
    assert_error(await emu.api("DELETE", "/endpoints/helpdesk365main"), 404, "resource-not-found")


async def test_bulk_delete_reports_unknown_ids_per_endpoint(emu: Emu) -> None:
    await emu.add_endpoint("helpdesk365main", await emu.address())
    accepted = await emu.api(
        "DELETE", "/endpoints", json={"endpointIds": ["helpdesk365main", "nosuchendpoint"]}
    )
    details = await emu.finish(accepted.body["orderId"])
    assert details["orderStatus"] == "PARTIAL"
    codes = {r["id"]: r.get("errorCode") for r in details["endpoints"]}
    assert codes == {"helpdesk365main": None, "nosuchendpoint": ORDER_ERROR_ENDPOINT_NOT_FOUND}
    assert (await emu.state())["endpoints"] == []


async def test_unknown_ids_and_paths_are_404_in_bandwidth_shape(emu: Emu) -> None:
    assert_error(await emu.api("GET", "/orders/nosuchorder"), 404, "resource-not-found")
    assert_error(await emu.api("GET", "/endpoints/nosuchendpoint"), 404, "resource-not-found")
    unknown = assert_error(await emu.api("GET", "/nothing-here"), 404, "resource-not-found")
    assert unknown == f"/api/v2/accounts/{ACCOUNT}/emergency/nothing-here does not exist"


async def test_wrong_method_is_405_in_bandwidth_shape(emu: Emu) -> None:
    assert_error(await emu.api("PUT", "/endpoints"), 405, "method-not-allowed")


# -- fault injection and admin --------------------------------------------------------------


async def test_injected_429_carries_retry_after_for_count_requests(emu: Emu) -> None:
    added = await emu.admin(
        "POST", "/faults", {"status": 429, "retry_after": 1, "count": 2, "path_prefix": "/api/v2"}
    )
    assert added.status == 201
    for _ in range(2):
        reply = await emu.api("GET", "/endpoints")
        assert_error(reply, 429, "rate-limiting")
        assert reply.body["errors"][0]["code"] == 32002
        assert reply.headers["Retry-After"] == "1"
    assert (await emu.api("GET", "/endpoints")).status == 200
    assert (await emu.admin("GET", "/faults")).body == {"faults": []}


@pytest.mark.parametrize(
    ("status", "error_type"),
    [
        (500, "internal-server-error"),
        (503, "service-unavailable"),
        (401, "authentication-credentials"),
    ],
)
async def test_injected_status_applies_once_by_default(
    emu: Emu, status: int, error_type: str
) -> None:
    await emu.admin("POST", "/faults", {"status": status})
    assert_error(await emu.api("GET", "/endpoints"), status, error_type)
    assert (await emu.api("GET", "/endpoints")).status == 200


async def test_faults_match_on_prefix_and_method(emu: Emu) -> None:
    await emu.admin(
        "POST",
        "/faults",
        [
            {"status": 500, "method": "POST", "path_prefix": ENDPOINTS_PATH},
            {"status": 503, "path_prefix": "/api/v1/oauth2/token"},
        ],
    )
    assert (await emu.api("GET", "/endpoints")).status == 200
    assert (await emu.api("POST", "/addresses", json=CARY)).status == 201
    assert (await emu.add_endpoint("helpdesk365main", "a")).status == 500
    assert (await emu.fetch_token()).status == 503
    assert (await emu.fetch_token()).status == 200


async def test_default_fault_prefix_spares_the_token_endpoint(emu: Emu) -> None:
    await emu.admin("POST", "/faults", {"status": 401})
    assert (await emu.fetch_token()).status == 200
    assert (await emu.api("GET", "/endpoints")).status == 401


async def test_injected_delay_holds_the_answer(emu: Emu) -> None:
    await emu.admin("POST", "/faults", {"delay": 30.0})
    url = f"{emu.base}/api/v2/accounts/{ACCOUNT}/emergency/endpoints?region=NA"
    headers = {"Authorization": f"Bearer {emu.token}"}
    with pytest.raises(asyncio.TimeoutError):
        async with emu.session.get(url, headers=headers, timeout=aiohttp.ClientTimeout(total=0.2)):
            pass
    assert (await emu.api("GET", "/endpoints")).status == 200


async def test_injected_order_error_fails_the_next_order(emu: Emu) -> None:
    address_id = await emu.address()
    await emu.admin(
        "POST", "/faults", {"order_error": "PSAP lookup failed", "order_error_code": 13999}
    )
    details = await emu.finish(
        (await emu.add_endpoint("helpdesk365main", address_id)).body["orderId"]
    )
    assert details["orderStatus"] == "FAILED"
    assert details["endpoints"] == [
        {
            "id": "helpdesk365main",
            "status": "ERROR",
            "error": "PSAP lookup failed",
            "errorCode": 13999,
        }
    ]
    assert (await emu.state())["endpoints"] == []
    second = await emu.add_endpoint("helpdesk365main", address_id)
    assert (await emu.finish(second.body["orderId"]))["orderStatus"] == "COMPLETED"


@pytest.mark.parametrize(
    "spec",
    [
        {"count": 1},
        {"status": 200},
        {"status": 500, "count": 0},
        {"status": 500, "order_error": "x"},
        "nope",
    ],
)
async def test_malformed_faults_are_refused(emu: Emu, spec: Any) -> None:
    assert (await emu.admin("POST", "/faults", spec)).status == 400
    assert (await emu.admin("GET", "/faults")).body == {"faults": []}


async def test_faults_can_be_cleared(emu: Emu) -> None:
    await emu.admin("POST", "/faults", {"status": 500, "count": 5})
    assert (await emu.admin("DELETE", "/faults")).status == 204
    assert (await emu.api("GET", "/endpoints")).status == 200


async def test_state_shows_everything_and_reset_forgets_it(emu: Emu) -> None:
    address_id = await emu.address()
    await emu.add_endpoint("helpdesk365main", address_id)
    state = await emu.state()
    assert state["accountId"] == ACCOUNT
    assert [a["id"] for a in state["addresses"]] == [address_id]
    assert [e["id"] for e in state["endpoints"]] == ["helpdesk365main"]
    [order] = state["orders"]
    assert (order["orderType"], order["polls"]) == ("ADD_ENDPOINTS", 0)
    assert order["endpoints"] == [{"id": "helpdesk365main", "status": "SUCCESS"}]
    assert state["tokensIssued"] == 1
    logged = [(r["method"], r["path"].rsplit("/", 1)[-1], r["status"]) for r in state["requests"]]
    assert logged == [
        ("POST", "token", 200),
        ("POST", "addresses", 201),
        ("POST", "endpoints", 202),
    ]
    assert state["requests"][1]["query"] == "region=NA"

    assert (await emu.admin("POST", "/reset")).status == 204
    state = await emu.state()
    assert (state["addresses"], state["endpoints"], state["orders"], state["requests"]) == (
        [],
        [],
        [],
        [],
    )
    # Tokens survive a reset so a client in another process keeps working.
    assert (await emu.api("GET", "/endpoints")).status == 200


async def test_serve_emulator_reports_its_port_and_stops_on_request() -> None:
    ports: list[int] = []
    ready = asyncio.Event()
    stop = asyncio.Event()

    def on_ready(port: int) -> None:
        ports.append(port)
        ready.set()

    task = asyncio.create_task(
        serve_emulator(EmulatorOptions(), host="127.0.0.1", port=0, ready=on_ready, stop=stop)
    )
    await asyncio.wait_for(ready.wait(), 5)
    [port] = ports
    assert port > 0
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{port}/_emulator/state") as response:
            assert response.status == 200
    stop.set()
    await asyncio.wait_for(task, 5)
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientConnectionError):
            async with session.get(f"http://127.0.0.1:{port}/_emulator/state"):
                pass
