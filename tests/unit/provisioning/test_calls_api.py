"""GET /v1/calls over real HTTP on 127.0.0.1, and the cascade level provisioning adds."""

from __future__ import annotations

from typing import Any

import aiohttp
from aiohttp.test_utils import TestServer

from e911_sip.callrecords.book import CallRecord, TrunkAttempt, iso_time
from e911_sip.provisioning.api import build_provisioning_app, openapi_document
from e911_sip.provisioning.calls import (
    CallQuery,
    CallStoreError,
    MemoryCallStore,
    level_resolver,
)
from tests.unit.provisioning.test_api import PORTAL, TOKENS
from tests.unit.provisioning.test_service import LINE, emulator, helpdesk, make_world

T0 = 1_795_000_000.0


def record(n: int, caller: str = LINE, endpoint: str | None = "5555555/1") -> CallRecord:
    return CallRecord(
        call_id=f"call-{n}",
        number="911",
        invite_at=T0 + n,
        caller=caller,
        provider_endpoint=endpoint,
        outcome="enriched" if endpoint else "no_location",
        trunks=[
            TrunkAttempt("sip:a.example", 1, True, "503"),
            TrunkAttempt("sip:b", 2, True, "200"),
        ],
        status=200,
        answered_at=T0 + n + 1,
        bye_at=T0 + n + 9,
        end="bye",
    )


class Unavailable(MemoryCallStore):
    async def query(self, query: CallQuery) -> list[CallRecord]:
        raise CallStoreError("redis down")


async def get(
    server: TestServer, path: str, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(
            str(server.make_url(path)), headers=PORTAL if headers is None else headers
        ) as response,
    ):
        return response.status, await response.json()


async def test_calls_are_paged_filtered_and_need_a_token() -> None:
    store = MemoryCallStore()
    await store.append([record(n, caller=LINE if n % 2 == 0 else "9195550100") for n in range(5)])
    async with emulator() as bw:
        world = make_world(bw)
        server = TestServer(
            build_provisioning_app(world.service, tokens=TOKENS, calls=store), host="127.0.0.1"
        )
        await server.start_server()
        try:
            status, body = await get(server, "/v1/calls", headers={})
            assert status == 401

            status, body = await get(server, f"/v1/calls?caller={LINE}&limit=2")
            assert status == 200
            assert [c["call_id"] for c in body["calls"]] == ["call-0", "call-2"]
            assert body["calls"][0] == record(0).to_dict()
            cursor = body["next_cursor"]
            status, body = await get(server, f"/v1/calls?caller={LINE}&limit=2&cursor={cursor}")
            assert [c["call_id"] for c in body["calls"]] == ["call-4"]
            assert body["next_cursor"] is None

            since, until = iso_time(T0 + 1), iso_time(T0 + 3)
            status, body = await get(server, f"/v1/calls?since={since}&until={until}")
            assert [c["call_id"] for c in body["calls"]] == ["call-1", "call-2"]

            for bad in ("since=yesterday", "caller=12", "limit=0", "limit=5000", "cursor=x"):
                status, body = await get(server, f"/v1/calls?{bad}")
                assert status == 422, bad
                assert body["error"]["field"] == bad.split("=")[0]
        finally:
            await server.close()

        down = TestServer(
            build_provisioning_app(world.service, tokens=TOKENS, calls=Unavailable()),
            host="127.0.0.1",
        )
        await down.start_server()
        try:
            status, body = await get(down, "/v1/calls")
            assert status == 503 and body["error"]["code"] == "unavailable"
        finally:
            await down.close()


async def test_level_is_the_cascade_level_of_the_endpoint_the_call_carried() -> None:
    async with emulator() as bw:
        world = make_world(bw)
        service = world.service
        await helpdesk(world)
        state, _ = await service.get_account(LINE)
        endpoint = state.customer.endpoint.provider_endpoint if state.customer.endpoint else None
        assert endpoint is not None
        resolve = level_resolver(service)
        assert await resolve(record(1, endpoint=endpoint)) == "customer"
        assert await resolve(record(1, endpoint="5555555/old")) is None
        assert await resolve(record(1, caller="9195550100", endpoint=endpoint)) is None
        assert await resolve(record(1, endpoint=None)) is None


def test_openapi_documents_the_calls_route() -> None:
    operation = openapi_document()["paths"]["/v1/calls"]["get"]
    names = {p["name"] for p in operation["parameters"]}
    assert names == {"since", "until", "caller", "cursor", "limit"}
    assert operation["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/CallList"
    }
