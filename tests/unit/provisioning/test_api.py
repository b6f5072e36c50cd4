"""The provisioning HTTP API over real HTTP on 127.0.0.1, with the Bandwidth emulator behind it."""

from __future__ import annotations

import asyncio
import inspect
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from multidict import CIMultiDictProxy

from e911_sip.provisioning.api import (
    PUBLIC_PATHS,
    Route,
    _Handlers,
    build_provisioning_app,
    merge_patch,
    openapi_document,
    operation,
    routes,
)
from e911_sip.provisioning.model import CustomerState
from e911_sip.provisioning.service import ProvisioningService, ServiceOptions
from e911_sip.provisioning.state import MemoryStateStore
from tests.unit.provisioning.test_service import (
    ACCOUNT,
    CARY_STD,
    CUSTOMER_EP,
    LINE,
    LINE2,
    RALEIGH_STD,
    SITE_EP,
    Bw,
    World,
    emulator,
    make_world,
)

TOKENS = {"s3cret-portal-token": "self-care-portal", "s3cret-ops-token": "noc-operator"}
PORTAL = {"Authorization": "Bearer s3cret-portal-token"}
OPS = {"Authorization": "Bearer s3cret-ops-token"}

RALEIGH = {
    "line1": "900 Main Campus Drive",
    "line2": "Suite 500",
    "city": "Raleigh",
    "state": "NC",
    "postal_code": "27606",
    "country": "US",
}
CARY = {"line1": "600 Chatham Street", "city": "Cary", "state": "NC", "postal_code": "27513"}
NOWHERE = {"line1": "1 Nowhere Street", "city": "Cary", "state": "NC", "postal_code": "27513"}


@dataclass
class Api:
    world: World
    server: TestServer
    session: aiohttp.ClientSession

    def url(self, path: str) -> str:
        return str(self.server.make_url(path))

    async def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        headers: dict[str, str] | None = None,
        data: bytes | None = None,
    ) -> tuple[int, Any, CIMultiDictProxy[str]]:
        kwargs: dict[str, Any] = {"headers": PORTAL if headers is None else headers}
        if data is not None:
            kwargs["data"] = data
        elif body is not None:
            kwargs["json"] = body
        async with self.session.request(method, self.url(path), **kwargs) as response:
            text = await response.text()
            payload = None
            if text and response.content_type == "application/json":
                payload = await response.json()
            return response.status, payload, response.headers


@pytest.fixture
async def bw() -> AsyncIterator[Bw]:
    async with emulator() as running:
        yield running


async def start_api(world: World) -> AsyncIterator[Api]:
    server = TestServer(build_provisioning_app(world.service, tokens=TOKENS), host="127.0.0.1")
    await server.start_server()
    session = aiohttp.ClientSession()
    try:
        yield Api(world, server, session)
    finally:
        await session.close()
        await server.close()


@pytest.fixture
async def api(bw: Bw) -> AsyncIterator[Api]:
    async for running in start_api(make_world(bw)):
        yield running


async def helpdesk(api: Api) -> None:
    status, _, _ = await api.call("PUT", "/v1/customers/hd365", {"name": "Helpdesk 365"})
    assert status == 201
    status, _, _ = await api.call(
        "PUT", f"/v1/accounts/{LINE}", {"customer_id": "hd365", "name": "ext 1000"}
    )
    assert status == 201
    status, _, _ = await api.call("PATCH", "/v1/customers/hd365", {"address": RALEIGH})
    assert status == 200


# --- authentication ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "error"),
    [
        ({}, None),
        ({"Authorization": "Bearer wrong"}, "invalid_token"),
        ({"Authorization": "Basic czNjcmV0LXBvcnRhbC10b2tlbjo="}, "invalid_token"),
        ({"Authorization": "Bearer "}, "invalid_token"),
    ],
)
async def test_requests_without_a_valid_token_are_401_and_change_nothing(
    api: Api, headers: dict[str, str], error: str | None
) -> None:
    status, body, response_headers = await api.call(
        "PUT", "/v1/customers/hd365", {"address": RALEIGH}, headers=headers
    )
    assert status == 401
    assert body["error"]["code"] == "unauthorized"
    challenge = response_headers["WWW-Authenticate"]
    assert challenge.startswith("Bearer ")
    assert (f'error="{error}"' in challenge) == (error is not None)
    assert await api.world.state.customer_ids() == []
    assert (await api.world.bw.state())["requests"] == []


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}])
async def test_an_unknown_path_is_404_with_or_without_a_token(
    api: Api, headers: dict[str, str]
) -> None:
    for path in ("/v1/nowhere", "/v2/customers", "/v1/customers/hd365/nothing"):
        status, body, response_headers = await api.call("GET", path, headers=headers)
        assert status == 404 and body["error"]["code"] == "not_found", path
        assert "WWW-Authenticate" not in response_headers
    status, body, response_headers = await api.call("POST", "/v1/customers", headers=headers)
    assert status == 405 and "GET" in response_headers["Allow"]


@pytest.mark.parametrize("path", ["/v1/customers", "/v1/audit", "/v1/accounts/1321551234"])
async def test_reads_are_protected_too(api: Api, path: str) -> None:
    status, _, _ = await api.call("GET", path, headers={})
    assert status == 401


@pytest.mark.parametrize("path", sorted(PUBLIC_PATHS))
async def test_health_and_openapi_are_public(api: Api, path: str) -> None:
    status, body, _ = await api.call("GET", path, headers={})
    assert status == 200 and isinstance(body, dict)


def test_tokens_must_be_usable() -> None:
    with pytest.raises(ValueError):
        build_provisioning_app(object(), tokens={"": "x"})  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        build_provisioning_app(object(), tokens={"token": ""})  # type: ignore[arg-type]


async def test_the_token_name_is_the_audit_who(api: Api) -> None:
    await helpdesk(api)
    # A merge patch: line2 must be removed explicitly, or Suite 500 would stay.
    cary = {**CARY, "line2": None}
    status, _, _ = await api.call("PATCH", "/v1/customers/hd365", {"address": cary}, headers=OPS)
    assert status == 200
    status, body, _ = await api.call("GET", f"/v1/audit?line={LINE}")
    assert status == 200
    assert [(e["who"], e["address"]) for e in body["entries"]] == [
        ("self-care-portal", RALEIGH_STD),
        ("noc-operator", CARY_STD),
    ]


# --- PATCH is a JSON merge patch (RFC 7386) ----------------------------------------------------


@pytest.mark.parametrize(
    ("target", "patch", "result"),
    [  # RFC 7386 Appendix A
        ({"a": "b"}, {"a": "c"}, {"a": "c"}),
        ({"a": "b"}, {"b": "c"}, {"a": "b", "b": "c"}),
        ({"a": "b"}, {"a": None}, {}),
        ({"a": "b", "b": "c"}, {"a": None}, {"b": "c"}),
        ({"a": ["b"]}, {"a": "c"}, {"a": "c"}),
        ({"a": "c"}, {"a": ["b"]}, {"a": ["b"]}),
        ({"a": {"b": "c"}}, {"a": {"b": "d", "c": None}}, {"a": {"b": "d"}}),
        ({"a": [{"b": "c"}]}, {"a": [1]}, {"a": [1]}),
        (["a", "b"], ["c", "d"], ["c", "d"]),
        ({"a": "b"}, ["c"], ["c"]),
        ({"a": "foo"}, None, None),
        ({"a": "foo"}, "bar", "bar"),
        ({"e": None}, {"a": 1}, {"e": None, "a": 1}),
        ([1, 2], {"a": "b", "c": None}, {"a": "b"}),
        ({}, {"a": {"bb": {"ccc": None}}}, {"a": {"bb": {}}}),
    ],
)
def test_merge_patch_follows_rfc_7386(target: Any, patch: Any, result: Any) -> None:
    assert merge_patch(target, patch) == result


async def test_patch_of_a_nested_address_changes_only_the_members_given(api: Api) -> None:
    await helpdesk(api)
    await api.call("PATCH", "/v1/customers/hd365", {"callback_number": "9195550100"})
    status, body, _ = await api.call(
        "PATCH",
        "/v1/customers/hd365",
        data=b'{"address": {"line2": "Suite 600"}}',
        headers={**PORTAL, "Content-Type": "application/merge-patch+json"},
    )
    assert status == 200, body
    assert body["address"] == {**RALEIGH, "line2": "Suite 600"}
    assert body["name"] == "Helpdesk 365" and body["callback_number"] == "9195550100"
    assert body["standardized_address"]["one_line"].startswith("900 MAIN CAMPUS DR, STE 600,")
    # null removes a member: the callback goes, the rest stays
    status, body, _ = await api.call("PATCH", "/v1/customers/hd365", {"callback_number": None})
    assert status == 200
    assert body["callback_number"] is None and body["name"] == "Helpdesk 365"
    assert body["address"]["line2"] == "Suite 600"


async def test_patch_merges_sites_and_accounts_too(api: Api) -> None:
    await helpdesk(api)
    await api.call("PUT", "/v1/customers/hd365/sites/cary", {"name": "Cary", "address": CARY})
    status, body, _ = await api.call(
        "PATCH", "/v1/customers/hd365/sites/cary", {"address": {"line2": "Floor 2"}}
    )
    assert status == 200 and body["address"] == {**CARY, "line2": "Floor 2", "country": "US"}
    assert body["name"] == "Cary"
    await api.call(
        "PATCH",
        f"/v1/accounts/{LINE}",
        {"site_id": "cary", "contacts": {"emails": ["desk@example.com"]}},
    )
    status, body, _ = await api.call(
        "PATCH", f"/v1/accounts/{LINE}", {"contacts": {"sms": ["9195550100"]}}
    )
    assert status == 200
    assert body["contacts"] == {
        "emails": ["desk@example.com"],
        "sms": ["9195550100"],
        "webhooks": [],
    }
    assert body["site_id"] == "cary" and body["name"] == "ext 1000"


async def test_concurrent_patches_to_one_object_both_take_effect(api: Api) -> None:
    await helpdesk(api)
    patches = [
        {"contacts": {"emails": ["desk@example.com"]}},
        {"contacts": {"sms": ["9195550100"]}},
        {"contacts": {"webhooks": ["https://hooks.example.com/e911"]}},
        {"name": "Helpdesk 365 East"},
    ]
    results = await asyncio.gather(*(api.call("PATCH", "/v1/customers/hd365", p) for p in patches))
    assert [status for status, _, _ in results] == [200] * len(patches)
    _, body, _ = await api.call("GET", "/v1/customers/hd365")
    assert body["contacts"] == {
        "emails": ["desk@example.com"],
        "sms": ["9195550100"],
        "webhooks": ["https://hooks.example.com/e911"],
    }
    assert body["name"] == "Helpdesk 365 East" and body["address"] == RALEIGH


async def test_patched_result_is_checked_as_a_put_and_nothing_changes(api: Api) -> None:
    await api.call("PUT", "/v1/customers/hd365", {"name": "Helpdesk 365"})
    status, body, _ = await api.call(
        "PATCH", "/v1/customers/hd365", {"address": {"line2": "Apt 4"}}
    )
    # The customer has no address to merge into: the result lacks line1, as a PUT would.
    assert status == 422 and body["error"]["field"] == "address.line1"
    await helpdesk_line(api)
    status, body, _ = await api.call("PATCH", f"/v1/accounts/{LINE}", {"customer_id": "other"})
    assert status == 409 and body["error"]["code"] == "customer_change"
    status, body, _ = await api.call("PATCH", "/v1/customers/hd365", {"bogus": 1})
    assert status == 422 and body["error"]["field"] == "bogus"
    _, customer, _ = await api.call("GET", "/v1/customers/hd365")
    assert customer["address"] is None and customer["name"] == "Helpdesk 365"


async def helpdesk_line(api: Api) -> None:
    status, _, _ = await api.call("PUT", f"/v1/accounts/{LINE}", {"customer_id": "hd365"})
    assert status == 201


@pytest.mark.parametrize(
    ("method", "path", "content_type"),
    [
        ("PATCH", "/v1/customers/hd365", "text/plain"),
        ("PATCH", "/v1/customers/hd365", None),
        ("PUT", "/v1/customers/hd365", "application/merge-patch+json"),
        ("PUT", "/v1/customers/hd365", "application/x-www-form-urlencoded"),
        ("PUT", f"/v1/accounts/{LINE}", "text/plain"),
    ],
)
async def test_a_body_of_the_wrong_type_is_415_and_changes_nothing(
    api: Api, method: str, path: str, content_type: str | None
) -> None:
    await api.call("PUT", "/v1/customers/hd365", {"name": "Helpdesk 365"})
    headers = dict(PORTAL)
    if content_type is not None:
        headers["Content-Type"] = content_type
    body = b'{"name": "changed", "customer_id": "hd365"}'
    async with api.session.request(method, api.url(path), data=body, headers=headers) as got:
        assert got.status == 415
        error = (await got.json())["error"]
    assert error["code"] == "unsupported_media_type"
    assert "application/json" in error["message"]
    _, customer, _ = await api.call("GET", "/v1/customers/hd365")
    assert customer["name"] == "Helpdesk 365" and customer["accounts"] == []


async def test_openapi_documents_the_media_types_each_body_takes(api: Api) -> None:
    _, doc, _ = await api.call("GET", "/openapi.json", headers={})
    patch = doc["paths"]["/v1/customers/{customer_id}"]["patch"]
    assert list(patch["requestBody"]["content"]) == [
        "application/merge-patch+json",
        "application/json",
    ]
    assert "415" in patch["responses"]
    put = doc["paths"]["/v1/accounts/{number}"]["put"]
    assert list(put["requestBody"]["content"]) == ["application/json"]
    assert "415" not in doc["paths"]["/v1/accounts/{number}"]["delete"]["responses"]
    # the documented number forms are the accepted ones
    (param,) = put["parameters"]
    for form in ("+13215559876", "13215559876", "3215559876"):
        assert re.fullmatch(param["schema"]["pattern"].strip("^$"), form)
    assert not re.fullmatch(param["schema"]["pattern"].strip("^$"), "+23215559876")


# --- line numbers in any of the edge's forms ---------------------------------------------------


@pytest.mark.parametrize("form", ["+13215559876", "13215559876", "3215559876"])
async def test_a_line_number_is_one_line_in_every_form(api: Api, form: str) -> None:
    await api.call("PUT", "/v1/customers/hd365", {"name": "Helpdesk 365", "address": RALEIGH})
    status, body, headers = await api.call(
        "PUT",
        f"/v1/accounts/{form}",
        {"customer_id": "hd365", "number": form, "callback_number": "+19195550100"},
    )
    assert status == 201, body
    assert body["number"] == "3215559876" and headers["Location"] == "/v1/accounts/3215559876"
    assert body["callback_number"] == "9195550100"
    for other in ("+13215559876", "13215559876", "3215559876"):
        status, body, _ = await api.call("GET", f"/v1/accounts/{other}")
        assert status == 200 and body["number"] == "3215559876"
    status, body, _ = await api.call("PATCH", f"/v1/accounts/{form}", {"name": "ext 9"})
    assert status == 200 and body["name"] == "ext 9"
    status, body, _ = await api.call("GET", f"/v1/audit?line={form}")
    assert status == 200 and [e["line"] for e in body["entries"]] == ["3215559876"]
    status, _, _ = await api.call("DELETE", f"/v1/accounts/{form}")
    assert status == 204
    status, _, _ = await api.call("GET", "/v1/accounts/3215559876")
    assert status == 404


async def test_a_number_that_is_no_line_is_still_refused(api: Api) -> None:
    await api.call("PUT", "/v1/customers/hd365", {"name": "Helpdesk 365"})
    for bad in ("+23215559876", "23215559876", "321555987"):
        status, body, _ = await api.call("PUT", f"/v1/accounts/{bad}", {"customer_id": "hd365"})
        assert status == 422 and body["error"]["field"] == "number", bad
        assert bad.lstrip("+") in body["error"]["message"]


# --- customers, sites, accounts ---------------------------------------------------------------


async def test_customer_put_creates_then_replaces(api: Api) -> None:
    status, body, headers = await api.call(
        "PUT", "/v1/customers/hd365", {"name": "Helpdesk 365", "callback_number": "9195550100"}
    )
    assert status == 201 and headers["Location"] == "/v1/customers/hd365"
    assert body["address_status"] == "none" and body["provider_endpoint"] is None
    status, body, _ = await api.call(
        "PUT", "/v1/customers/hd365", {"customer_id": "hd365", "address": RALEIGH}
    )
    assert status == 200
    assert body["name"] == "" and body["callback_number"] is None  # PUT replaces
    assert body["address_status"] == "validated"
    assert body["standardized_address"]["one_line"] == RALEIGH_STD
    assert body["provider_endpoint"] is None  # no line and no callback: validated only


async def test_a_customer_gets_its_endpoint_when_it_has_a_number_to_carry(api: Api) -> None:
    # As the README's use case 1.1 and docs/provisioning.md say.
    _, body, _ = await api.call("PUT", "/v1/customers/hd365", {"address": RALEIGH})
    assert body["address_status"] == "validated" and body["provider_endpoint"] is None
    await api.call("PUT", f"/v1/accounts/{LINE}", {"customer_id": "hd365"})
    _, body, _ = await api.call("GET", "/v1/customers/hd365")
    assert body["provider_endpoint"] == f"{ACCOUNT}/{CUSTOMER_EP}"
    assert body["endpoint_phone_number"] == LINE
    _, body, _ = await api.call(
        "PUT", "/v1/customers/other", {"address": RALEIGH, "callback_number": "9195550100"}
    )
    assert body["provider_endpoint"] is not None and body["accounts"] == []
    assert body["endpoint_phone_number"] == "9195550100"


async def test_customer_address_is_validated_standardised_and_provisioned(api: Api) -> None:
    await helpdesk(api)
    status, body, _ = await api.call("GET", "/v1/customers/hd365")
    assert status == 200
    assert body["standardized_address"]["one_line"] == RALEIGH_STD
    assert body["provider_endpoint"] == f"{ACCOUNT}/{CUSTOMER_EP}"
    assert body["endpoint_phone_number"] == LINE
    assert body["accounts"] == [LINE] and body["pending"] is False
    status, body, _ = await api.call("GET", f"/v1/accounts/{LINE}")
    assert body["effective"] == {
        "level": "customer",
        "entity": "customer:hd365",
        "provider_endpoint": f"{ACCOUNT}/{CUSTOMER_EP}",
        "address": RALEIGH_STD,
        "status": "provisioned",
    }
    assert body["provider_endpoint"] is None  # the account has no endpoint of its own


async def test_rejected_address_is_422_with_bandwidths_reason(api: Api) -> None:
    await helpdesk(api)
    status, body, _ = await api.call("PATCH", "/v1/customers/hd365", {"address": NOWHERE})
    assert status == 422
    error = body["error"]
    assert error["code"] == "address_rejected"
    assert "1 NOWHERE ST was not found" in error["message"]
    assert error["bandwidth"]["type"] == "address-validation"
    assert "1 NOWHERE ST was not found" in error["bandwidth"]["description"]
    _, customer, _ = await api.call("GET", "/v1/customers/hd365")
    assert customer["address"] == RALEIGH


async def test_sites_and_assignment(api: Api) -> None:
    await helpdesk(api)
    status, body, headers = await api.call(
        "PUT", "/v1/customers/hd365/sites/cary", {"name": "CarryOffice", "address": CARY}
    )
    assert status == 201 and headers["Location"] == "/v1/customers/hd365/sites/cary"
    assert body["address_status"] == "unvalidated" and body["provider_endpoint"] is None
    status, body, _ = await api.call("PATCH", f"/v1/accounts/{LINE}", {"site_id": "cary"})
    assert status == 200
    assert body["effective"]["level"] == "site"
    assert body["effective"]["provider_endpoint"] == f"{ACCOUNT}/{SITE_EP}"
    status, body, _ = await api.call("GET", "/v1/customers/hd365/sites/cary")
    assert body["accounts"] == [LINE] and body["address_status"] == "validated"
    status, body, _ = await api.call("GET", "/v1/customers/hd365/sites")
    assert [s["site_id"] for s in body["sites"]] == ["cary"]
    status, body, _ = await api.call("DELETE", "/v1/customers/hd365/sites/cary")
    assert status == 409 and body["error"]["code"] == "site_in_use"
    await api.call("PATCH", f"/v1/accounts/{LINE}", {"site_id": None})
    status, body, _ = await api.call("DELETE", "/v1/customers/hd365/sites/cary")
    assert status == 204 and body is None
    status, _, _ = await api.call("GET", "/v1/customers/hd365/sites/cary")
    assert status == 404


async def test_accounts_list_and_termination(api: Api) -> None:
    await helpdesk(api)
    await api.call("PUT", f"/v1/accounts/{LINE2}", {"customer_id": "hd365", "address": CARY})
    status, body, _ = await api.call("GET", "/v1/customers/hd365/accounts")
    assert [(a["number"], a["effective"]["level"]) for a in body["accounts"]] == [
        (LINE, "customer"),
        (LINE2, "account"),
    ]
    status, _, _ = await api.call("DELETE", f"/v1/accounts/{LINE2}")
    assert status == 204
    status, body, _ = await api.call("GET", f"/v1/accounts/{LINE2}")
    assert status == 404 and body["error"]["code"] == "not_found"
    status, body, _ = await api.call("GET", "/v1/customers")
    assert [c["customer_id"] for c in body["customers"]] == ["hd365"]


async def test_customer_deletion(api: Api) -> None:
    await api.call("PUT", "/v1/customers/solo", {})
    status, _, _ = await api.call("DELETE", "/v1/customers/solo")
    assert status == 204
    status, _, _ = await api.call("DELETE", "/v1/customers/solo")
    assert status == 404


# --- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "code", "field"),
    [
        ("PUT", "/v1/customers/hd365", {"adress": {}}, 422, "invalid_request", "adress"),
        (
            "PUT",
            "/v1/customers/hd365",
            {"customer_id": "other"},
            422,
            "invalid_request",
            "customer_id",
        ),
        (
            "PUT",
            "/v1/customers/hd365",
            {"address": {"line1": "x"}},
            422,
            "invalid_request",
            "address.city",
        ),
        ("PUT", "/v1/customers/hd365", {"name": 5}, 422, "invalid_request", "name"),
        ("PUT", "/v1/customers/hd365", [], 400, "invalid_json", None),
        ("PUT", "/v1/customers/bad%20id", {}, 422, "invalid_request", "customer_id"),
        ("PUT", "/v1/accounts/12345", {"customer_id": "hd365"}, 422, "invalid_request", "number"),
        (
            "PUT",
            f"/v1/accounts/{LINE}",
            {"customer_id": None},
            422,
            "invalid_request",
            "customer_id",
        ),
        ("PATCH", "/v1/customers/ghost", {"name": "x"}, 404, "not_found", None),
        ("GET", "/v1/audit?limit=0", None, 422, "invalid_request", "limit"),
        ("GET", "/v1/nowhere", None, 404, "not_found", None),
    ],
)
async def test_bad_requests_get_json_errors(
    api: Api,
    method: str,
    path: str,
    body: Any,
    status: int,
    code: str,
    field: str | None,
) -> None:
    got, payload, _ = await api.call(method, path, body)
    assert got == status
    assert payload["error"]["code"] == code
    assert payload["error"]["field"] == field
    assert payload["error"]["bandwidth"] is None


async def test_body_that_is_not_json_is_400(api: Api) -> None:
    headers = {**PORTAL, "Content-Type": "application/json"}
    status, body, _ = await api.call("PUT", "/v1/customers/hd365", data=b"{nope", headers=headers)
    assert status == 400 and body["error"]["code"] == "invalid_json"


async def test_wrong_method_is_405_with_allow(api: Api) -> None:
    status, body, headers = await api.call("POST", "/v1/customers/hd365", {})
    assert status == 405 and body["error"]["code"] == "method_not_allowed"
    assert "PUT" in headers["Allow"]


async def test_rate_limited_bandwidth_is_503_with_retry_after(api: Api) -> None:
    await api.call("PUT", "/v1/customers/hd365", {})
    await api.world.bw.fault(status=429, retry_after=7, count=2)
    status, body, headers = await api.call("PATCH", "/v1/customers/hd365", {"address": RALEIGH})
    assert status == 503
    assert headers["Retry-After"] == "7"
    assert body["error"]["code"] == "provider_rate_limited"
    assert body["error"]["bandwidth"]["type"] == "rate-limiting"


async def test_unexpected_failure_is_a_json_500(bw: Bw) -> None:
    class Broken(MemoryStateStore):
        async def get(self, customer_id: str) -> CustomerState | None:
            raise RuntimeError("secret internals")

    world = make_world(bw)
    world.service = ProvisioningService(
        provider=bw.client,
        lines=world.lines,
        state=Broken(),
        audit=world.audit,
        options=ServiceOptions(),
    )
    async for api in start_api(world):
        status, body, _ = await api.call("GET", "/v1/customers/hd365")
        assert status == 500
        assert body["error"] == {
            "code": "internal",
            "message": "internal error; see the service log",
            "field": None,
            "bandwidth": None,
        }


async def test_health_reports_the_state_store(api: Api) -> None:
    api.world.state.available = False
    status, body, _ = await api.call("GET", "/healthz", headers={})
    assert status == 503 and body == {"status": "unavailable", "state": False}


# --- audit and resync -------------------------------------------------------------------------


async def test_audit_is_filtered_by_line_and_limited(api: Api) -> None:
    await helpdesk(api)
    await api.call("PUT", f"/v1/accounts/{LINE2}", {"customer_id": "hd365"})
    status, body, _ = await api.call("GET", "/v1/audit")
    assert [e["line"] for e in body["entries"]] == [LINE, LINE2]
    status, body, _ = await api.call("GET", f"/v1/audit?line={LINE2}")
    assert [e["action"] for e in body["entries"]] == ["put_account"]
    status, body, _ = await api.call("GET", "/v1/audit?limit=1")
    assert [e["line"] for e in body["entries"]] == [LINE2]


async def test_resync_endpoint_returns_the_report(api: Api) -> None:
    await helpdesk(api)
    await api.world.lines.put_records({}, frozenset({LINE}))
    status, body, _ = await api.call("POST", "/v1/resync", headers=OPS)
    assert status == 200
    assert body["written"] == [LINE] and body["ok"] is True
    assert body["provider_checked"] is True
    entries = await api.world.audit.read(line=LINE)
    assert (entries[-1].who, entries[-1].action) == ("noc-operator", "resync")


# --- the OpenAPI document ---------------------------------------------------------------------


async def test_openapi_documents_exactly_the_routes_served(api: Api) -> None:
    _, doc, _ = await api.call("GET", "/openapi.json", headers={})
    assert doc["openapi"].startswith("3.")
    documented = {(method.upper(), path) for path, ops in doc["paths"].items() for method in ops}
    served = {
        (route.method, route.resource.canonical)
        for route in api.server.app.router.routes()
        if route.resource is not None
    }
    assert documented == served == {(r.method, r.path) for r in routes()}
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            params = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
            assert params == set(re.findall(r"{(\w+)}", path)), (method, path)
            for response in op["responses"].values():
                for media in response.get("content", {}).values():
                    ref = media["schema"]["$ref"].rsplit("/", 1)[1]
                    assert ref in doc["components"]["schemas"]
            assert ("security" in op and op["security"] == []) == (path in PUBLIC_PATHS)
    assert doc["security"] == [{"bearer": []}]


def test_every_handler_is_a_registered_operation_and_vice_versa() -> None:
    handlers = {
        name
        for name, value in vars(_Handlers).items()
        if not name.startswith("_") and inspect.iscoroutinefunction(value)
    }
    registered = [r.handler for r in routes()]
    assert sorted(registered) == sorted(handlers)
    assert len(set(registered)) == len(registered)


def test_an_operation_cannot_be_registered_twice() -> None:
    route = routes()[0]

    async def again(request: Any) -> Any:
        raise AssertionError("never served")

    with pytest.raises(ValueError, match="registered twice"):
        operation(route.method, route.path, summary="duplicate")(again)
    assert routes()[0] == route


def test_an_operation_may_take_another_body_type() -> None:
    route = Route(
        method="POST",
        path="/v1/things",
        handler="things",
        summary="Take a CSV",
        body="Things",
        accepts=("text/csv",),
    )
    assert route.media_types == ("text/csv",)
    operation_ = openapi_document((route,))["paths"]["/v1/things"]["post"]
    assert list(operation_["requestBody"]["content"]) == ["text/csv"]
    assert "415" in operation_["responses"]
