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

Each handler carries its own OpenAPI fragment: the :func:`operation` decorator registers its
method, path, schemas and statuses, the app serves exactly the registered operations and the
document is assembled from the same registry, so the two cannot drift apart. A new route is a
decorated ``_Handlers`` method and nothing else. The document is built here rather than by an
aiohttp plugin because the route set is small and those plugins pull in schema libraries this
product does not otherwise need.
"""

from __future__ import annotations

import hmac
import json
import logging
import math
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from aiohttp import web

from e911_sip.callrecords.book import END_REASONS, parse_time
from e911_sip.policy.emergency import normalize_nanp
from e911_sip.provisioning import cascade
from e911_sip.provisioning.calls import MAX_PAGE, CallQuery, CallStore, CallStoreError
from e911_sip.provisioning.coverage import COVERED_STATES, UNCOVERED_STATES, OrderStatus
from e911_sip.provisioning.coverage_monitor import CoverageMonitor
from e911_sip.provisioning.model import (
    Account,
    Address,
    Contacts,
    Customer,
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


def line_number(value: str) -> str:
    """A line number as the 10 digits it is stored under: ``+13215551234``, ``13215551234``
    and ``3215551234`` are one line, as they are to the edge. A value that is none of these
    is returned as given, for the check that refuses it to quote it."""
    return normalize_nanp(value) or value


def merge_patch(target: Any, patch: Any) -> Any:
    """``target`` with the JSON merge patch ``patch`` applied (RFC 7386 §2): a member set to
    null is removed, an object merges into an object member by member, anything else
    replaces."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _input_document(entity: Entity, **ids: str | None) -> dict[str, Any]:
    """An entity as the PUT body that would create it as it is (no null members): the
    target a PATCH's merge patch applies to."""
    doc: dict[str, Any] = {k: v for k, v in ids.items() if v is not None}
    if entity.name:
        doc["name"] = entity.name
    if entity.callback_number is not None:
        doc["callback_number"] = entity.callback_number
    if entity.address is not None:
        doc["address"] = entity.address.to_dict()
    if entity.contacts is not None:
        doc["contacts"] = entity.contacts.to_dict()
    return doc


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


def _number(body: Mapping[str, Any], key: str) -> str | None | Unset:
    value = _nullable(body, key)
    return line_number(value) if isinstance(value, str) else value


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
    """Parse a customer PUT body (or a merged PATCH). Raises ServiceError 422."""
    _check_keys(body, _COMMON_KEYS, {"customer_id": customer_id})
    return CustomerFields(
        name=_text(body, "name"),
        callback_number=_number(body, "callback_number"),
        address=_address(body, country),
        contacts=_contacts(body),
    )


def site_fields(
    body: Mapping[str, Any], *, customer_id: str, site_id: str, country: str
) -> SiteFields:
    """Parse a site PUT body (or a merged PATCH). Raises ServiceError 422."""
    _check_keys(body, _COMMON_KEYS, {"customer_id": customer_id, "site_id": site_id})
    return SiteFields(
        name=_text(body, "name"),
        callback_number=_number(body, "callback_number"),
        address=_address(body, country),
        contacts=_contacts(body),
    )


def account_fields(body: Mapping[str, Any], *, number: str, country: str) -> AccountFields:
    """Parse an account PUT body (or a merged PATCH). Raises ServiceError 422."""
    if isinstance(body.get("number"), str):
        body = {**body, "number": line_number(body["number"])}
    _check_keys(body, _COMMON_KEYS | {"customer_id", "site_id"}, {"number": number})
    customer_id = _nullable(body, "customer_id")
    if customer_id is None:
        raise _invalid("customer_id must be a string", field="customer_id")
    return AccountFields(
        customer_id=customer_id,
        site_id=_nullable(body, "site_id"),
        name=_text(body, "name"),
        callback_number=_number(body, "callback_number"),
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


@web.middleware
async def _media_type(request: web.Request, handler: Handler) -> web.StreamResponse:
    """415 for a body of a type the operation does not take (before anything reads it)."""
    resource = request.match_info.route.resource
    route = _REGISTRY.get((request.method, resource.canonical)) if resource is not None else None
    if route is not None and route.media_types and request.content_type not in route.media_types:
        raise ServiceError(
            415,
            "unsupported_media_type",
            f"{request.method} {route.path} takes Content-Type "
            f"{' or '.join(route.media_types)}, not {request.content_type}",
            field="Content-Type",
        )
    return await handler(request)


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
        unmatched = request.match_info.http_exception
        if unmatched is not None:
            # No route: a 404 (or 405) says nothing a token protects, and a 401 would send a
            # client with a typo in its URL to check its token.
            raise unmatched
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


# --- operations: each handler registers its route and its OpenAPI fragment -------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Route:
    """One operation: what registers the handler and what documents it."""

    method: str
    """HTTP method, upper case."""
    path: str
    """aiohttp path pattern; its ``{name}`` parts must be keys of ``PATH_PARAMETERS``."""
    handler: str
    """Name of the ``_Handlers`` method that serves it (also the ``operationId``)."""
    summary: str
    """One line for the OpenAPI document."""
    ok: int = 200
    """Status of success."""
    response: str | None = None
    """Component schema of the success body; None: no body."""
    body: str | None = None
    """Component schema of the request body; None: the operation takes none."""
    errors: tuple[int, ...] = (401, 404, 422, 503)
    """Error statuses it can answer (each documented with the ``Error`` schema)."""
    public: bool = False
    """Served without a bearer token."""
    description: str = ""
    """Longer text for the OpenAPI document."""
    query: tuple[dict[str, Any], ...] = ()
    """OpenAPI query parameter objects."""
    accepts: tuple[str, ...] | None = None
    """Request body media types, when not the default (see :attr:`media_types`)."""

    @property
    def media_types(self) -> tuple[str, ...]:
        """The request body types accepted (first: the one to use); none without a body.

        By default JSON; PATCH takes a JSON merge patch (RFC 7386), also accepted as plain
        JSON since many clients cannot set the type."""
        if self.body is None:
            return ()
        if self.accepts is not None:
            return self.accepts
        if self.method == "PATCH":
            return (MERGE_PATCH, "application/json")
        return ("application/json",)


MERGE_PATCH = "application/merge-patch+json"

_REGISTRY: dict[tuple[str, str], Route] = {}
"""Every operation by (method, path), in the order the handlers are defined."""

_H = TypeVar("_H", bound=Callable[..., Awaitable[web.StreamResponse]])


def operation(
    method: str,
    path: str,
    *,
    summary: str,
    ok: int = 200,
    response: str | None = None,
    body: str | None = None,
    errors: tuple[int, ...] = (401, 404, 422, 503),
    public: bool = False,
    description: str = "",
    query: tuple[dict[str, Any], ...] = (),
    accepts: tuple[str, ...] | None = None,
) -> Callable[[_H], _H]:
    """Register the decorated ``_Handlers`` method as ``method path`` with its OpenAPI
    fragment. The app serves exactly the registered operations and the document describes
    exactly them, so a handler cannot be served undocumented, nor documented unserved."""

    def register(handler: _H) -> _H:
        key = (method.upper(), path)
        if key in _REGISTRY:
            raise ValueError(f"{method} {path} is registered twice")
        _REGISTRY[key] = Route(
            method=key[0],
            path=path,
            handler=handler.__name__,
            summary=summary,
            ok=ok,
            response=response,
            body=body,
            errors=errors,
            public=public,
            description=description,
            query=query,
            accepts=accepts,
        )
        return handler

    return register


def routes() -> tuple[Route, ...]:
    """Every registered operation."""
    return tuple(_REGISTRY.values())


_CHANGE_ERRORS = (400, 401, 404, 409, 422, 502, 503)
IMPORT_MEDIA_TYPES = (
    "text/csv",
    "application/csv",
    "application/x-ndjson",
    "application/jsonl",
    "application/x-jsonlines",
    "application/octet-stream",
)
"""What a bulk import file may be sent as (octet-stream: told apart by its first character)."""
_MERGE_TEXT = (
    "JSON merge patch (RFC 7386, Content-Type application/merge-patch+json; "
    "application/json is accepted too): members left out stay, null removes one, and an "
    'object such as address merges member by member ({"address": {"line2": "Apt 4"}} '
    "changes only line2). The result is then checked as a PUT of it would be."
)

PATH_PARAMETERS: dict[str, dict[str, Any]] = {
    "customer_id": {"type": "string", "pattern": r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"},
    "site_id": {"type": "string", "pattern": r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"},
    "number": {
        "type": "string",
        "pattern": r"^(\+?1)?\d{10}$",
        "description": "A line: 10 digits, or +1 or 1 and the 10 digits (stored as 10)",
    },
    "import_id": {"type": "string", "pattern": r"^[0-9a-f]{16}$"},
}
"""The schema of every ``{name}`` a registered path may hold."""


def _limit(maximum: int) -> dict[str, Any]:
    return {
        "name": "limit",
        "in": "query",
        "schema": {"type": "integer", "minimum": 1, "maximum": maximum, "default": 100},
    }


_AUDIT_QUERY = (
    {"name": "line", "in": "query", "schema": PATH_PARAMETERS["number"]},
    _limit(MAX_AUDIT_LIMIT),
)
_CALLS_QUERY = (
    {"name": "since", "in": "query", "schema": {"type": "string"}},
    {"name": "until", "in": "query", "schema": {"type": "string"}},
    {"name": "caller", "in": "query", "schema": PATH_PARAMETERS["number"]},
    {"name": "cursor", "in": "query", "schema": {"type": "string"}},
    _limit(MAX_PAGE),
)

MAX_COVERAGE_LIMIT = 1000
"""The most uncovered lines one coverage page lists."""

_COVERAGE_QUERY = (
    {
        "name": "limit",
        "in": "query",
        "schema": {"type": "integer", "minimum": 1, "maximum": MAX_COVERAGE_LIMIT, "default": 100},
    },
    {"name": "offset", "in": "query", "schema": {"type": "integer", "minimum": 0, "default": 0}},
)


# --- handlers --------------------------------------------------------------------------------


class _Handlers:
    def __init__(
        self,
        service: ProvisioningService,
        auth: _Auth,
        document: dict[str, Any],
        calls: CallStore | None = None,
        imports: ImportJobs | None = None,
        coverage: CoverageMonitor | None = None,
    ) -> None:
        self._service = service
        self._calls = calls
        self._imports = imports
        self._coverage = coverage
        self._auth = auth
        self._document = document
        self._country = service.options.default_country

    @operation(
        "GET",
        "/healthz",
        summary="Health of the provisioning service",
        response="Health",
        errors=(503,),
        public=True,
    )
    async def healthz(self, request: web.Request) -> web.StreamResponse:
        ok = await self._service.healthy()
        return web.json_response(
            {"status": "ok" if ok else "unavailable", "state": ok}, status=200 if ok else 503
        )

    @operation("GET", "/openapi.json", summary="This document", errors=(), public=True)
    async def openapi(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self._document)

    # customers

    @operation(
        "GET", "/v1/customers", summary="List customers", response="CustomerList", errors=(401, 503)
    )
    async def list_customers(self, request: web.Request) -> web.StreamResponse:
        states = await self._service.list_customers()
        return web.json_response({"customers": [customer_view(s) for s in states]})

    @operation("GET", "/v1/customers/{customer_id}", summary="Get a customer", response="Customer")
    async def get_customer(self, request: web.Request) -> web.StreamResponse:
        state = await self._service.get_customer(request.match_info["customer_id"])
        return web.json_response(customer_view(state))

    @operation(
        "PUT",
        "/v1/customers/{customer_id}",
        summary="Create or replace a customer",
        response="Customer",
        body="CustomerInput",
        errors=_CHANGE_ERRORS,
        description="201 when created. An address is validated and standardised by "
        "Bandwidth and gets the customer-level emergency endpoint (use case 1.1); an "
        "address Bandwidth rejects is refused with 422 and nothing changes (1.2). Fields "
        "left out are reset (PUT replaces); use PATCH to change some.",
    )
    async def put_customer(self, request: web.Request) -> web.StreamResponse:
        cid = request.match_info["customer_id"]
        fields = customer_fields(await _json_body(request), customer_id=cid, country=self._country)
        saved = await self._service.put_customer(cid, fields, who=self._auth.who(request))
        return _saved(customer_view(saved.state), saved.created, f"/v1/customers/{cid}")

    @operation(
        "PATCH",
        "/v1/customers/{customer_id}",
        summary="Change a customer",
        response="Customer",
        body="CustomerInput",
        errors=_CHANGE_ERRORS,
        description=_MERGE_TEXT + " Clearing the address deletes the customer's endpoint "
        "at Bandwidth; its lines fall back.",
    )
    async def patch_customer(self, request: web.Request) -> web.StreamResponse:
        cid = request.match_info["customer_id"]
        patch = await _json_body(request)

        def merged(current: Customer) -> CustomerFields:
            doc = merge_patch(_input_document(current), patch)
            return customer_fields(doc, customer_id=cid, country=self._country)

        state = await self._service.patch_customer(cid, merged, who=self._auth.who(request))
        return web.json_response(customer_view(state))

    @operation(
        "DELETE",
        "/v1/customers/{customer_id}",
        summary="Delete a customer",
        ok=204,
        errors=_CHANGE_ERRORS,
        description="Refused with 409 while the customer has sites or accounts.",
    )
    async def delete_customer(self, request: web.Request) -> web.StreamResponse:
        cid = request.match_info["customer_id"]
        await self._service.delete_customer(cid, who=self._auth.who(request))
        return web.Response(status=204)

    # sites

    @operation(
        "GET",
        "/v1/customers/{customer_id}/sites",
        summary="List a customer's sites",
        response="SiteList",
    )
    async def list_sites(self, request: web.Request) -> web.StreamResponse:
        state = await self._service.get_customer(request.match_info["customer_id"])
        sites = [site_view(state, state.sites[k]) for k in sorted(state.sites)]
        return web.json_response({"sites": sites})

    @operation(
        "GET", "/v1/customers/{customer_id}/sites/{site_id}", summary="Get a site", response="Site"
    )
    async def get_site(self, request: web.Request) -> web.StreamResponse:
        state, site = await self._service.get_site(
            request.match_info["customer_id"], request.match_info["site_id"]
        )
        return web.json_response(site_view(state, site))

    @operation(
        "PUT",
        "/v1/customers/{customer_id}/sites/{site_id}",
        summary="Create or replace a site",
        response="Site",
        body="SiteInput",
        errors=_CHANGE_ERRORS,
        description="201 when created. A site's address is stored as entered and validated "
        "by Bandwidth when the first account is assigned to the site (use cases 1.3, 1.4); "
        "once the site has an endpoint, an address change is validated at once.",
    )
    async def put_site(self, request: web.Request) -> web.StreamResponse:
        cid, sid = request.match_info["customer_id"], request.match_info["site_id"]
        body = await _json_body(request)
        fields = site_fields(body, customer_id=cid, site_id=sid, country=self._country)
        saved = await self._service.put_site(cid, sid, fields, who=self._auth.who(request))
        view = site_view(saved.state, saved.state.sites[sid])
        return _saved(view, saved.created, f"/v1/customers/{cid}/sites/{sid}")

    @operation(
        "PATCH",
        "/v1/customers/{customer_id}/sites/{site_id}",
        summary="Change a site",
        response="Site",
        body="SiteInput",
        errors=_CHANGE_ERRORS,
        description=_MERGE_TEXT,
    )
    async def patch_site(self, request: web.Request) -> web.StreamResponse:
        cid, sid = request.match_info["customer_id"], request.match_info["site_id"]
        patch = await _json_body(request)

        def merged(current: Site) -> SiteFields:
            doc = merge_patch(_input_document(current), patch)
            return site_fields(doc, customer_id=cid, site_id=sid, country=self._country)

        state = await self._service.patch_site(cid, sid, merged, who=self._auth.who(request))
        return web.json_response(site_view(state, state.sites[sid]))

    @operation(
        "DELETE",
        "/v1/customers/{customer_id}/sites/{site_id}",
        summary="Delete a site",
        ok=204,
        errors=_CHANGE_ERRORS,
        description="Deletes the site's endpoint at Bandwidth (1.5). Refused with 409 "
        "while accounts are assigned to the site.",
    )
    async def delete_site(self, request: web.Request) -> web.StreamResponse:
        cid, sid = request.match_info["customer_id"], request.match_info["site_id"]
        await self._service.delete_site(cid, sid, who=self._auth.who(request))
        return web.Response(status=204)

    # accounts

    @operation(
        "GET",
        "/v1/customers/{customer_id}/accounts",
        summary="List a customer's accounts",
        response="AccountList",
    )
    async def list_accounts(self, request: web.Request) -> web.StreamResponse:
        state = await self._service.get_customer(request.match_info["customer_id"])
        accounts = [account_view(state, state.accounts[k]) for k in sorted(state.accounts)]
        return web.json_response({"accounts": accounts})

    @operation("GET", "/v1/accounts/{number}", summary="Get an account (line)", response="Account")
    async def get_account(self, request: web.Request) -> web.StreamResponse:
        number = line_number(request.match_info["number"])
        state, account = await self._service.get_account(number)
        return web.json_response(account_view(state, account))

    @operation(
        "PUT",
        "/v1/accounts/{number}",
        summary="Create or replace an account",
        response="Account",
        body="AccountInput",
        errors=_CHANGE_ERRORS,
        description="201 when created; customer_id is required to create. Assigning a site "
        "(site_id) provisions the site's endpoint if it has none; Bandwidth rejecting the "
        "site's address refuses the change with 422 and the account stays where it was.",
    )
    async def put_account(self, request: web.Request) -> web.StreamResponse:
        number = line_number(request.match_info["number"])
        fields = account_fields(await _json_body(request), number=number, country=self._country)
        saved = await self._service.put_account(number, fields, who=self._auth.who(request))
        view = account_view(saved.state, saved.state.accounts[number])
        return _saved(view, saved.created, f"/v1/accounts/{number}")

    @operation(
        "PATCH",
        "/v1/accounts/{number}",
        summary="Change an account: own address, site assignment, name, callback",
        response="Account",
        body="AccountInput",
        errors=_CHANGE_ERRORS,
        description=_MERGE_TEXT + " site_id null unassigns (the line falls back to the "
        "customer's endpoint, 1.5); an own address gets an account-level endpoint (1.7).",
    )
    async def patch_account(self, request: web.Request) -> web.StreamResponse:
        number = line_number(request.match_info["number"])
        patch = await _json_body(request)

        def merged(current: Account) -> AccountFields:
            target = _input_document(
                current, customer_id=current.customer_id, site_id=current.site_id
            )
            doc = merge_patch(target, patch)
            return account_fields(doc, number=number, country=self._country)

        state = await self._service.patch_account(number, merged, who=self._auth.who(request))
        return web.json_response(account_view(state, state.accounts[number]))

    @operation(
        "DELETE",
        "/v1/accounts/{number}",
        summary="Terminate an account",
        ok=204,
        errors=_CHANGE_ERRORS,
        description="Removes the line record and deletes the account's own endpoint at "
        "Bandwidth (1.8); customer and site endpoints stay.",
    )
    async def delete_account(self, request: web.Request) -> web.StreamResponse:
        number = line_number(request.match_info["number"])
        await self._service.terminate_account(number, who=self._auth.who(request))
        return web.Response(status=204)

    # audit and resync

    @operation(
        "GET",
        "/v1/audit",
        summary="Read the audit trail of line location changes",
        response="AuditList",
        errors=(401, 422, 503),
        query=_AUDIT_QUERY,
    )
    async def audit(self, request: web.Request) -> web.StreamResponse:
        line = request.query.get("line")
        if line is not None:
            line = line_number(line)
        raw_limit = request.query.get("limit", "100")
        if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= MAX_AUDIT_LIMIT:
            raise _invalid(f"limit must be an integer from 1 to {MAX_AUDIT_LIMIT}", field="limit")
        entries = await self._service.audit_trail(line=line, limit=int(raw_limit))
        return web.json_response({"entries": [e.to_dict() for e in entries]})

    @operation(
        "GET",
        "/v1/calls",
        summary="Read the records of emergency calls",
        response="CallList",
        errors=(401, 422, 503),
        description="One record per emergency call, oldest first: the caller, callback and "
        "number dialled, the provider_endpoint sent (and its cascade level) or the reason "
        "none was, every trunk tried with its result, the final status and the times of the "
        "INVITE, the answer and the BYE. Pass next_cursor as cursor for the next page.",
        query=_CALLS_QUERY,
    )
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

    @operation(
        "GET",
        "/v1/coverage",
        summary="How many lines would reach the PSAP with a location",
        response="Coverage",
        errors=(401, 422, 503),
        description="Computed now from the provisioning state and the edge's line records "
        "(e911:line:*): a line is covered only when the state gives it an endpoint and its "
        "record names that endpoint. Counts are exact; the list of uncovered lines is paged "
        "with limit and offset (by number), the endpoint lists are cut to limit.",
        query=_COVERAGE_QUERY,
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

    @operation(
        "POST",
        "/v1/resync",
        summary="Rebuild every line record from provisioning state",
        response="ResyncReport",
        errors=(401, 503),
    )
    async def resync(self, request: web.Request) -> web.StreamResponse:
        report = await self._service.resync(who=self._auth.who(request))
        return web.json_response(report.to_dict())

    # -- bulk import ------------------------------------------------------------------------
    def _jobs(self) -> ImportJobs:
        if self._imports is None:
            raise ServiceError(404, "not_found", "bulk import is not enabled in this service")
        return self._imports

    @operation(
        "POST",
        "/v1/imports",
        summary="Import a file of customers, sites and accounts (asynchronous)",
        ok=202,
        response="ImportJob",
        body="ImportFile",
        accepts=IMPORT_MEDIA_TYPES,
        errors=(400, 401, 404, 413, 422, 503),
        description="The body is the file: CSV (Content-Type text/csv) or JSON lines "
        "(application/x-ndjson), one entity a row, each row the PUT of that entity "
        "(docs/provisioning.md); application/octet-stream is told apart by its first "
        "character. The file is checked and the job saved before the 202; Location and "
        "status_url name the job. Rows already in effect change nothing, so the same file "
        "can be imported again after a failure.",
    )
    async def create_import(self, request: web.Request) -> web.StreamResponse:
        jobs = self._jobs()
        limit = jobs.max_bytes
        if request.content_length is not None and request.content_length > limit:
            raise ServiceError(413, "file_too_large", f"the file is larger than {limit} bytes")
        chunks: list[bytes] = []
        size = 0
        # Read past aiohttp's client_max_size (1 MiB), up to the import's own bound.
        async for chunk in request.content.iter_chunked(1 << 16):
            size += len(chunk)
            if size > limit:
                raise ServiceError(413, "file_too_large", f"the file is larger than {limit} bytes")
            chunks.append(chunk)
        view = await jobs.submit(
            b"".join(chunks),
            content_type=request.headers.get("Content-Type", ""),
            who=self._auth.who(request),
        )
        location = f"/v1/imports/{view['id']}"
        return web.json_response(
            {**view, "status_url": location}, status=202, headers={"Location": location}
        )

    @operation(
        "GET",
        "/v1/imports",
        summary="List import jobs",
        response="ImportList",
        errors=(401, 404, 503),
    )
    async def list_imports(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"imports": await self._jobs().list_jobs()})

    @operation(
        "GET",
        "/v1/imports/{import_id}",
        summary="Progress of an import job; once completed, every failed row and why",
        response="ImportJob",
        errors=(401, 404, 503),
    )
    async def get_import(self, request: web.Request) -> web.StreamResponse:
        jobs = self._jobs()
        job_id = request.match_info["import_id"]
        view = await jobs.status(job_id) if _IMPORT_ID.fullmatch(job_id) else None
        if view is None:
            raise ServiceError(404, "not_found", f"import {job_id} does not exist")
        return web.json_response(view)


PUBLIC_PATHS = frozenset(route.path for route in routes() if route.public)
"""Paths served without a token."""


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
    if caller is not None:
        caller = line_number(caller)
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


# --- the OpenAPI document ----------------------------------------------------------------------


def _schemas() -> dict[str, Any]:
    s = {"type": "string"}
    ns = {"type": ["string", "null"]}
    number = {"type": "string", "pattern": r"^\d{10}$"}
    nullable_number = {"type": ["string", "null"], "pattern": r"^\d{10}$"}
    number_input = {"type": ["string", "null"], "pattern": r"^(\+?1)?\d{10}$"}
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
            **number_input,
            "description": "10 digits, or +1 or 1 and the 10 digits (stored as 10). "
            "Customer/site: the number their shared endpoint carries at "
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


_ERROR_TEXT = {
    400: "The body is not a JSON object",
    415: "The body's Content-Type is not one the operation takes; nothing changed",
    401: "Missing or invalid bearer token; nothing changed",
    404: "No such entity",
    409: "Conflicts with the current state (e.g. a site that still has accounts), or "
    "concurrent_change: another process saved the customer first; retry",
    422: "Invalid request, or Bandwidth rejected the address (error.bandwidth says why); "
    "nothing changed",
    502: "Bandwidth refused this service's credentials or answered unexpectedly",
    503: "Bandwidth or a store is unavailable, or the customer is being changed by another "
    "provisioning process (customer_busy, lease_lost); see Retry-After",
}


# --- bulk import ------------------------------------------------------------------------------


class ImportJobs(Protocol):
    """What the API needs from the bulk importer (``imports.ImportRunner`` has this shape)."""

    @property
    def max_bytes(self) -> int: ...

    async def submit(self, data: bytes, *, content_type: str, who: str) -> dict[str, Any]: ...

    async def status(self, job_id: str) -> dict[str, Any] | None: ...

    async def list_jobs(self) -> list[dict[str, Any]]: ...


_IMPORT_ID = re.compile(r"[0-9a-f]{16}")


def _import_schemas() -> dict[str, Any]:
    count = {"type": "integer", "minimum": 0}
    job = {
        "type": "object",
        "properties": {
            "id": {"type": "string"},
            "who": {"type": "string"},
            "state": {"type": "string", "enum": ["queued", "running", "completed"]},
            "created_at": {"type": "string"},
            "finished_at": {"type": "string"},
            "total": count,
            "done": count,
            "failed": count,
            "pending": count,
            "status_url": {"type": "string"},
            "failures": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "line": {"type": "integer"},
                        "entity": {"type": "string"},
                        "code": {"type": "string"},
                        "message": {"type": "string"},
                    },
                },
            },
        },
        "required": ["id", "state", "total", "done", "failed", "pending"],
    }
    return {
        "ImportFile": {"type": "string", "description": "The file: CSV or JSON lines"},
        "ImportJob": job,
        "ImportList": {
            "type": "object",
            "properties": {
                "imports": {"type": "array", "items": {"$ref": "#/components/schemas/ImportJob"}}
            },
        },
    }


def openapi_document(operations: tuple[Route, ...] | None = None) -> dict[str, Any]:
    """The OpenAPI 3.1 document of the provisioning API (default: every registered operation)."""
    paths: dict[str, Any] = {}
    for route in routes() if operations is None else operations:
        op: dict[str, Any] = {
            "operationId": route.handler,
            "summary": route.summary,
            "responses": {},
        }
        if route.description:
            op["description"] = route.description
        params = [
            {"name": name, "in": "path", "required": True, "schema": PATH_PARAMETERS[name]}
            for name in re.findall(r"{(\w+)}", route.path)
        ]
        params += route.query
        if params:
            op["parameters"] = params
        if route.body is not None:
            schema = {"$ref": f"#/components/schemas/{route.body}"}
            op["requestBody"] = {
                "required": True,
                "content": {media: {"schema": schema} for media in route.media_types},
            }
        ok: dict[str, Any] = {"description": "OK" if route.ok != 204 else "Done"}
        if route.response is not None:
            ok["content"] = {
                "application/json": {"schema": {"$ref": f"#/components/schemas/{route.response}"}}
            }
        op["responses"][str(route.ok)] = ok
        if route.method == "PUT":
            op["responses"]["201"] = {**ok, "description": "Created"}
        errors = sorted({*route.errors, 415}) if route.media_types else route.errors
        for status in errors:
            op["responses"][str(status)] = {
                "description": _ERROR_TEXT.get(status, "Error"),
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
            }
        if route.public:
            op["security"] = []
        paths.setdefault(route.path, {})[route.method.lower()] = op
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
            "schemas": {**_schemas(), **_import_schemas()},
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
    }


def build_provisioning_app(
    service: ProvisioningService,
    *,
    tokens: Mapping[str, str],
    calls: CallStore | None = None,
    imports: ImportJobs | None = None,
    coverage: CoverageMonitor | None = None,
) -> web.Application:
    """The provisioning API as an aiohttp application.

    ``tokens`` maps each accepted bearer token to a name; the name is recorded as "who" in
    the audit trail. An empty mapping locks every protected path. ``imports`` serves
    ``/v1/imports`` (bulk import jobs); without it those paths answer 404.

    Raises:
        ValueError: a token is empty or has no name.
    """
    auth = _Auth(tokens)
    handlers = _Handlers(service, auth, openapi_document(), calls, imports, coverage)
    app = web.Application(middlewares=[_errors, auth.middleware, _media_type])
    for route in routes():
        app.router.add_route(route.method, route.path, getattr(handlers, route.handler))
    return app
