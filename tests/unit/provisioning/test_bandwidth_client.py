"""The Bandwidth client against the emulator over real HTTP on 127.0.0.1.

Time is injected: ``FakeTime.sleep`` records each delay and advances ``FakeTime.clock``
instead of waiting, so back-off, Retry-After, token expiry and order polling are asserted
exactly and nothing really waits (except the one test of a real request timeout).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

import aiohttp
import pytest
from aiohttp import web

from e911_sip.provisioning.bandwidth import (
    AddressRejected,
    AuthenticationFailed,
    BandwidthClient,
    BandwidthError,
    BandwidthOptions,
    Endpoint,
    NotFound,
    OrderFailed,
    ProviderUnavailable,
    RateLimited,
    make_endpoint_id,
)
from e911_sip.provisioning.emulator import (
    ORDER_ERROR_ADDRESS_NOT_FOUND,
    EmulatorOptions,
    build_emulator_app,
)
from e911_sip.provisioning.model import Address, StandardizedAddress

ACCOUNT = "5555555"
RALEIGH = Address(
    line1="900 Main Campus Drive",
    line2="Suite 500",
    city="Raleigh",
    state="NC",
    postal_code="27606",
)
CARY = Address(line1="600 Chatham Street", city="Cary", state="NC", postal_code="27513")
NOWHERE = Address(line1="1 Nowhere Street", city="Cary", state="NC", postal_code="27513")
CUSTOMER = make_endpoint_id("customer", "helpdesk-365")
PHONE = "+13215551234"
ENDPOINT_PREFIX = f"/api/v2/accounts/{ACCOUNT}/emergency/endpoints/"


class FakeTime:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []
        self.rand_value = 0.5

    def clock(self) -> float:
        return self.now

    def rand(self) -> float:
        return self.rand_value

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


@dataclass
class Env:
    base: str
    session: aiohttp.ClientSession
    time: FakeTime
    clients: list[BandwidthClient] = field(default_factory=list)

    def options(self, **overrides: Any) -> BandwidthOptions:
        values: dict[str, Any] = {
            "account_id": ACCOUNT,
            "client_id": "e911-sip-emulator",
            "client_secret": "emulator-secret",
            "api_base": f"{self.base}/api/v2",
            "token_url": f"{self.base}/api/v1/oauth2/token",
        }
        values.update(overrides)
        return BandwidthOptions(**values)

    def client(self, **overrides: Any) -> BandwidthClient:
        client = BandwidthClient(
            self.options(**overrides),
            sleep=self.time.sleep,
            clock=self.time.clock,
            rand=self.time.rand,
        )
        self.clients.append(client)
        return client

    async def fault(self, **spec: Any) -> None:
        async with self.session.post(f"{self.base}/_emulator/faults", json=spec) as response:
            assert response.status == 201, await response.text()

    async def state(self) -> dict[str, Any]:
        async with self.session.get(f"{self.base}/_emulator/state") as response:
            result: dict[str, Any] = await response.json()
            return result

    async def requests(self, method: str, path_pattern: str) -> list[dict[str, Any]]:
        """Logged requests whose path (after /emergency) matches ``path_pattern``."""
        pattern = re.compile(path_pattern)
        return [
            r
            for r in (await self.state())["requests"]
            if r["method"] == method
            and pattern.fullmatch(r["path"].partition("/emergency")[2] or r["path"])
        ]


@pytest.fixture
async def start() -> AsyncIterator[Callable[[EmulatorOptions], Any]]:
    runners: list[web.AppRunner] = []
    envs: list[Env] = []

    async def _start(options: EmulatorOptions) -> Env:
        runner = web.AppRunner(build_emulator_app(options), handler_cancellation=True)
        await runner.setup()
        runners.append(runner)
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        env = Env(f"http://127.0.0.1:{port}", aiohttp.ClientSession(), FakeTime())
        envs.append(env)
        return env

    yield _start
    for env in envs:
        for client in env.clients:
            await client.close()
        await env.session.close()
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
async def env(start: Callable[[EmulatorOptions], Any]) -> Env:
    result: Env = await start(EmulatorOptions())
    return result


# -- addresses: use cases 1.1 and 1.2 -------------------------------------------------------


async def test_use_case_1_1_valid_address_comes_back_standardised(env: Env) -> None:
    client = env.client()
    address = await client.create_address(RALEIGH, description="Helpdesk 365")
    assert address.validation_status == "VALID"
    assert address.one_line == "900 MAIN CAMPUS DR, STE 500, RALEIGH, NC 27606-5177, US"
    assert (address.street_name, address.street_suffix, address.address_line2) == (
        "MAIN CAMPUS",
        "DR",
        "STE 500",
    )
    [stored] = (await env.state())["addresses"]
    assert (stored["id"], stored["description"]) == (address.address_id, "Helpdesk 365")


async def test_use_case_1_3_site_address(env: Env) -> None:
    address = await env.client().create_address(CARY, description="CarryOffice")
    assert address.one_line == "600 CHATHAM ST, CARY, NC 27513, US"


async def test_use_case_1_2_invalid_address_is_rejected_with_the_reason(env: Env) -> None:
    client = env.client()
    with pytest.raises(AddressRejected) as caught:
        await client.create_address(NOWHERE, description="BadOffice")
    assert caught.value.description == (
        "street 1 NOWHERE ST was not found in CARY, NC 27513; "
        "check the house number, street name and ZIP"
    )
    # The refused address is not left behind in the account.
    assert (await env.state())["addresses"] == []
    assert len(await env.requests("DELETE", r"/addresses/[^/]+")) == 1


async def test_malformed_address_400_becomes_address_rejected(env: Env) -> None:
    bad = Address(line1="600 Chatham St", city="Cary", state="NC", postal_code="99999")
    with pytest.raises(AddressRejected) as caught:
        await env.client().create_address(bad, description="x")
    error = caught.value
    assert (error.status, error.type, error.field) == (400, "request-validation", "postalCode")
    assert error.description == "ZIP 99999 is not in NC"
    assert env.time.sleeps == []


async def test_every_problem_of_a_400_is_in_the_description(env: Env) -> None:
    bad = Address(line1="600 Chatham St", city="Cary", state="ZZ", postal_code="123")
    with pytest.raises(AddressRejected) as caught:
        await env.client().create_address(bad, description="x")
    assert caught.value.description == (
        "state ZZ is unknown; ZIP 123 is not a 5-digit ZIP or ZIP+4 (12345-6789)"
    )


async def test_delete_address_twice(env: Env) -> None:
    client = env.client()
    address = await client.create_address(CARY, description="x")
    await client.delete_address(address.address_id)
    await client.delete_address(address.address_id)
    assert (await env.state())["addresses"] == []


# -- endpoints ------------------------------------------------------------------------------


async def test_provision_an_endpoint_and_read_it_back(start: Any) -> None:
    env: Env = await start(EmulatorOptions(order_polls_until_complete=2))
    client = env.client()
    address = await client.create_address(RALEIGH, description="Helpdesk 365")
    endpoint = await client.provision_endpoint(
        endpoint_id=CUSTOMER,
        phone_number="3215551234",
        name="Helpdesk 365",
        address_id=address.address_id,
    )
    assert (endpoint.id, endpoint.phone_number, endpoint.address_id, endpoint.name) == (
        CUSTOMER,
        PHONE,
        address.address_id,
        "Helpdesk 365",
    )
    assert endpoint.provider_endpoint == f"{ACCOUNT}/{CUSTOMER}"
    assert endpoint.created and endpoint.updated
    assert await client.get_endpoint(CUSTOMER) == endpoint
    # The client waited for the order: PROCESSING twice, then COMPLETED, then the details.
    [order] = (await env.state())["orders"]
    assert (order["orderType"], order["polls"]) == ("ADD_ENDPOINTS", 3)
    assert env.time.sleeps == [0.5, 0.5, 0.5]
    assert len(await env.requests("GET", r"/orders/[^/]+/details")) == 1


async def test_get_unknown_endpoint_is_none(env: Env) -> None:
    assert await env.client().get_endpoint("nosuchendpoint") is None


async def test_reprovision_same_id_re_points_instead_of_duplicating(env: Env) -> None:
    client = env.client()
    raleigh = await client.create_address(RALEIGH, description="NCOffice")
    cary = await client.create_address(CARY, description="CarryOffice")
    first = await client.provision_endpoint(
        endpoint_id=CUSTOMER, phone_number=PHONE, name="x", address_id=raleigh.address_id
    )
    again = await client.provision_endpoint(
        endpoint_id=CUSTOMER, phone_number=PHONE, name="x", address_id=raleigh.address_id
    )
    assert again == first
    moved = await client.provision_endpoint(
        endpoint_id=CUSTOMER, phone_number=PHONE, name="x", address_id=cary.address_id
    )
    assert (moved.id, moved.address_id) == (CUSTOMER, cary.address_id)
    state = await env.state()
    assert [(e["id"], e["addressId"]) for e in state["endpoints"]] == [(CUSTOMER, cary.address_id)]
    assert [o["orderType"] for o in state["orders"]] == ["ADD_ENDPOINTS", "UPDATE_ENDPOINTS"]
    assert len(await env.requests("PATCH", r"/endpoints/\w+")) == 1


async def test_post_that_meets_an_existing_endpoint_falls_back_to_patch(env: Env) -> None:
    client = env.client()
    raleigh = await client.create_address(RALEIGH, description="x")
    cary = await client.create_address(CARY, description="x")
    await client.provision_endpoint(
        endpoint_id=CUSTOMER, phone_number=PHONE, name="x", address_id=raleigh.address_id
    )
    # The existence check misses the endpoint (as after a timed-out POST that Bandwidth
    # accepted): the new POST fails as a duplicate, and the client re-points it instead.
    await env.fault(status=404, count=1, method="GET", path_prefix=ENDPOINT_PREFIX)
    endpoint = await client.provision_endpoint(
        endpoint_id=CUSTOMER, phone_number=PHONE, name="x", address_id=cary.address_id
    )
    assert endpoint.address_id == cary.address_id
    orders = (await env.state())["orders"]
    assert [(o["orderType"], o["orderStatus"]) for o in orders] == [
        ("ADD_ENDPOINTS", "COMPLETED"),
        ("ADD_ENDPOINTS", "FAILED"),
        ("UPDATE_ENDPOINTS", "COMPLETED"),
    ]
    assert len((await env.state())["endpoints"]) == 1


async def test_phone_number_change_recreates_the_endpoint(env: Env) -> None:
    client = env.client()
    address = await client.create_address(CARY, description="x")
    await client.provision_endpoint(
        endpoint_id=CUSTOMER, phone_number=PHONE, name="x", address_id=address.address_id
    )
    endpoint = await client.provision_endpoint(
        endpoint_id=CUSTOMER, phone_number="+13215550000", name="x", address_id=address.address_id
    )
    assert endpoint.phone_number == "+13215550000"
    state = await env.state()
    assert [e["phoneNumber"] for e in state["endpoints"]] == ["+13215550000"]
    assert [o["orderType"] for o in state["orders"]] == [
        "ADD_ENDPOINTS",
        "DELETE_ENDPOINTS",
        "ADD_ENDPOINTS",
    ]


async def test_delete_endpoint_and_delete_again(env: Env) -> None:
    client = env.client()
    address = await client.create_address(CARY, description="x")
    await client.provision_endpoint(
        endpoint_id=CUSTOMER, phone_number=PHONE, name="x", address_id=address.address_id
    )
    await client.delete_endpoint(CUSTOMER)
    assert await client.get_endpoint(CUSTOMER) is None
    await client.delete_endpoint(CUSTOMER)
    deletes = await env.requests("DELETE", r"/endpoints/\w+")
    assert [r["status"] for r in deletes] == [202, 404]
    assert (await env.state())["endpoints"] == []


async def test_list_endpoints_follows_the_pages(env: Env) -> None:
    client = env.client(page_size=2)
    raleigh = await client.create_address(RALEIGH, description="x")
    cary = await client.create_address(CARY, description="x")
    ids = [make_endpoint_id("account", str(n)) for n in range(5)]
    for n, endpoint_id in enumerate(ids):
        await client.provision_endpoint(
            endpoint_id=endpoint_id,
            phone_number=f"+1321555000{n}",
            name="x",
            address_id=(raleigh if n < 3 else cary).address_id,
        )
    listed = await client.list_endpoints()
    assert [e.id for e in listed] == ids
    pages = await env.requests("GET", "/endpoints")
    offsets = [dict(parse_qsl(r["query"]))["offset"] for r in pages]
    assert offsets == ["0", "2", "4"]
    at_cary = await client.list_endpoints(address_id=cary.address_id)
    assert [e.id for e in at_cary] == ids[3:]


async def test_list_stops_when_the_links_have_no_next(env: Env) -> None:
    client = env.client(page_size=2)
    address = await client.create_address(CARY, description="x")
    for n in range(4):
        await client.provision_endpoint(
            endpoint_id=make_endpoint_id("site", str(n)),
            phone_number=f"+1321555000{n}",
            name="x",
            address_id=address.address_id,
        )
    assert len(await client.list_endpoints()) == 4
    assert len(await env.requests("GET", "/endpoints")) == 2


async def test_list_of_an_empty_account(env: Env) -> None:
    assert await env.client().list_endpoints() == []


# -- orders ---------------------------------------------------------------------------------


async def test_failed_order_raises_order_failed_with_bandwidths_error(env: Env) -> None:
    with pytest.raises(OrderFailed) as caught:
        await env.client().provision_endpoint(
            endpoint_id=CUSTOMER, phone_number=PHONE, name="x", address_id="no-such-address"
        )
    error = caught.value
    assert error.code == ORDER_ERROR_ADDRESS_NOT_FOUND
    assert error.description == "address no-such-address does not exist"
    assert (error.order_status, error.endpoint_id) == ("FAILED", CUSTOMER)
    assert error.order_id == (await env.state())["orders"][0]["orderId"]


async def test_order_error_text_and_code_pass_through(env: Env) -> None:
    client = env.client()
    address = await client.create_address(CARY, description="x")
    await env.fault(order_error="PSAP lookup failed", order_error_code=13999)
    with pytest.raises(OrderFailed) as caught:
        await client.provision_endpoint(
            endpoint_id=CUSTOMER, phone_number=PHONE, name="x", address_id=address.address_id
        )
    assert (caught.value.description, caught.value.code) == ("PSAP lookup failed", 13999)
    assert await client.get_endpoint(CUSTOMER) is None


async def test_order_wait_is_bounded(start: Any) -> None:
    env: Env = await start(EmulatorOptions(order_polls_until_complete=1000))
    client = env.client(order_timeout=5.0, order_poll_interval=1.0)
    address = await client.create_address(CARY, description="x")
    with pytest.raises(ProviderUnavailable) as caught:
        await client.provision_endpoint(
            endpoint_id=CUSTOMER, phone_number=PHONE, name="x", address_id=address.address_id
        )
    assert caught.value.type == "order-timeout"
    assert env.time.sleeps == [1.0] * 5
    assert (await env.state())["orders"][0]["polls"] == 5


# -- tokens ---------------------------------------------------------------------------------


async def test_one_token_serves_many_calls(env: Env) -> None:
    client = env.client()
    address = await client.create_address(CARY, description="x")
    await client.provision_endpoint(
        endpoint_id=CUSTOMER, phone_number=PHONE, name="x", address_id=address.address_id
    )
    await client.list_endpoints()
    await client.get_endpoint(CUSTOMER)
    assert (await env.state())["tokensIssued"] == 1


async def test_token_is_sent_as_basic_auth_client_credentials(env: Env) -> None:
    await env.client().list_endpoints()
    [token_request] = await env.requests("POST", "/api/v1/oauth2/token")
    assert token_request["status"] == 200
    [listing] = await env.requests("GET", "/endpoints")
    assert "region=NA" in listing["query"]


async def test_token_is_refreshed_the_margin_before_expiry(env: Env) -> None:
    client = env.client(token_refresh_margin=60.0)
    await client.list_endpoints()
    env.time.now = 3600 - 60 - 0.001
    await client.list_endpoints()
    assert (await env.state())["tokensIssued"] == 1
    env.time.now = 3600 - 60
    await client.list_endpoints()
    assert (await env.state())["tokensIssued"] == 2


async def test_margin_longer_than_a_short_token_is_capped_at_half_its_life(start: Any) -> None:
    env: Env = await start(EmulatorOptions(token_ttl=60))
    client = env.client(token_refresh_margin=300.0)
    await client.list_endpoints()
    env.time.now = 29.9
    await client.list_endpoints()
    assert (await env.state())["tokensIssued"] == 1
    env.time.now = 30.0
    await client.list_endpoints()
    assert (await env.state())["tokensIssued"] == 2


async def test_401_refreshes_the_token_once_and_succeeds(env: Env) -> None:
    client = env.client()
    await client.list_endpoints()
    await env.fault(status=401, count=1)
    assert await client.list_endpoints() == []
    assert (await env.state())["tokensIssued"] == 2
    assert [r["status"] for r in await env.requests("GET", "/endpoints")] == [200, 401, 200]


async def test_401_after_refresh_is_authentication_failed(env: Env) -> None:
    client = env.client()
    await env.fault(status=401, count=2)
    with pytest.raises(AuthenticationFailed) as caught:
        await client.list_endpoints()
    assert (caught.value.status, caught.value.type) == (401, "authentication-credentials")
    assert (await env.state())["tokensIssued"] == 2
    assert len(await env.requests("GET", "/endpoints")) == 2
    assert env.time.sleeps == []


async def test_wrong_credentials_are_authentication_failed_without_retry(env: Env) -> None:
    with pytest.raises(AuthenticationFailed) as caught:
        await env.client(client_secret="wrong").list_endpoints()
    assert caught.value.status == 401
    assert len(await env.requests("POST", "/api/v1/oauth2/token")) == 1


async def test_another_account_is_authentication_failed(env: Env) -> None:
    with pytest.raises(AuthenticationFailed) as caught:
        await env.client(account_id="9999999").list_endpoints()
    assert (caught.value.status, caught.value.type) == (403, "forbidden")


# -- retries --------------------------------------------------------------------------------


async def test_429_honours_retry_after(env: Env) -> None:
    await env.fault(status=429, retry_after=7, count=2)
    assert await env.client().list_endpoints() == []
    assert env.time.sleeps == [7.0, 7.0]


class HeldTime(FakeTime):
    """Sleeps are recorded and then wait for ``release``, so a test can look at what other
    callers do while one of them backs off."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        await self.release.wait()
        self.now = max(self.now, seconds)


async def _until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(10):
        while not condition():
            await asyncio.sleep(0.01)


async def test_a_429_holds_every_caller_of_the_client(env: Env) -> None:
    """One call's 429 and Retry-After gate the others: they wait instead of sending."""
    held = HeldTime()
    env.time = held
    client = env.client()
    await client.list_endpoints()  # the token, so only the calls under test remain
    await env.fault(status=429, retry_after=5, count=1, path_prefix=ENDPOINT_PREFIX)
    first = asyncio.create_task(client.get_endpoint(CUSTOMER))
    await _until(lambda: held.sleeps == [5.0])
    second = asyncio.create_task(client.list_endpoints())
    await _until(lambda: len(held.sleeps) == 2)
    # The second caller waits out the same five seconds and has sent nothing yet.
    assert held.sleeps == [5.0, 5.0]
    assert len(await env.requests("GET", "/endpoints")) == 1
    held.release.set()
    assert await first is None
    assert await second == []
    assert len(await env.requests("GET", "/endpoints/.*")) == 2
    assert len(await env.requests("GET", "/endpoints")) == 2


async def test_without_a_429_callers_are_not_held(env: Env) -> None:
    await env.fault(status=500, count=1)
    client = env.client(backoff_base=0.5)
    results = await asyncio.gather(client.list_endpoints(), client.list_endpoints())
    assert results == [[], []]
    # Only the caller that met the 500 backed off; a 5xx does not gate the others.
    assert env.time.sleeps == [0.25]


async def test_5xx_is_retried_with_exponential_backoff_and_jitter(env: Env) -> None:
    await env.fault(status=500, count=2)
    env.time.rand_value = 0.5
    assert await env.client(backoff_base=0.5).list_endpoints() == []
    assert env.time.sleeps == [0.25, 0.5]


async def test_backoff_is_capped_before_jitter(env: Env) -> None:
    await env.fault(status=503, count=4)
    env.time.rand_value = 1.0
    await env.client(backoff_base=1.0, backoff_cap=3.0, max_attempts=5).list_endpoints()
    assert env.time.sleeps == [1.0, 2.0, 3.0, 3.0]


async def test_5xx_exhausting_attempts_is_provider_unavailable(env: Env) -> None:
    await env.fault(status=500, count=10)
    with pytest.raises(ProviderUnavailable) as caught:
        await env.client(max_attempts=3).list_endpoints()
    assert (caught.value.status, caught.value.type) == (500, "internal-server-error")
    assert len(await env.requests("GET", "/endpoints")) == 3
    assert len(env.time.sleeps) == 2


async def test_429_exhausting_attempts_is_rate_limited(env: Env) -> None:
    await env.fault(status=429, retry_after=2, count=10)
    with pytest.raises(RateLimited) as caught:
        await env.client(max_attempts=3).list_endpoints()
    assert (caught.value.status, caught.value.code, caught.value.retry_after) == (429, 32002, 2.0)
    assert env.time.sleeps == [2.0, 2.0]


async def test_retry_after_beyond_the_time_budget_stops_retrying(env: Env) -> None:
    await env.fault(status=429, retry_after=20, count=10)
    with pytest.raises(RateLimited):
        await env.client(max_attempts=10, max_retry_time=30.0).list_endpoints()
    assert env.time.sleeps == [20.0]
    assert len(await env.requests("GET", "/endpoints")) == 2


async def test_backoff_beyond_the_time_budget_stops_retrying(env: Env) -> None:
    await env.fault(status=502, count=10)
    env.time.rand_value = 1.0
    client = env.client(max_attempts=10, max_retry_time=10.0, backoff_base=4.0, backoff_cap=60)
    with pytest.raises(ProviderUnavailable):
        await client.list_endpoints()
    assert env.time.sleeps == [4.0]


async def test_other_4xx_are_not_retried(env: Env) -> None:
    client = env.client()
    address = await client.create_address(CARY, description="x")
    with pytest.raises(BandwidthError) as caught:
        await client.provision_endpoint(
            endpoint_id=CUSTOMER, phone_number="12345", name="x", address_id=address.address_id
        )
    error = caught.value
    assert type(error) is BandwidthError
    assert (error.status, error.field) == (400, "endpoints[0].phoneNumber")
    assert len(await env.requests("POST", "/endpoints")) == 1
    assert env.time.sleeps == []


SLOW_ANSWER_TIMEOUT = 2.0
"""Seconds before a held answer counts as a timeout: the one real wait of this module."""


async def test_slow_answer_times_out_and_is_retried(env: Env) -> None:
    # Every exchange this call makes (the token, the held answer, its retry) shares the one
    # request_timeout; it is long enough that only the held answer can reach it on a host
    # that leaves the loop unscheduled for a while, so the call waits it out once.
    await env.fault(delay=30.0, count=1)
    assert await env.client(request_timeout=SLOW_ANSWER_TIMEOUT).list_endpoints() == []
    assert env.time.sleeps == [0.25]


async def test_timeouts_exhausting_attempts_are_provider_unavailable(env: Env) -> None:
    await env.fault(delay=30.0, count=2)
    with pytest.raises(ProviderUnavailable) as caught:
        await env.client(request_timeout=0.1, max_attempts=2).list_endpoints()
    assert caught.value.type == "timeout"
    assert isinstance(caught.value.__cause__, asyncio.TimeoutError)


async def test_connection_refused_is_provider_unavailable(env: Env) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    dead = f"http://127.0.0.1:{closed_port}"
    client = env.client(
        api_base=f"{dead}/api/v2", token_url=f"{dead}/api/v1/oauth2/token", max_attempts=3
    )
    with pytest.raises(ProviderUnavailable) as caught:
        await client.list_endpoints()
    assert caught.value.type == "connection"
    assert len(env.time.sleeps) == 2


# -- lifecycle, logging, ids, data types ----------------------------------------------------


async def test_close_leaves_a_borrowed_session_open(env: Env) -> None:
    async with aiohttp.ClientSession() as session:
        client = BandwidthClient(env.options(), session=session, sleep=env.time.sleep)
        async with client:
            await client.list_endpoints()
        assert not session.closed


async def test_a_closed_client_refuses_calls(env: Env) -> None:
    client = env.client()
    async with client:
        await client.list_endpoints()
    with pytest.raises(BandwidthError):
        await client.list_endpoints()


async def test_logs_hold_no_secret_and_no_token(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="e911_sip.bandwidth")
    client = env.client(client_secret="emulator-secret")
    await client.list_endpoints()
    await env.fault(status=401, count=1)
    await env.fault(status=500, count=1)
    await client.list_endpoints()
    records = [r for r in caplog.records if r.name == "e911_sip.bandwidth"]
    assert any("401" in r.getMessage() for r in records)
    assert any("retrying" in r.getMessage() for r in records)
    # The access token is private state; it is read here only to prove it is never logged.
    token = client._token.value if client._token else ""
    assert token
    text = "\n".join(r.getMessage() for r in records)
    assert "emulator-secret" not in text
    assert token not in text


def test_make_endpoint_id_is_stable_unique_and_well_formed() -> None:
    ids = {
        make_endpoint_id(kind, entity)
        for kind in ("customer", "site", "account")
        for entity in ("1", "2", "helpdesk-365", "x" * 200)
    }
    assert len(ids) == 12
    for endpoint_id in ids:
        assert re.fullmatch(r"[A-Za-z0-9]{10,30}", endpoint_id)
    assert make_endpoint_id("customer", "1") == make_endpoint_id("customer", "1")
    assert make_endpoint_id("site", "1").startswith("site")
    with pytest.raises(ValueError):
        make_endpoint_id("", "1")
    with pytest.raises(ValueError):
        make_endpoint_id("site", "")


def test_make_endpoint_id_never_changes() -> None:
    # Ids already provisioned in Bandwidth must stay reachable after an upgrade.
    assert make_endpoint_id("customer", "helpdesk-365") == CUSTOMER
    digest = hashlib.sha256(b"customer\x00helpdesk-365").hexdigest()
    assert CUSTOMER == "cust" + digest[:26]


async def test_malformed_endpoint_ids_never_reach_a_url(env: Env) -> None:
    client = env.client()
    with pytest.raises(ValueError):
        await client.get_endpoint("../addresses")
    with pytest.raises(ValueError):
        await client.delete_endpoint("short")


def test_standard_address_round_trips_through_a_dict() -> None:
    address = StandardizedAddress(
        address_id="a1",
        validation_status="VALID",
        one_line="900 MAIN CAMPUS DR, STE 500, RALEIGH, NC 27606-5177, US",
        house_number="900",
        predirectional="",
        street_name="MAIN CAMPUS",
        street_suffix="DR",
        postdirectional="",
        address_line2="STE 500",
        city="RALEIGH",
        state="NC",
        postal_code="27606-5177",
        country="US",
    )
    data = address.to_dict()
    assert data["street_name"] == "MAIN CAMPUS"
    assert StandardizedAddress.from_dict(data) == address
    assert address.street_line == "900 MAIN CAMPUS DR"


def test_endpoint_provider_endpoint() -> None:
    endpoint = Endpoint(
        id="custabc1234567",
        account_id="555555",
        phone_number=PHONE,
        name="x",
        address_id="a1",
        created="",
        updated="",
    )
    assert endpoint.provider_endpoint == "555555/custabc1234567"


def test_not_found_is_a_bandwidth_error() -> None:
    error = NotFound("gone", status=404, type="resource-not-found", code=14004)
    assert isinstance(error, BandwidthError)
    assert (str(error), error.status, error.code) == ("gone", 404, 14004)
