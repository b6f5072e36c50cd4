"""The provisioning HTTP API (aiohttp, JSON), its OpenAPI 3 document and bearer-token auth.

Resources (all under ``/v1``, all behind ``Authorization: Bearer <token>``):

- ``/customers/{customer_id}``: a customer and its address (the lowest cascade level);
- ``/customers/{customer_id}/sites/{site_id}``: a customer site (middle level);
- ``/accounts/{number}``: a line keyed by its 10-digit number, optionally on a site and with
  its own address (highest level);
- ``/audit``: the trail of line location changes; ``/resync``: rebuild the line records;
- ``/calls``: one record per emergency call (location, trunks, times), paged by a cursor;
- ``/coverage``: how many lines would reach the PSAP with a location, and which would not.

Entities are created with PUT on their URL (ids are the CSP's own: a PUT can be retried
safely after a timeout) and changed with PATCH (JSON merge patch: a field left out stays, a
``null`` clears it). ``/healthz`` and ``/openapi.json`` are public.

The OpenAPI document is generated from the same route table that registers the handlers,
so the two cannot drift apart; it is hand-written rather than produced by an aiohttp plugin
because the route set is small and those plugins pull in schema libraries this product
does not otherwise need.
"""

from __future__ import annotations

import hmac
import json
import logging
import math
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from e911_sip.callrecords.book import END_REASONS, parse_time
from e911_sip.provisioning import cascade
from e911_sip.provisioning.calls import MAX_PAGE, CallQuery, CallStore, CallStoreError
from e911_sip.provisioning.coverage import COVERED_STATES, UNCOVERED_STATES, OrderStatus
from e911_sip.provisioning.coverage_monitor import CoverageMonitor
from e911_sip.provisioning.model import (
    Account,
    Address,
    Contacts,
    CustomerState,
    Entity,
    ModelError,
    Site,
)
from e911_sip.provisioning.service import (
    UNSET,
    AccountFields,
    BandwidthDetail,
    CustomerFields,
    ProvisioningService,
    ServiceError,
    SiteFields,
    Unset,
)

_LOG = logging.getLogger("e911_sip.provisioning.api")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

PUBLIC_PATHS = frozenset({"/healthz", "/openapi.json"})
"""Paths served without a token."""
MAX_AUDIT_LIMIT = 10_000


# --- views ---------------------------------------------------------------------------------


def _location_view(entity: Entity) -> dict[str, Any]:
    if entity.address is None:
        status = "none"
    elif entity.standardized is None:
        status = "unvalidated"
    else:
        status = "validated"
    return {
        "address": entity.address.to_dict() if entity.address is not None else None,
        "address_status": status,
        "standardized_address": (
            entity.standardized.to_dict() if entity.standardized is not None else None
        ),
        "provider_endpoint": entity.endpoint.provider_endpoint if entity.endpoint else None,
        "endpoint_phone_number": entity.endpoint.phone_number if entity.endpoint else None,
        "contacts": entity.contacts.to_dict() if entity.contacts is not None else None,
    }


def customer_view(state: CustomerState) -> dict[str, Any]:
    """The JSON form of a customer."""
    c = state.customer
    return {
        "customer_id": c.customer_id,
        "name": c.name,
        "callback_number": c.callback_number,
        **_location_view(c),
        "sites": sorted(state.sites),
        "accounts": sorted(state.accounts),
        "pending": state.outbox is not None,
        "created_at": c.created_at,
        "updated_at": c.updated_at,
    }


def site_view(state: CustomerState, site: Site) -> dict[str, Any]:
    """The JSON form of a site."""
    return {
        "customer_id": site.customer_id,
        "site_id": site.site_id,
        "name": site.name,
        "callback_number": site.callback_number,
        **_location_view(site),
        "accounts": sorted(n for n, a in state.accounts.items() if a.site_id == site.site_id),
        "created_at": site.created_at,
        "updated_at": site.updated_at,
    }


def effective_view(state: CustomerState, account: Account) -> dict[str, Any]:
    """Where the account's location comes from, and the endpoint its calls carry."""
    eff = cascade.effective(state, account)
    missing = eff.missing
    return {
        "level": eff.level.value if eff.level is not None else None,
        "entity": str(eff.source) if eff.source is not None else None,
        "provider_endpoint": eff.provider_endpoint,
        "address": eff.address or None,
        "status": missing.value if missing is not None else "provisioned",
    }


def effective_contacts_view(state: CustomerState, account: Account) -> dict[str, Any]:
    """Who is told of the account's emergency calls, and from which level."""
    level, contacts = cascade.effective_contacts(state, account)
    return {**contacts.to_dict(), "level": level.value if level is not None else None}


def account_view(state: CustomerState, account: Account) -> dict[str, Any]:
    """The JSON form of an account."""
    return {
        "number": account.number,
        "customer_id": account.customer_id,
        "site_id": account.site_id,
        "name": account.name,
        "callback_number": account.callback_number,
        **_location_view(account),
        "effective": effective_view(state, account),
        "effective_contacts": effective_contacts_view(state, account),
        "created_at": account.created_at,
        "updated_at": account.updated_at,
    }


# --- request parsing -------------------------------------------------------------------------


def _invalid(message: str, *, field: str | None = None) -> ServiceError:
    return ServiceError(422, "invalid_request", message, field=field)


async def _json_body(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    try:
        body = json.loads(raw) if raw else None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ServiceError(400, "invalid_json", f"the body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise ServiceError(400, "invalid_json", "the body must be a JSON object")
    return body


def _check_keys(body: Mapping[str, Any], allowed: set[str], ids: Mapping[str, str]) -> None:
    for key, value in ids.items():
        if key in body and body[key] != value:
            raise _invalid(f"{key} in the body ({body[key]!r}) differs from the URL", field=key)
    unknown = sorted(k for k in body if k not in allowed and k not in ids)
    if unknown:
        raise _invalid(
            f"unknown field(s) {', '.join(unknown)}; expected {', '.join(sorted(allowed))}",
            field=unknown[0],
        )


def _text(body: Mapping[str, Any], key: str) -> str | Unset:
    if key not in body:
        return UNSET
    value = body[key]
    if value is None:
        return ""
    if not isinstance(value, str):
        raise _invalid(f"{key} must be a string", field=key)
    return value


def _nullable(body: Mapping[str, Any], key: str) -> str | None | Unset:
    if key not in body:
        return UNSET
    value = body[key]
    if value is not None and not isinstance(value, str):
        raise _invalid(f"{key} must be a string or null", field=key)
    return value


def _address(body: Mapping[str, Any], default_country: str) -> Address | None | Unset:
    if "address" not in body:
        return UNSET
    if body["address"] is None:
        return None
    try:
        return Address.from_dict(body["address"], default_country=default_country)
    except ModelError as exc:
        raise _invalid(str(exc), field=exc.field) from exc


def _contacts(body: Mapping[str, Any]) -> Contacts | None | Unset:
    if "contacts" not in body:
        return UNSET
    if body["contacts"] is None:
        return None
    try:
        return Contacts.from_dict(body["contacts"])
    except ModelError as exc:
        raise _invalid(str(exc), field=exc.field) from exc


_COMMON_KEYS = {"name", "callback_number", "address", "contacts"}


def customer_fields(body: Mapping[str, Any], *, customer_id: str, country: str) -> CustomerFields:
    """Parse a customer PUT/PATCH body. Raises ServiceError 422."""
    _check_keys(body, _COMMON_KEYS, {"customer_id": customer_id})
    return CustomerFields(
        name=_text(body, "name"),
        callback_number=_nullable(body, "callback_number"),
        address=_address(body, country),
        contacts=_contacts(body),
    )


def site_fields(
    body: Mapping[str, Any], *, customer_id: str, site_id: str, country: str
) -> SiteFields:
    """Parse a site PUT/PATCH body. Raises ServiceError 422."""
    _check_keys(body, _COMMON_KEYS, {"customer_id": customer_id, "site_id": site_id})
    return SiteFields(
        name=_text(body, "name"),
        callback_number=_nullable(body, "callback_number"),
        address=_address(body, country),
        contacts=_contacts(body),
    )


def account_fields(body: Mapping[str, Any], *, number: str, country: str) -> AccountFields:
    """Parse an account PUT/PATCH body. Raises ServiceError 422."""
    _check_keys(body, _COMMON_KEYS | {"customer_id", "site_id"}, {"number": number})
    customer_id = _nullable(body, "customer_id")
    if customer_id is None:
        raise _invalid("customer_id must be a string", field="customer_id")
    return AccountFields(
        customer_id=customer_id,
        site_id=_nullable(body, "site_id"),
        name=_text(body, "name"),
        callback_number=_nullable(body, "callback_number"),
        address=_address(body, country),
        contacts=_contacts(body),
    )


# --- responses and middleware ------------------------------------------------------------------


def error_response(
    status: int,
    code: str,
    message: str,
    *,
    bandwidth: BandwidthDetail | None = None,
    field: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    """``{"error": {"code", "message", "field", "bandwidth"}}`` with ``status``."""
    body = {
        "error": {
            "code": code,
            "message": message,
            "field": field,
            "bandwidth": bandwidth.to_dict() if bandwidth is not None else None,
        }
    }
    return web.json_response(body, status=status, headers=dict(headers or {}))


def _code_for(exc: web.HTTPException) -> str:
    reason = exc.reason or f"http {exc.status}"
    return re.sub(r"[^a-z0-9]+", "_", reason.lower()).strip("_")


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ServiceError as exc:
        headers: dict[str, str] = {}
        if exc.retry_after is not None:
            headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
        elif exc.status == 503:
            headers["Retry-After"] = "1"
        return error_response(
            exc.status,
            exc.code,
            exc.message,
            bandwidth=exc.bandwidth,
            field=exc.field,
            headers=headers,
        )
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {k: v for k, v in exc.headers.items() if k.lower() == "allow"}
        return error_response(exc.status, _code_for(exc), exc.reason, headers=headers)
    except Exception:
        _LOG.exception("provisioning API failed on %s %s", request.method, request.path)
        return error_response(500, "internal", "internal error; see the service log")


class _Auth:
    """Bearer tokens → caller names, compared in constant time."""

    def __init__(self, tokens: Mapping[str, str]) -> None:
        for token, name in tokens.items():
            if not token or not token.strip() or token != token.strip():
                raise ValueError("API tokens must be non-empty and have no surrounding spaces")
            if not name:
                raise ValueError("every API token needs a name (it is the audit 'who')")
        self._tokens = [(token.encode(), name) for token, name in tokens.items()]

    def caller(self, request: web.Request) -> str | None:
        """The name of the token the request carries, or None."""
        scheme, _, value = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            return None
        presented = value.strip().encode()
        found: str | None = None
        # Every configured token is compared, so timing does not tell which one matched.
        for token, name in self._tokens:
            if hmac.compare_digest(token, presented) and presented:
                found = name
        return found

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in PUBLIC_PATHS:
            return await handler(request)
        if self.caller(request) is None:
            presented = "Authorization" in request.headers
            challenge = 'Bearer realm="e911-sip"'
            if presented:
                challenge += ', error="invalid_token"'
            return error_response(
                401,
                "unauthorized",
                "a valid bearer token is required"
                if not presented
                else "the bearer token is not valid",
                headers={"WWW-Authenticate": challenge},
            )
        return await handler(request)

    def who(self, request: web.Request) -> str:
        """The caller's name (the middleware already refused requests without one)."""
        name = self.caller(request)
        if name is None:  # pragma: no cover - the middleware runs first
            raise web.HTTPUnauthorized()
        return name


# --- handlers --------------------------------------------------------------------------------


class _Handlers:
    def __init__(
        self,
        service: ProvisioningService,
        auth: _Auth,
        document: dict[str, Any],
        calls: CallStore | None = None,
        coverage: CoverageMonitor | None = None,
    ) -> None:
        self._service = service
        self._calls = calls
        self._coverage = coverage
        self._auth = auth
        self._document = document
        self._country = service.options.default_country

    async def healthz(self, request: web.Request) -> web.StreamResponse:
        ok = await self._service.healthy()
        return web.json_response(
            {"status": "ok" if ok else "unavailable", "state": ok}, status=200 if ok else 503
        )

    async def openapi(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self._document)

    # customers

    async def list_customers(self, request: web.Request) -> web.StreamResponse:
        states = await self._service.list_customers()
        return web.json_response({"customers": [customer_view(s) for s in states]})

    async def get_customer(self, request: web.Request) -> web.StreamResponse:
        state = await self._service.get_customer(request.match_info["customer_id"])
        return web.json_response(customer_view(state))

    async def put_customer(self, request: web.Request) -> web.StreamResponse:
        cid = request.match_info["customer_id"]
        fields = customer_fields(await _json_body(request), customer_id=cid, country=self._country)
        saved = await self._service.put_customer(cid, fields, who=self._auth.who(request))
        return _saved(customer_view(saved.state), saved.created, f"/v1/customers/{cid}")

    async def patch_customer(self, request: web.Request) -> web.StreamResponse:
        cid = request.match_info["customer_id"]
        fields = customer_fields(await _json_body(request), customer_id=cid, country=self._country)
        state = await self._service.patch_customer(cid, fields, who=self._auth.who(request))
        return web.json_response(customer_view(state))

    async def delete_customer(self, request: web.Request) -> web.StreamResponse:
        cid = request.match_info["customer_id"]
        await self._service.delete_customer(cid, who=self._auth.who(request))
        return web.Response(status=204)

    # sites

    async def list_sites(self, request: web.Request) -> web.StreamResponse:
        state = await self._service.get_customer(request.match_info["customer_id"])
        sites = [site_view(state, state.sites[k]) for k in sorted(state.sites)]
        return web.json_response({"sites": sites})

    async def get_site(self, request: web.Request) -> web.StreamResponse:
        state, site = await self._service.get_site(
            request.match_info["customer_id"], request.match_info["site_id"]
        )
        return web.json_response(site_view(state, site))

    async def put_site(self, request: web.Request) -> web.StreamResponse:
        cid, sid = request.match_info["customer_id"], request.match_info["site_id"]
        body = await _json_body(request)
        fields = site_fields(body, customer_id=cid, site_id=sid, country=self._country)
        saved = await self._service.put_site(cid, sid, fields, who=self._auth.who(request))
        view = site_view(saved.state, saved.state.sites[sid])
        return _saved(view, saved.created, f"/v1/customers/{cid}/sites/{sid}")

    async def patch_site(self, request: web.Request) -> web.StreamResponse:
        cid, sid = request.match_info["customer_id"], request.match_info["site_id"]
        body = await _json_body(request)
        fields = site_fields(body, customer_id=cid, site_id=sid, country=self._country)
        state = await self._service.patch_site(cid, sid, fields, who=self._auth.who(request))
        return web.json_response(site_view(state, state.sites[sid]))

    async def delete_site(self, request: web.Request) -> web.StreamResponse:
        cid, sid = request.match_info["customer_id"], request.match_info["site_id"]
        await self._service.delete_site(cid, sid, who=self._auth.who(request))
        return web.Response(status=204)

    # accounts

    async def list_accounts(self, request: web.Request) -> web.StreamResponse:
        state = await self._service.get_customer(request.match_info["customer_id"])
        accounts = [account_view(state, state.accounts[k]) for k in sorted(state.accounts)]
        return web.json_response({"accounts": accounts})

    async def get_account(self, request: web.Request) -> web.StreamResponse:
        state, account = await self._service.get_account(request.match_info["number"])
        return web.json_response(account_view(state, account))

    async def put_account(self, request: web.Request) -> web.StreamResponse:
        number = request.match_info["number"]
        fields = account_fields(await _json_body(request), number=number, country=self._country)
        saved = await self._service.put_account(number, fields, who=self._auth.who(request))
        view = account_view(saved.state, saved.state.accounts[number])
        return _saved(view, saved.created, f"/v1/accounts/{number}")

    async def patch_account(self, request: web.Request) -> web.StreamResponse:
        number = request.match_info["number"]
        fields = account_fields(await _json_body(request), number=number, country=self._country)
        state = await self._service.patch_account(number, fields, who=self._auth.who(request))
        return web.json_response(account_view(state, state.accounts[number]))

    async def delete_account(self, request: web.Request) -> web.StreamResponse:
        await self._service.terminate_account(
            request.match_info["number"], who=self._auth.who(request)
        )
        return web.Response(status=204)

    # audit and resync

    async def audit(self, request: web.Request) -> web.StreamResponse:
        line = request.query.get("line")
        raw_limit = request.query.get("limit", "100")
        if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= MAX_AUDIT_LIMIT:
            raise _invalid(f"limit must be an integer from 1 to {MAX_AUDIT_LIMIT}", field="limit")
        entries = await self._service.audit_trail(line=line, limit=int(raw_limit))
        return web.json_response({"entries": [e.to_dict() for e in entries]})

    async def calls(self, request: web.Request) -> web.StreamResponse:
        query = call_query(request.query)
        if self._calls is None:
            raise ServiceError(503, "unavailable", "call records are not kept ([records] enabled)")
        try:
            records = await self._calls.query(query)
        except CallStoreError as exc:
            _LOG.error("call records could not be read: %s", exc)
            raise ServiceError(503, "unavailable", "the call record store is unavailable") from exc
        full = len(records) == query.limit
        return web.json_response(
            {
                "calls": [r.to_dict() for r in records],
                "next_cursor": records[-1].id if full and records else None,
            }
        )

    async def coverage(self, request: web.Request) -> web.StreamResponse:
        limit, offset = coverage_page(request.query)
        if self._coverage is None:
            raise ServiceError(503, "unavailable", "coverage is not computed in this process")
        figures = await self._coverage.current()
        return web.json_response(
            {
                **figures.to_dict(limit=limit, offset=offset),
                "alert_below": self._coverage.options.alert_below,
            }
        )

    async def resync(self, request: web.Request) -> web.StreamResponse:
        report = await self._service.resync(who=self._auth.who(request))
        return web.json_response(report.to_dict())


def call_query(params: Mapping[str, str]) -> CallQuery:
    """``since``, ``until`` (ISO 8601 or epoch seconds), ``caller``, ``cursor`` and ``limit``
    of ``GET /v1/calls``. Raises ServiceError 422."""
    times: dict[str, float | None] = {}
    for key in ("since", "until"):
        raw = params.get(key)
        try:
            times[key] = parse_time(raw) if raw else None
        except ValueError:
            raise _invalid(f"{key} must be ISO 8601 or epoch seconds", field=key) from None
    caller = params.get("caller") or None
    if caller is not None and not re.fullmatch(r"\d{10}", caller):
        raise _invalid("caller must be a 10-digit number", field="caller")
    raw_limit = params.get("limit", "100")
    if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= MAX_PAGE:
        raise _invalid(f"limit must be an integer from 1 to {MAX_PAGE}", field="limit")
    cursor = params.get("cursor") or None
    if cursor is not None and not re.fullmatch(r"\d{13}-[0-9a-f]{12}", cursor):
        raise _invalid("cursor must be a next_cursor this API returned", field="cursor")
    return CallQuery(
        since=times["since"],
        until=times["until"],
        caller=caller,
        after=cursor,
        limit=int(raw_limit),
    )


# --- coverage ------------------------------------------------------------------------------

MAX_COVERAGE_LIMIT = 1000


def coverage_page(params: Mapping[str, str]) -> tuple[int, int]:
    """``limit`` (1 to 1000, default 100) and ``offset`` (default 0) of ``GET /v1/coverage``.

    Raises ServiceError 422."""
    raw_limit = params.get("limit", "100")
    if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= MAX_COVERAGE_LIMIT:
        raise _invalid(f"limit must be an integer from 1 to {MAX_COVERAGE_LIMIT}", field="limit")
    raw_offset = params.get("offset", "0")
    if not raw_offset.isdigit():
        raise _invalid("offset must be a non-negative integer", field="offset")
    return int(raw_limit), int(raw_offset)


_COVERAGE_PARAMETERS: list[dict[str, Any]] = [
    {
        "name": "limit",
        "in": "query",
        "schema": {"type": "integer", "minimum": 1, "maximum": MAX_COVERAGE_LIMIT, "default": 100},
    },
    {"name": "offset", "in": "query", "schema": {"type": "integer", "minimum": 0, "default": 0}},
]


def _coverage_schemas(ref: str) -> dict[str, Any]:
    count = {"type": "integer", "minimum": 0}
    ns = {"type": ["string", "null"]}
    endpoint = {
        "type": "object",
        "properties": {
            "endpoint_id": {"type": "string"},
            "status": {"type": "string", "enum": [s.value for s in OrderStatus]},
            "entity": ns,
            "phone_number": {"type": "string"},
            "lines": count,
            "reason": {
                "type": "string",
                "description": "order_in_progress, not_provisioned, or Bandwidth's error",
            },
            "order_id": ns,
            "at": ns,
        },
    }
    return {
        "CoverageEndpoint": endpoint,
        "Coverage": {
            "type": "object",
            "properties": {
                "lines": count,
                "covered": count,
                "share": {"type": "number", "minimum": 0, "maximum": 1},
                "alert_below": {"type": "number"},
                "by_level": {
                    "type": "object",
                    "properties": {s.value: count for s in COVERED_STATES},
                },
                "uncovered_by_reason": {
                    "type": "object",
                    "properties": {s.value: count for s in UNCOVERED_STATES},
                },
                "uncovered": {
                    "type": "object",
                    "properties": {
                        "total": count,
                        "offset": count,
                        "limit": count,
                        "lines": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "properties": {
                                    "line": {"type": "string", "pattern": r"^\d{10}$"},
                                    "customer_id": {"type": "string"},
                                    "reason": {
                                        "type": "string",
                                        "enum": [s.value for s in UNCOVERED_STATES],
                                    },
                                    "source": ns,
                                    "provider_endpoint": ns,
                                    "record_endpoint": ns,
                                    "order": {
                                        "type": ["string", "null"],
                                        "enum": [*(s.value for s in OrderStatus), None],
                                    },
                                },
                            },
                        },
                    },
                },
                "endpoints": {
                    "type": "object",
                    "properties": {
                        "pending_total": count,
                        "failed_total": count,
                        "pending": {"type": "array", "items": {"$ref": ref + "CoverageEndpoint"}},
                        "failed": {"type": "array", "items": {"$ref": ref + "CoverageEndpoint"}},
                    },
                },
                "orphan_records": count,
            },
            "required": ["lines", "covered", "share", "by_level", "uncovered", "endpoints"],
        },
    }


def _saved(view: dict[str, Any], created: bool, location: str) -> web.Response:
    if created:
        return web.json_response(view, status=201, headers={"Location": location})
    return web.json_response(view)


# --- routes and the OpenAPI document -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Route:
    """One operation: what registers the handler and what documents it."""

    method: str
    path: str
    handler: str
    summary: str
    ok: int
    response: str | None
    body: str | None = None
    errors: tuple[int, ...] = (401, 404, 422, 503)
    public: bool = False
    description: str = ""


_CHANGE_ERRORS = (400, 401, 404, 409, 422, 502, 503)

ROUTES: tuple[Route, ...] = (
    Route(
        "GET",
        "/healthz",
        "healthz",
        "Health of the provisioning service",
        200,
        "Health",
        errors=(503,),
        public=True,
    ),
    Route("GET", "/openapi.json", "openapi", "This document", 200, None, errors=(), public=True),
    Route(
        "GET",
        "/v1/customers",
        "list_customers",
        "List customers",
        200,
        "CustomerList",
        errors=(401, 503),
    ),
    Route("GET", "/v1/customers/{customer_id}", "get_customer", "Get a customer", 200, "Customer"),
    Route(
        "PUT",
        "/v1/customers/{customer_id}",
        "put_customer",
        "Create or replace a customer",
        200,
        "Customer",
        body="CustomerInput",
        errors=_CHANGE_ERRORS,
        description="201 when created. An address is validated and standardised by "
        "Bandwidth and gets the customer-level emergency endpoint (use case 1.1); an "
        "address Bandwidth rejects is refused with 422 and nothing changes (1.2). Fields "
        "left out are reset (PUT replaces); use PATCH to change some.",
    ),
    Route(
        "PATCH",
        "/v1/customers/{customer_id}",
        "patch_customer",
        "Change a customer",
        200,
        "Customer",
        body="CustomerInput",
        errors=_CHANGE_ERRORS,
        description="JSON merge patch: fields left out stay, null clears. Clearing the "
        "address deletes the customer's endpoint at Bandwidth; its lines fall back.",
    ),
    Route(
        "DELETE",
        "/v1/customers/{customer_id}",
        "delete_customer",
        "Delete a customer",
        204,
        None,
        errors=_CHANGE_ERRORS,
        description="Refused with 409 while the customer has sites or accounts.",
    ),
    Route(
        "GET",
        "/v1/customers/{customer_id}/sites",
        "list_sites",
        "List a customer's sites",
        200,
        "SiteList",
    ),
    Route(
        "GET", "/v1/customers/{customer_id}/sites/{site_id}", "get_site", "Get a site", 200, "Site"
    ),
    Route(
        "PUT",
        "/v1/customers/{customer_id}/sites/{site_id}",
        "put_site",
        "Create or replace a site",
        200,
        "Site",
        body="SiteInput",
        errors=_CHANGE_ERRORS,
        description="201 when created. A site's address is stored as entered and validated "
        "by Bandwidth when the first account is assigned to the site (use cases 1.3, 1.4); "
        "once the site has an endpoint, an address change is validated at once.",
    ),
    Route(
        "PATCH",
        "/v1/customers/{customer_id}/sites/{site_id}",
        "patch_site",
        "Change a site",
        200,
        "Site",
        body="SiteInput",
        errors=_CHANGE_ERRORS,
    ),
    Route(
        "DELETE",
        "/v1/customers/{customer_id}/sites/{site_id}",
        "delete_site",
        "Delete a site",
        204,
        None,
        errors=_CHANGE_ERRORS,
        description="Deletes the site's endpoint at Bandwidth (1.5). Refused with 409 "
        "while accounts are assigned to the site.",
    ),
    Route(
        "GET",
        "/v1/customers/{customer_id}/accounts",
        "list_accounts",
        "List a customer's accounts",
        200,
        "AccountList",
    ),
    Route("GET", "/v1/accounts/{number}", "get_account", "Get an account (line)", 200, "Account"),
    Route(
        "PUT",
        "/v1/accounts/{number}",
        "put_account",
        "Create or replace an account",
        200,
        "Account",
        body="AccountInput",
        errors=_CHANGE_ERRORS,
        description="201 when created; customer_id is required to create. Assigning a site "
        "(site_id) provisions the site's endpoint if it has none; Bandwidth rejecting the "
        "site's address refuses the change with 422 and the account stays where it was.",
    ),
    Route(
        "PATCH",
        "/v1/accounts/{number}",
        "patch_account",
        "Change an account: own address, site assignment, name, callback",
        200,
        "Account",
        body="AccountInput",
        errors=_CHANGE_ERRORS,
        description="site_id null unassigns (the line falls back to the customer's "
        "endpoint, 1.5); an own address gets an account-level endpoint (1.7).",
    ),
    Route(
        "DELETE",
        "/v1/accounts/{number}",
        "delete_account",
        "Terminate an account",
        204,
        None,
        errors=_CHANGE_ERRORS,
        description="Removes the line record and deletes the account's own endpoint at "
        "Bandwidth (1.8); customer and site endpoints stay.",
    ),
    Route(
        "GET",
        "/v1/audit",
        "audit",
        "Read the audit trail of line location changes",
        200,
        "AuditList",
        errors=(401, 422, 503),
    ),
    Route(
        "GET",
        "/v1/calls",
        "calls",
        "Read the records of emergency calls",
        200,
        "CallList",
        errors=(401, 422, 503),
        description="One record per emergency call, oldest first: the caller, callback and "
        "number dialled, the provider_endpoint sent (and its cascade level) or the reason "
        "none was, every trunk tried with its result, the final status and the times of the "
        "INVITE, the answer and the BYE. Pass next_cursor as cursor for the next page.",
    ),
    Route(
        "GET",
        "/v1/coverage",
        "coverage",
        "How many lines would reach the PSAP with a location",
        200,
        "Coverage",
        errors=(401, 422, 503),
        description="Computed now from the provisioning state and the edge's line records "
        "(e911:line:*): a line is covered only when the state gives it an endpoint and its "
        "record names that endpoint. Counts are exact; the list of uncovered lines is paged "
        "with limit and offset (by number), the endpoint lists are cut to limit.",
    ),
    Route(
        "POST",
        "/v1/resync",
        "resync",
        "Rebuild every line record from provisioning state",
        200,
        "ResyncReport",
        errors=(401, 503),
    ),
)


def _schemas() -> dict[str, Any]:
    s = {"type": "string"}
    ns = {"type": ["string", "null"]}
    number = {"type": "string", "pattern": r"^\d{10}$"}
    nullable_number = {"type": ["string", "null"], "pattern": r"^\d{10}$"}
    ref = "#/components/schemas/"

    def obj(props: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"type": "object", "properties": props}
        if required:
            out["required"] = required
        return out

    location = {
        "address": {"oneOf": [{"$ref": ref + "Address"}, {"type": "null"}]},
        "address_status": {"type": "string", "enum": ["none", "unvalidated", "validated"]},
        "standardized_address": {
            "oneOf": [{"$ref": ref + "StandardizedAddress"}, {"type": "null"}]
        },
        "provider_endpoint": {
            **ns,
            "description": "{bw_account_id}/{endpoint_id} of this entity's own endpoint",
        },
        "endpoint_phone_number": ns,
        "contacts": {"oneOf": [{"$ref": ref + "Contacts"}, {"type": "null"}]},
        "created_at": s,
        "updated_at": s,
    }
    common_input = {
        "name": s,
        "callback_number": {
            **nullable_number,
            "description": "Customer/site: the number their shared endpoint carries at "
            "Bandwidth (else the lowest line using it). Account: a callback for the line's "
            "record when it differs from the line.",
        },
        "address": {"oneOf": [{"$ref": ref + "Address"}, {"type": "null"}]},
        "contacts": {
            "oneOf": [{"$ref": ref + "Contacts"}, {"type": "null"}],
            "description": "Kari's Law notification targets of this level; null inherits "
            "(account → site → customer → [notify] fallback).",
        },
    }
    return {
        "Contacts": obj(
            {
                "emails": {"type": "array", "items": s},
                "sms": {"type": "array", "items": s},
                "webhooks": {"type": "array", "items": s},
            }
        ),
        "Address": obj(
            {
                "line1": {**s, "example": "900 Main Campus Drive"},
                "line2": {**s, "maxLength": 60, "example": "Suite 500"},
                "city": {**s, "example": "Raleigh"},
                "state": {**s, "example": "NC"},
                "postal_code": {**s, "example": "27606"},
                "country": {**s, "default": "US"},
            },
            ["line1", "city", "state", "postal_code"],
        ),
        "StandardizedAddress": obj(
            {
                "address_id": s,
                "validation_status": s,
                "one_line": {
                    **s,
                    "example": "900 MAIN CAMPUS DR, STE 500, RALEIGH, NC 27606-5177, US",
                },
                "house_number": s,
                "predirectional": s,
                "street_name": s,
                "street_suffix": s,
                "postdirectional": s,
                "address_line2": s,
                "city": s,
                "state": s,
                "postal_code": s,
                "country": s,
            }
        ),
        "CustomerInput": obj(common_input),
        "SiteInput": obj(common_input),
        "AccountInput": obj(
            {
                "customer_id": {**s, "description": "Required to create an account."},
                "site_id": {**ns, "description": "Assign to a site; null unassigns."},
                **common_input,
            }
        ),
        "Customer": obj(
            {
                "customer_id": s,
                "name": s,
                "callback_number": nullable_number,
                **location,
                "sites": {"type": "array", "items": s},
                "accounts": {"type": "array", "items": number},
                "pending": {
                    "type": "boolean",
                    "description": "A saved change has side effects still to complete.",
                },
            }
        ),
        "Site": obj(
            {
                "customer_id": s,
                "site_id": s,
                "name": s,
                "callback_number": nullable_number,
                **location,
                "accounts": {"type": "array", "items": number},
            }
        ),
        "Effective": obj(
            {
                "level": {
                    "type": ["string", "null"],
                    "enum": ["account", "site", "customer", None],
                },
                "entity": ns,
                "provider_endpoint": ns,
                "address": ns,
                "status": {
                    "type": "string",
                    "enum": ["provisioned", "no_address", "not_provisioned"],
                },
            }
        ),
        "Account": obj(
            {
                "number": number,
                "customer_id": s,
                "site_id": ns,
                "name": s,
                "callback_number": nullable_number,
                **location,
                "effective": {"$ref": ref + "Effective"},
                "effective_contacts": {
                    **obj(
                        {
                            "emails": {"type": "array", "items": s},
                            "sms": {"type": "array", "items": s},
                            "webhooks": {"type": "array", "items": s},
                            "level": {
                                "type": ["string", "null"],
                                "enum": ["account", "site", "customer", None],
                            },
                        }
                    ),
                    "description": "Who is told of this line's 911 calls (Kari's Law) and "
                    "the level the list comes from; null level: the [notify] targets.",
                },
            }
        ),
        "CustomerList": obj({"customers": {"type": "array", "items": {"$ref": ref + "Customer"}}}),
        "SiteList": obj({"sites": {"type": "array", "items": {"$ref": ref + "Site"}}}),
        "AccountList": obj({"accounts": {"type": "array", "items": {"$ref": ref + "Account"}}}),
        "AuditEntry": obj(
            {
                "at": s,
                "who": s,
                "action": s,
                "entity": s,
                "line": number,
                "old_provider_endpoint": ns,
                "new_provider_endpoint": ns,
                "source": ns,
                "address": s,
            }
        ),
        "AuditList": obj({"entries": {"type": "array", "items": {"$ref": ref + "AuditEntry"}}}),
        "CallRecord": obj(
            {
                "id": s,
                "call_id": s,
                "caller": nullable_number,
                "callback": nullable_number,
                "number": {"type": "string", "enum": ["911", "933"]},
                "provider_endpoint": ns,
                "level": {
                    "type": ["string", "null"],
                    "enum": ["account", "site", "customer", None],
                },
                "outcome": {
                    "type": ["string", "null"],
                    "description": "enriched, no_location, store_error, cached, invalid_record, "
                    "no_caller, enrich_error or fail_open",
                },
                "trunks": {
                    "type": "array",
                    "items": obj(
                        {
                            "trunk": s,
                            "attempt": {"type": "integer"},
                            "enriched": {"type": "boolean"},
                            "result": {
                                **ns,
                                "description": "final status, or the failover reason "
                                "(a status code, timeout, no_provisional, transport)",
                            },
                        }
                    ),
                },
                "status": {"type": ["integer", "null"]},
                "end": {
                    "type": "string",
                    "enum": list(END_REASONS),
                },
                "invite_at": {"type": "string", "format": "date-time"},
                "answered_at": {"type": ["string", "null"], "format": "date-time"},
                "bye_at": {"type": ["string", "null"], "format": "date-time"},
            },
            ["id", "call_id", "number", "trunks", "end", "invite_at"],
        ),
        "CallList": obj(
            {
                "calls": {"type": "array", "items": {"$ref": ref + "CallRecord"}},
                "next_cursor": ns,
            }
        ),
        "ResyncReport": obj(
            {
                "ok": {"type": "boolean"},
                "customers": {"type": "integer"},
                "lines": {"type": "integer"},
                "written": {"type": "array", "items": number},
                "removed": {"type": "array", "items": number},
                "orphan_lines": {"type": "array", "items": number},
                "without_endpoint": {
                    "type": "array",
                    "items": obj(
                        {"line": number, "customer_id": s, "reason": s, "provider_endpoint": ns}
                    ),
                },
                "provider_checked": {"type": "boolean"},
                "provider_error": ns,
                "orphan_endpoints": {"type": "array", "items": s},
                "errors": {"type": "array", "items": s},
            }
        ),
        **_coverage_schemas(ref),
        "Health": obj({"status": s, "state": {"type": "boolean"}}),
        "Error": obj(
            {
                "error": obj(
                    {
                        "code": s,
                        "message": s,
                        "field": ns,
                        "bandwidth": {
                            "oneOf": [
                                obj(
                                    {
                                        "type": s,
                                        "code": {"type": ["integer", "null"]},
                                        "description": s,
                                        "field": ns,
                                    }
                                ),
                                {"type": "null"},
                            ]
                        },
                    },
                    ["code", "message", "bandwidth"],
                )
            },
            ["error"],
        ),
    }


_PARAMETERS = {
    "customer_id": {"type": "string", "pattern": r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"},
    "site_id": {"type": "string", "pattern": r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"},
    "number": {"type": "string", "pattern": r"^\d{10}$"},
}
_ERROR_TEXT = {
    400: "The body is not a JSON object",
    401: "Missing or invalid bearer token; nothing changed",
    404: "No such entity",
    409: "Conflicts with the current state (e.g. a site that still has accounts)",
    422: "Invalid request, or Bandwidth rejected the address (error.bandwidth says why); "
    "nothing changed",
    502: "Bandwidth refused this service's credentials or answered unexpectedly",
    503: "Bandwidth or a store is unavailable; see Retry-After",
}


def openapi_document(routes: tuple[Route, ...] = ROUTES) -> dict[str, Any]:
    """The OpenAPI 3.1 document of the provisioning API."""
    paths: dict[str, Any] = {}
    for route in routes:
        operation: dict[str, Any] = {
            "operationId": route.handler,
            "summary": route.summary,
            "responses": {},
        }
        if route.description:
            operation["description"] = route.description
        params = [
            {"name": name, "in": "path", "required": True, "schema": _PARAMETERS[name]}
            for name in re.findall(r"{(\w+)}", route.path)
        ]
        if route.handler == "audit":
            params += [
                {"name": "line", "in": "query", "schema": _PARAMETERS["number"]},
                {
                    "name": "limit",
                    "in": "query",
                    "schema": {
                        "type": "integer",
                        "minimum": 1,
                        "maximum": MAX_AUDIT_LIMIT,
                        "default": 100,
                    },
                },
            ]
        if route.handler == "calls":
            params += [
                {"name": "since", "in": "query", "schema": {"type": "string"}},
                {"name": "until", "in": "query", "schema": {"type": "string"}},
                {"name": "caller", "in": "query", "schema": _PARAMETERS["number"]},
                {"name": "cursor", "in": "query", "schema": {"type": "string"}},
                {
                    "name": "limit",
                    "in": "query",
                    "schema": {
                        "type": "integer",
                        "minimum": 1,
                        "maximum": MAX_PAGE,
                        "default": 100,
                    },
                },
            ]
        if route.handler == "coverage":
            params += _COVERAGE_PARAMETERS
        if params:
            operation["parameters"] = params
        if route.body is not None:
            operation["requestBody"] = {
                "required": True,
                "content": {
                    "application/json": {"schema": {"$ref": f"#/components/schemas/{route.body}"}}
                },
            }
        ok: dict[str, Any] = {"description": "OK" if route.ok != 204 else "Done"}
        if route.response is not None:
            ok["content"] = {
                "application/json": {"schema": {"$ref": f"#/components/schemas/{route.response}"}}
            }
        operation["responses"][str(route.ok)] = ok
        if route.method == "PUT":
            operation["responses"]["201"] = {**ok, "description": "Created"}
        for status in route.errors:
            operation["responses"][str(status)] = {
                "description": _ERROR_TEXT.get(status, "Error"),
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
            }
        if route.public:
            operation["security"] = []
        paths.setdefault(route.path, {})[route.method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "e911-sip provisioning API",
            "version": "1",
            "description": "Customers, customer sites and accounts (lines) with the "
            "addresses that become Bandwidth emergency endpoints. A line's location is its "
            "account's address, else its site's, else its customer's.",
        },
        "paths": paths,
        "components": {
            "schemas": _schemas(),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
    }


def build_provisioning_app(
    service: ProvisioningService,
    *,
    tokens: Mapping[str, str],
    calls: CallStore | None = None,
    coverage: CoverageMonitor | None = None,
) -> web.Application:
    """The provisioning API as an aiohttp application.

    ``tokens`` maps each accepted bearer token to a name; the name is recorded as "who" in
    the audit trail. An empty mapping locks every protected path.

    Raises:
        ValueError: a token is empty or has no name.
    """
    auth = _Auth(tokens)
    handlers = _Handlers(service, auth, openapi_document(), calls, coverage)
    app = web.Application(middlewares=[_errors, auth.middleware])
    for route in ROUTES:
        app.router.add_route(route.method, route.path, getattr(handlers, route.handler))
    return app
