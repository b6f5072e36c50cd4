"""A local emulator of Bandwidth's emergency provisioning API v2, for tests and demos.

Bandwidth's API cannot be reached from development machines or CI, and a stub that answers
whatever the client expects proves nothing. This emulator serves the same paths, status codes
and JSON shapes as the real service (as Bandwidth's public API reference describes them), over
real HTTP, so the client, the provisioning service and the end-to-end tests all run against
the behaviour they will meet in production:

* ``POST /api/v2/users/{accountId}/messages`` (Messaging API v2): texts are accepted (202)
  into an account-wide queue drained at ``messaging_rate`` messages a second that holds
  ``messaging_queue_seconds`` worth (900 s at 1 MPS by default, as Bandwidth's defaults);
  a message that does not fit answers 429 with Bandwidth's body,
  ``{"type": "max-message-queue-size-exceeded", "description": ...}``. Accepted messages
  are listed in ``GET /_emulator/state`` under ``messages``.
* ``POST /api/v1/oauth2/token``: client credentials with HTTP Basic; bearer tokens that
  expire after ``token_ttl`` seconds.
* ``/api/v2/accounts/{accountId}/emergency/...``: addresses (validated and standardised by
  :mod:`e911_sip.provisioning.addresses`), endpoints whose ids the client chooses, and the
  asynchronous orders that endpoint writes become (202, then PROCESSING for
  ``order_polls_until_complete`` polls, then COMPLETED / PARTIAL / FAILED, with per-endpoint
  results only in ``/details``).
* Bandwidth's error body on every error status:
  ``{"errors":[{"id","type","description","code","source":{"field"},"meta":{}}]}``.

Choices made where Bandwidth's behaviour is not published (recorded in docs/decisions.md):

* An order's effects are applied when it is accepted; only its reported status lags. A
  client that does not wait still sees the change, but one that waits is what is tested.
* Malformed addresses (unknown state, bad ZIP, ZIP in another state, non-US, line 2 too
  long, unreadable line 1) answer 400 ``request-validation`` with the field at fault;
  well-formed addresses on a street listed in ``nonexistent_streets`` answer 201 with
  ``validationStatus: INVALID``. Bandwidth is documented to do either.
* Per-endpoint order error codes are this emulator's own: see the ``ORDER_ERROR_*``
  constants. Only ``rate-limiting`` (32002) is Bandwidth's published code.
* A token for the right credentials but another account id gets ``wrong_account_status``
  (403 by default). ``region`` (NA or ROW) is required on every v2 call.
* Deleting an address that endpoints still use is refused with 400 ``address-in-use``.

Admin endpoints under ``/_emulator`` (no authentication; the emulator is meant for
loopback) let tests in another process inject faults and inspect state:

* ``POST /_emulator/faults`` with one fault object or a list of them, e.g.
  ``{"status": 429, "retry_after": 1, "count": 2, "path_prefix": "/api/v2"}``,
  ``{"status": 500}``, ``{"status": 401}``, ``{"delay": 2.0}`` or
  ``{"order_error": "PSAP lookup failed", "order_error_code": 13999}``. A fault applies to
  the next ``count`` (default 1) requests whose path starts with ``path_prefix`` (default
  ``/api/v2/``, so the token endpoint is only hit when named) and, if given, whose
  ``method`` matches. ``delay`` holds the answer back; ``status`` replaces it with
  Bandwidth's error body for that status (and ``Retry-After`` when ``retry_after`` is
  set); ``order_error`` lets the request through but fails every endpoint of the order it
  creates. ``GET`` lists pending faults, ``DELETE`` clears them.
* ``GET /_emulator/state``: addresses, endpoints, orders (with results, polls, history),
  pending faults, token counts and the request log.
* ``POST /_emulator/reset``: forget all data, faults and the request log (issued tokens
  stay valid).
* ``POST /_emulator/tokens/expire``: invalidate every issued token at once.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import re
import secrets
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

from aiohttp import web

from e911_sip.provisioning.addresses import (
    InvalidAddress,
    StandardizedAddress,
    normalize_street_line,
    standardize,
)

__all__ = [
    "ORDER_ERROR_ADDRESS_NOT_FOUND",
    "ORDER_ERROR_ADDRESS_NOT_VALID",
    "ORDER_ERROR_DUPLICATE_ENDPOINT",
    "ORDER_ERROR_ENDPOINT_NOT_FOUND",
    "EmulatorOptions",
    "build_emulator_app",
    "serve_emulator",
]

_LOG = logging.getLogger("e911_sip.bandwidth_emulator")

ORDER_ERROR_DUPLICATE_ENDPOINT = 13201
"""errorCode in order details when an added endpoint id already exists in the account."""
ORDER_ERROR_ADDRESS_NOT_FOUND = 13202
"""errorCode when an endpoint names an addressId the account does not have."""
ORDER_ERROR_ADDRESS_NOT_VALID = 13203
"""errorCode when an endpoint names an address whose validationStatus is not VALID."""
ORDER_ERROR_ENDPOINT_NOT_FOUND = 13204
"""errorCode when a bulk delete names an endpoint that does not exist."""

# Error types and codes of the error body. 32002 is Bandwidth's published rate-limiting code;
# the others are this emulator's choices.
_ERROR_CODES = {
    "request-validation": 12001,
    "address-in-use": 12009,
    "authentication-credentials": 10001,
    "forbidden": 10003,
    "resource-not-found": 14004,
    "method-not-allowed": 14005,
    "rate-limiting": 32002,
    "internal-server-error": 15000,
    "service-unavailable": 15003,
}
_STATUS_TYPES = {
    400: "request-validation",
    401: "authentication-credentials",
    403: "forbidden",
    404: "resource-not-found",
    405: "method-not-allowed",
    429: "rate-limiting",
    500: "internal-server-error",
}

_ENDPOINT_ID = re.compile(r"[A-Za-z0-9]{10,30}")
_E164 = re.compile(r"\+[1-9]\d{1,14}")
_ACCOUNT_PATH = re.compile(r"/api/v2/(?:accounts|users)/([^/]+)(?:/|$)")
_MESSAGING_PATH = re.compile(r"/api/v2/users/")
_E164 = re.compile(r"\+[1-9]\d{6,14}")
_MAX_ENDPOINTS_PER_ORDER = 100
_REQUEST_LOG_SIZE = 10_000


@dataclass(frozen=True, slots=True, kw_only=True)
class EmulatorOptions:
    """What the emulator accepts and how it behaves."""

    client_id: str = "e911-sip-emulator"
    """The only OAuth2 client id the token endpoint accepts."""
    client_secret: str = "emulator-secret"
    """The secret that goes with ``client_id``."""
    account_id: str = "5555555"
    """The one account that exists; any other id in a path is refused."""
    nonexistent_streets: tuple[str, ...] = ("1 NOWHERE ST", "123 FAKE ST", "0 MAIN ST")
    """Standardised street lines (house number and street, e.g. ``1 NOWHERE ST``) that "do
    not exist": addresses on them come back 201 with validationStatus INVALID, in any city."""
    token_ttl: int = 3600
    """Lifetime of an issued access token, in seconds (``expires_in``)."""
    order_polls_until_complete: int = 1
    """How many ``GET /orders/{id}`` answer PROCESSING before the final status (0: orders
    are already final in the 202)."""
    wrong_account_status: int = 403
    """Status for a valid token used on another account's path (403 or 404)."""
    require_region: bool = True
    """Refuse v2 calls without ``region=NA`` or ``region=ROW``, as Bandwidth's guide says."""
    default_page_size: int = 100
    """``limit`` when a list request gives none."""
    max_page_size: int = 1000
    """Largest ``limit`` accepted."""
    messaging_rate: float = 1.0
    """Account-wide outbound dequeue rate of the Messaging API, messages a second."""
    messaging_queue_seconds: float = 900.0
    """The account's message queue holds this many seconds' worth at ``messaging_rate``."""


class _ApiError(Exception):
    """An error answer in Bandwidth's shape; raised by handlers, rendered by the middleware."""

    def __init__(
        self,
        status: int,
        description: str,
        *,
        type: str | None = None,
        field: str | None = None,
        more: Iterable[tuple[str | None, str]] = (),
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(description)
        self.status = status
        self.type = (
            type
            or _STATUS_TYPES.get(status)
            or ("service-unavailable" if status >= 500 else "request-error")
        )
        self.items = [(field, description), *more]
        self.headers = dict(headers or {})

    def response(self) -> web.Response:
        return web.json_response(
            _error_body(self.type, self.items), status=self.status, headers=self.headers
        )


def _error_body(error_type: str, items: Iterable[tuple[str | None, str]]) -> dict[str, Any]:
    return {
        "errors": [
            {
                "id": uuid.uuid4().hex,
                "type": error_type,
                "description": description,
                "code": _ERROR_CODES.get(error_type),
                "source": {"field": error_field},
                "meta": {},
            }
            for error_field, description in items
        ]
    }


@dataclass(slots=True)
class _Fault:
    status: int | None
    retry_after: float | None
    delay: float | None
    order_error: str | None
    order_error_code: int | None
    count: int
    path_prefix: str
    method: str | None

    def matches(self, method: str, path: str) -> bool:
        return path.startswith(self.path_prefix) and self.method in (None, method)

    def to_json(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "retry_after": self.retry_after,
            "delay": self.delay,
            "order_error": self.order_error,
            "order_error_code": self.order_error_code,
            "count": self.count,
            "path_prefix": self.path_prefix,
            "method": self.method,
        }


@dataclass(slots=True)
class _Address:
    public: dict[str, Any]
    given: dict[str, str]


@dataclass(slots=True)
class _Order:
    id: str
    type: str
    results: list[dict[str, Any]]
    final_status: str
    updated: str
    polls: int = 0
    history: list[dict[str, str]] = field(default_factory=list)

    def complete(self, polls_needed: int) -> bool:
        return self.polls > polls_needed or polls_needed == 0

    def status(self, polls_needed: int) -> str:
        if self.complete(polls_needed):
            return self.final_status
        return "PROCESSING" if self.polls else "RECEIVED"

    def summary(self, polls_needed: int) -> dict[str, Any]:
        accepted = sum(1 for r in self.results if r["status"] == "SUCCESS")
        return {
            "orderId": self.id,
            "orderType": self.type,
            "orderStatus": self.status(polls_needed),
            "acceptedCount": accepted,
            "invalidCount": len(self.results) - accepted,
            "updated": self.updated,
            "totalNumber": len(self.results),
        }

    def details(self, polls_needed: int) -> dict[str, Any]:
        if self.complete(polls_needed):
            endpoints = [dict(r) for r in self.results]
        else:
            endpoints = [{"id": r["id"], "status": "INPROGRESS"} for r in self.results]
        return {**self.summary(polls_needed), "endpoints": endpoints}

    def note(self, status: str, when: str) -> None:
        if not self.history or self.history[-1]["orderStatus"] != status:
            self.history.append({"orderStatus": status, "updated": when})
            self.updated = when


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class _Emulator:
    """The emulated account, its tokens and the admin controls."""

    def __init__(self, options: EmulatorOptions, clock: Callable[[], float]) -> None:
        self.options = options
        self.clock = clock
        self.tokens: dict[str, float] = {}
        self.nonexistent = frozenset(normalize_street_line(s) for s in options.nonexistent_streets)
        self.addresses: dict[str, _Address] = {}
        self.endpoints: dict[str, dict[str, Any]] = {}
        self.orders: dict[str, _Order] = {}
        self.faults: list[_Fault] = []
        self.requests: deque[dict[str, Any]] = deque(maxlen=_REQUEST_LOG_SIZE)
        self.tokens_issued = 0
        self.messages: deque[dict[str, Any]] = deque(maxlen=_REQUEST_LOG_SIZE)
        self.message_queue = 0.0
        self.message_queue_at = clock()
        self.messages_refused = 0

    def reset(self) -> None:
        self.addresses.clear()
        self.endpoints.clear()
        self.orders.clear()
        self.faults.clear()
        self.requests.clear()
        self.tokens_issued = 0
        self.messages.clear()
        self.message_queue = 0.0
        self.messages_refused = 0

    # -- plumbing ---------------------------------------------------------------------

    @web.middleware
    async def middleware(
        self,
        request: web.Request,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        if request.path.startswith("/_emulator"):
            return await handler(request)
        try:
            response = await self._guarded(request, handler)
        except _ApiError as exc:
            response = exc.response()
        except web.HTTPException as exc:
            # Routing failures still answer in Bandwidth's error shape.
            if exc.status == 404:
                description = f"{request.path} does not exist"
            elif exc.status == 405:
                description = f"{request.method} is not allowed on {request.path}"
            else:
                description = exc.reason or "request failed"
            response = _ApiError(exc.status, description).response()
        except Exception:
            _LOG.exception("emulator failed on %s %s", request.method, request.path)
            response = _ApiError(500, "internal error in the emulator").response()
        self.requests.append(
            {
                "method": request.method,
                "path": request.path,
                "query": request.query_string,
                "status": response.status,
            }
        )
        return response

    async def _guarded(
        self,
        request: web.Request,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        fault = self._take_fault(request)
        if fault is not None:
            if fault.delay:
                await asyncio.sleep(fault.delay)
            if fault.status is not None:
                headers = {}
                if fault.retry_after is not None:
                    headers["Retry-After"] = f"{fault.retry_after:g}"
                raise _ApiError(
                    fault.status,
                    f"injected fault: HTTP {fault.status}",
                    headers=headers,
                )
        if request.path.startswith("/api/v2/"):
            self._authorize(request)
        return await handler(request)

    def _take_fault(self, request: web.Request) -> _Fault | None:
        for fault in self.faults:
            if (fault.status is not None or fault.delay) and fault.matches(
                request.method, request.path
            ):
                fault.count -= 1
                if fault.count <= 0:
                    self.faults.remove(fault)
                return fault
        return None

    def _take_order_fault(self, request: web.Request) -> _Fault | None:
        for fault in self.faults:
            if fault.order_error is not None and fault.matches(request.method, request.path):
                fault.count -= 1
                if fault.count <= 0:
                    self.faults.remove(fault)
                return fault
        return None

    def _authorize(self, request: web.Request) -> None:
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        expires = self.tokens.get(token.strip()) if scheme.lower() == "bearer" else None
        if expires is None or self.clock() >= expires:
            if expires is not None:
                del self.tokens[token.strip()]
            raise _ApiError(
                401,
                "missing, invalid or expired bearer token"
                if header
                else "the request has no Authorization header",
                headers={"WWW-Authenticate": 'Bearer realm="bandwidth"'},
            )
        match = _ACCOUNT_PATH.match(request.path)
        if match is None or match.group(1) != self.options.account_id:
            account = match.group(1) if match else "?"
            status = self.options.wrong_account_status
            raise _ApiError(
                status,
                f"account {account} does not exist or is not accessible with these credentials",
            )
        if _MESSAGING_PATH.match(request.path):
            return
        if self.options.require_region and request.query.get("region") not in ("NA", "ROW"):
            raise _ApiError(
                400,
                "query parameter region is required and must be NA or ROW",
                field="region",
            )

    # -- messaging --------------------------------------------------------------------

    async def create_message(self, request: web.Request) -> web.StreamResponse:
        try:
            body = json.loads(await request.read())
        except (ValueError, UnicodeDecodeError):
            body = None
        problems: list[dict[str, str]] = []
        if not isinstance(body, dict):
            body = {}
            problems.append({"fieldName": "body", "description": "must be a JSON object"})
        to = body.get("to")
        if isinstance(to, str):
            to = [to]
        if (
            not isinstance(to, list)
            or not to
            or not all(isinstance(n, str) and _E164.fullmatch(n) for n in to)
        ):
            problems.append({"fieldName": "to", "description": "E.164 numbers are required"})
        sender = body.get("from")
        if not isinstance(sender, str) or not _E164.fullmatch(sender):
            problems.append({"fieldName": "from", "description": "an E.164 number is required"})
        if not isinstance(body.get("applicationId"), str) or not body["applicationId"]:
            problems.append({"fieldName": "applicationId", "description": "is required"})
        text = body.get("text")
        if not isinstance(text, str) or not text:
            problems.append({"fieldName": "text", "description": "is required"})
        # ``to`` and ``text`` have their types whenever no problem was found.
        if problems or not isinstance(to, list) or not isinstance(text, str):
            return web.json_response(
                {
                    "type": "request-validation",
                    "description": "Your request could not be accepted",
                    "fieldErrors": problems,
                },
                status=400,
            )
        segments = max(1, -(-len(text) // 160)) * len(to)
        rate = self.options.messaging_rate
        capacity = rate * self.options.messaging_queue_seconds
        now = self.clock()
        self.message_queue = max(0.0, self.message_queue - (now - self.message_queue_at) * rate)
        self.message_queue_at = now
        if self.message_queue + segments > capacity:
            self.messages_refused += 1
            per_minute = rate * 60
            return web.json_response(
                {
                    "type": "max-message-queue-size-exceeded",
                    "description": (
                        "The SMS queue for your account is full and cannot accept more "
                        "messages right now. Your allowed rate is "
                        f"{per_minute:g} messages per minute. The capacity of this queue is "
                        f"{capacity:g} messages "
                        f"({self.options.messaging_queue_seconds / 60:g} minutes). Reduce "
                        "your message sending rate, or contact support to increase your "
                        "allowed rate."
                    ),
                },
                status=429,
            )
        self.message_queue += segments
        message = {
            "id": f"{int(time.time() * 1000)}{secrets.token_hex(8)}",
            "owner": sender,
            "applicationId": body["applicationId"],
            "time": _now(),
            "segmentCount": segments // len(to),
            "direction": "out",
            "to": to,
            "from": sender,
            "text": text,
            **({"tag": body["tag"]} if isinstance(body.get("tag"), str) else {}),
            **({"priority": body["priority"]} if "priority" in body else {}),
        }
        self.messages.append(message)
        return web.json_response(message, status=202)

    # -- OAuth2 -----------------------------------------------------------------------

    async def token(self, request: web.Request) -> web.StreamResponse:
        if not self._basic_credentials_ok(request.headers.get("Authorization", "")):
            raise _ApiError(
                401,
                "client credentials are missing or wrong",
                headers={"WWW-Authenticate": 'Basic realm="bandwidth"'},
            )
        form = await request.post()
        if form.get("grant_type") != "client_credentials":
            raise _ApiError(400, "grant_type must be client_credentials", field="grant_type")
        value = secrets.token_urlsafe(32)
        self.tokens[value] = self.clock() + self.options.token_ttl
        self.tokens_issued += 1
        return web.json_response(
            {"access_token": value, "token_type": "Bearer", "expires_in": self.options.token_ttl}
        )

    def _basic_credentials_ok(self, header: str) -> bool:
        scheme, _, encoded = header.partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            decoded = base64.b64decode(encoded.strip(), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return False
        client_id, sep, secret = decoded.partition(":")
        return bool(sep) and (
            secrets.compare_digest(client_id, self.options.client_id)
            & secrets.compare_digest(secret, self.options.client_secret)
        )

    # -- addresses --------------------------------------------------------------------

    async def create_address(self, request: web.Request) -> web.StreamResponse:
        body = await _json_object(request)
        given = _address_fields(body, partial=False)
        standard, status = self._validate(given)
        now = _now()
        address_id = str(uuid.uuid4())
        public = {
            "id": address_id,
            "validationStatus": status,
            **_address_json(standard),
            "description": given.get("description", ""),
            "created": now,
            "updated": now,
        }
        self.addresses[address_id] = _Address(public, given)
        return web.json_response(public, status=201)

    async def list_addresses(self, request: web.Request) -> web.StreamResponse:
        items = [a.public for a in self.addresses.values()]
        return web.json_response(self._page(request, items, "addresses"))

    async def get_address(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self._address(request).public)

    async def patch_address(self, request: web.Request) -> web.StreamResponse:
        address = self._address(request)
        body = await _json_object(request)
        changes = _address_fields(body, partial=True)
        given = {**address.given, **changes}
        standard, status = self._validate(given)
        address.given = given
        address.public.update(
            {
                "validationStatus": status,
                **_address_json(standard),
                "description": given.get("description", ""),
                "updated": _now(),
            }
        )
        return web.json_response(address.public)

    async def delete_address(self, request: web.Request) -> web.StreamResponse:
        address = self._address(request)
        address_id = address.public["id"]
        users = sorted(e["id"] for e in self.endpoints.values() if e["addressId"] == address_id)
        if users:
            raise _ApiError(
                400,
                f"address {address_id} is used by endpoint(s) {', '.join(users)}",
                type="address-in-use",
            )
        del self.addresses[address_id]
        return web.Response(status=204)

    def _address(self, request: web.Request) -> _Address:
        address_id = request.match_info["address_id"]
        address = self.addresses.get(address_id)
        if address is None:
            raise _ApiError(404, f"address {address_id} was not found")
        return address

    def _validate(self, given: Mapping[str, str]) -> tuple[StandardizedAddress, str]:
        try:
            standard = standardize(
                line1=given.get("addressLine1", ""),
                line2=given.get("addressLine2", ""),
                city=given.get("city", ""),
                state=given.get("state", ""),
                postal_code=given.get("postalCode", ""),
                country=given.get("country", "US"),
            )
        except InvalidAddress as exc:
            first, *rest = exc.problems
            raise _ApiError(
                400,
                first.reason,
                field=first.field,
                more=[(p.field, p.reason) for p in rest],
            ) from exc
        status = "INVALID" if standard.street_line in self.nonexistent else "VALID"
        return standard, status

    # -- endpoints --------------------------------------------------------------------

    async def create_endpoints(self, request: web.Request) -> web.StreamResponse:
        body = await _json_object(request)
        raw = body.get("endpoints")
        if not isinstance(raw, list) or not raw:
            raise _ApiError(400, "endpoints must be a non-empty array", field="endpoints")
        if len(raw) > _MAX_ENDPOINTS_PER_ORDER:
            raise _ApiError(
                400,
                f"at most {_MAX_ENDPOINTS_PER_ORDER} endpoints can be added in one order",
                field="endpoints",
            )
        problems: list[tuple[str | None, str]] = []
        for index, item in enumerate(raw):
            problems += _endpoint_problems(index, item)
        if problems:
            (first_field, first), *rest = problems
            raise _ApiError(400, first, field=first_field, more=rest)

        fault = self._take_order_fault(request)
        now = _now()
        results: list[dict[str, Any]] = []
        taken: set[str] = set()
        for item in raw:
            endpoint_id = item["id"]
            error = self._endpoint_error(endpoint_id, item["addressId"], taken, fault)
            taken.add(endpoint_id)
            if error is not None:
                results.append({"id": endpoint_id, "status": "ERROR", **error})
                continue
            self.endpoints[endpoint_id] = {
                "id": endpoint_id,
                "accountId": self.options.account_id,
                "phoneNumber": item["phoneNumber"],
                "name": item.get("name", ""),
                "lang": item.get("lang", "en"),
                "created": now,
                "updated": now,
                "country": item.get("country", "US"),
                "addressId": item["addressId"],
            }
            results.append({"id": endpoint_id, "status": "SUCCESS"})
        return self._accept_order("ADD_ENDPOINTS", results)

    def _endpoint_error(
        self, endpoint_id: str, address_id: str, taken: set[str], fault: _Fault | None
    ) -> dict[str, Any] | None:
        if endpoint_id in self.endpoints or endpoint_id in taken:
            return {
                "error": f"endpoint id {endpoint_id} already exists in account "
                f"{self.options.account_id}",
                "errorCode": ORDER_ERROR_DUPLICATE_ENDPOINT,
            }
        return self._address_error(address_id, fault)

    def _address_error(self, address_id: str, fault: _Fault | None) -> dict[str, Any] | None:
        address = self.addresses.get(address_id)
        if address is None:
            return {
                "error": f"address {address_id} does not exist",
                "errorCode": ORDER_ERROR_ADDRESS_NOT_FOUND,
            }
        if address.public["validationStatus"] != "VALID":
            return {
                "error": f"address {address_id} is {address.public['validationStatus']} and "
                "cannot be used for an endpoint",
                "errorCode": ORDER_ERROR_ADDRESS_NOT_VALID,
            }
        if fault is not None:
            return {"error": fault.order_error, "errorCode": fault.order_error_code}
        return None

    async def list_endpoints(self, request: web.Request) -> web.StreamResponse:
        address_id = request.query.get("addressId")
        items = [
            e for e in self.endpoints.values() if address_id is None or e["addressId"] == address_id
        ]
        return web.json_response(self._page(request, items, "endpoints"))

    async def get_endpoint(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self._endpoint(request))

    async def patch_endpoint(self, request: web.Request) -> web.StreamResponse:
        endpoint = self._endpoint(request)
        body = await _json_object(request)
        problems: list[tuple[str | None, str]] = []
        if body.get("action") != "PROVISION":
            problems.append(("action", "action must be PROVISION"))
        address_id = body.get("addressId")
        if not isinstance(address_id, str) or not address_id:
            problems.append(("addressId", "addressId is required"))
        if problems or not isinstance(address_id, str):
            (first_field, first), *rest = problems
            raise _ApiError(400, first, field=first_field, more=rest)
        error = self._address_error(address_id, self._take_order_fault(request))
        if error is not None:
            result = {"id": endpoint["id"], "status": "ERROR", **error}
        else:
            endpoint["addressId"] = address_id
            endpoint["updated"] = _now()
            result = {"id": endpoint["id"], "status": "SUCCESS"}
        return self._accept_order("UPDATE_ENDPOINTS", [result])

    async def delete_endpoint(self, request: web.Request) -> web.StreamResponse:
        endpoint = self._endpoint(request)
        return self._delete([endpoint["id"]], request)

    async def delete_endpoints(self, request: web.Request) -> web.StreamResponse:
        body = await _json_object(request)
        ids = body.get("endpointIds")
        if not isinstance(ids, list) or not ids or not all(isinstance(i, str) and i for i in ids):
            raise _ApiError(
                400, "endpointIds must be a non-empty array of ids", field="endpointIds"
            )
        return self._delete([str(i) for i in ids], request)

    def _delete(self, ids: list[str], request: web.Request) -> web.StreamResponse:
        fault = self._take_order_fault(request)
        results: list[dict[str, Any]] = []
        for endpoint_id in ids:
            if endpoint_id not in self.endpoints:
                results.append(
                    {
                        "id": endpoint_id,
                        "status": "ERROR",
                        "error": f"endpoint {endpoint_id} does not exist",
                        "errorCode": ORDER_ERROR_ENDPOINT_NOT_FOUND,
                    }
                )
            elif fault is not None:
                results.append(
                    {
                        "id": endpoint_id,
                        "status": "ERROR",
                        "error": fault.order_error,
                        "errorCode": fault.order_error_code,
                    }
                )
            else:
                del self.endpoints[endpoint_id]
                results.append({"id": endpoint_id, "status": "SUCCESS"})
        return self._accept_order("DELETE_ENDPOINTS", results)

    def _endpoint(self, request: web.Request) -> dict[str, Any]:
        endpoint_id = request.match_info["endpoint_id"]
        endpoint = self.endpoints.get(endpoint_id)
        if endpoint is None:
            raise _ApiError(404, f"endpoint {endpoint_id} was not found")
        return endpoint

    # -- orders -----------------------------------------------------------------------

    def _accept_order(self, order_type: str, results: list[dict[str, Any]]) -> web.StreamResponse:
        failed = sum(1 for r in results if r["status"] == "ERROR")
        final = "COMPLETED" if not failed else "FAILED" if failed == len(results) else "PARTIAL"
        now = _now()
        order = _Order(str(uuid.uuid4()), order_type, results, final, now)
        order.note(order.status(self.options.order_polls_until_complete), now)
        self.orders[order.id] = order
        return web.json_response(order.summary(self.options.order_polls_until_complete), status=202)

    async def get_order(self, request: web.Request) -> web.StreamResponse:
        order = self._order(request)
        order.polls += 1
        needed = self.options.order_polls_until_complete
        order.note(order.status(needed), _now())
        return web.json_response(order.summary(needed))

    async def order_details(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(
            self._order(request).details(self.options.order_polls_until_complete)
        )

    async def order_history(self, request: web.Request) -> web.StreamResponse:
        order = self._order(request)
        return web.json_response({"orderId": order.id, "history": order.history})

    def _order(self, request: web.Request) -> _Order:
        order_id = request.match_info["order_id"]
        order = self.orders.get(order_id)
        if order is None:
            raise _ApiError(404, f"order {order_id} was not found")
        return order

    # -- paging -----------------------------------------------------------------------

    def _page(self, request: web.Request, items: list[dict[str, Any]], key: str) -> dict[str, Any]:
        limit = _int_param(request, "limit", self.options.default_page_size)
        offset = _int_param(request, "offset", 0)
        if not 1 <= limit <= self.options.max_page_size:
            raise _ApiError(400, f"limit must be 1 to {self.options.max_page_size}", field="limit")
        if offset < 0:
            raise _ApiError(400, "offset must not be negative", field="offset")
        total = len(items)

        def link(rel: str, at: int) -> dict[str, str]:
            query = {k: v for k, v in request.query.items() if k not in ("limit", "offset")}
            query.update(limit=str(limit), offset=str(at))
            return {"href": f"{request.path}?{urlencode(query)}", "rel": rel, "method": "GET"}

        links = [link("first", 0)]
        if offset > 0:
            links.append(link("previous", max(0, offset - limit)))
        if offset + limit < total:
            links.append(link("next", offset + limit))
        links.append(link("last", ((total - 1) // limit) * limit if total else 0))
        return {"links": links, key: items[offset : offset + limit]}

    # -- admin ------------------------------------------------------------------------

    async def add_faults(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json(loads=json.loads)
        except ValueError as exc:
            raise web.HTTPBadRequest(text=f"body is not JSON: {exc}") from exc
        specs = body if isinstance(body, list) else [body]
        faults = [_parse_fault(spec) for spec in specs]
        self.faults += faults
        return web.json_response({"faults": [f.to_json() for f in self.faults]}, status=201)

    async def list_faults(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"faults": [f.to_json() for f in self.faults]})

    async def clear_faults(self, request: web.Request) -> web.StreamResponse:
        self.faults.clear()
        return web.Response(status=204)

    async def state(self, request: web.Request) -> web.StreamResponse:
        needed = self.options.order_polls_until_complete
        now = self.clock()
        return web.json_response(
            {
                "accountId": self.options.account_id,
                "addresses": [a.public for a in self.addresses.values()],
                "endpoints": list(self.endpoints.values()),
                "orders": [
                    {
                        **o.summary(needed),
                        "endpoints": [dict(r) for r in o.results],
                        "polls": o.polls,
                        "history": o.history,
                    }
                    for o in self.orders.values()
                ],
                "faults": [f.to_json() for f in self.faults],
                "tokensIssued": self.tokens_issued,
                "tokensValid": sum(1 for t in self.tokens.values() if t > now),
                "requests": list(self.requests),
                "messages": list(self.messages),
                "messagesRefused": self.messages_refused,
            }
        )

    async def reset_handler(self, request: web.Request) -> web.StreamResponse:
        self.reset()
        return web.Response(status=204)

    async def expire_tokens(self, request: web.Request) -> web.StreamResponse:
        self.tokens.clear()
        return web.Response(status=204)


def _parse_fault(spec: Any) -> _Fault:
    if not isinstance(spec, dict):
        raise web.HTTPBadRequest(text="a fault is a JSON object")

    def number(key: str) -> float | None:
        value = spec.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise web.HTTPBadRequest(text=f"{key} must be a non-negative number")
        return float(value)

    status = spec.get("status")
    if status is not None and (
        isinstance(status, bool) or not isinstance(status, int) or not 400 <= status <= 599
    ):
        raise web.HTTPBadRequest(text="status must be an HTTP error status (400-599)")
    count = spec.get("count", 1)
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise web.HTTPBadRequest(text="count must be a positive integer")
    order_error = spec.get("order_error")
    if order_error is not None and not isinstance(order_error, str):
        raise web.HTTPBadRequest(text="order_error must be a string")
    code = spec.get("order_error_code")
    if code is not None and (isinstance(code, bool) or not isinstance(code, int)):
        raise web.HTTPBadRequest(text="order_error_code must be an integer")
    delay = number("delay")
    if status is None and not delay and order_error is None:
        raise web.HTTPBadRequest(text="a fault needs status, delay or order_error")
    if status is not None and order_error is not None:
        raise web.HTTPBadRequest(text="status and order_error cannot be combined")
    method = spec.get("method")
    prefix = spec.get("path_prefix", "/api/v2/")
    if not isinstance(prefix, str) or (method is not None and not isinstance(method, str)):
        raise web.HTTPBadRequest(text="path_prefix and method must be strings")
    return _Fault(
        status=status,
        retry_after=number("retry_after"),
        delay=delay,
        order_error=order_error,
        order_error_code=code,
        count=count,
        path_prefix=prefix,
        method=method.upper() if method else None,
    )


async def _json_object(request: web.Request) -> dict[str, Any]:
    text = await request.text()
    try:
        body = json.loads(text) if text else None
    except ValueError as exc:
        raise _ApiError(400, "the request body is not valid JSON") from exc
    if not isinstance(body, dict):
        raise _ApiError(400, "the request body must be a JSON object")
    return body


_ADDRESS_KEYS = (
    "description",
    "addressLine1",
    "addressLine2",
    "city",
    "state",
    "postalCode",
    "country",
)
_REQUIRED_ADDRESS_KEYS = ("addressLine1", "city", "state", "postalCode")


def _address_fields(body: Mapping[str, Any], *, partial: bool) -> dict[str, str]:
    problems: list[tuple[str | None, str]] = []
    given: dict[str, str] = {}
    for key in _ADDRESS_KEYS:
        value = body.get(key)
        if value is None:
            if not partial and key in _REQUIRED_ADDRESS_KEYS:
                problems.append((key, f"{key} is required"))
            continue
        if not isinstance(value, str):
            problems.append((key, f"{key} must be a string"))
            continue
        given[key] = value
    if problems:
        (first_field, first), *rest = problems
        raise _ApiError(400, first, field=first_field, more=rest)
    return given


def _address_json(standard: StandardizedAddress) -> dict[str, str]:
    return {
        "houseNumber": standard.house_number,
        "predirectional": standard.predirectional,
        "streetName": standard.street_name,
        "streetSuffix": standard.street_suffix,
        "postdirectional": standard.postdirectional,
        "addressLine2": standard.address_line2,
        "city": standard.city,
        "state": standard.state,
        "postalCode": standard.postal_code,
        "country": standard.country,
    }


def _endpoint_problems(index: int, item: Any) -> list[tuple[str | None, str]]:
    where = f"endpoints[{index}]"
    if not isinstance(item, dict):
        return [(where, f"{where} must be an object")]
    problems: list[tuple[str | None, str]] = []
    endpoint_id = item.get("id")
    if not isinstance(endpoint_id, str) or not _ENDPOINT_ID.fullmatch(endpoint_id):
        problems.append((f"{where}.id", f"{where}.id must be 10-30 letters and digits"))
    number = item.get("phoneNumber")
    if not isinstance(number, str) or not _E164.fullmatch(number):
        problems.append(
            (f"{where}.phoneNumber", f"{where}.phoneNumber {number!r} is not E.164 (+13215551234)")
        )
    address_id = item.get("addressId")
    if not isinstance(address_id, str) or not address_id:
        problems.append((f"{where}.addressId", f"{where}.addressId is required"))
    for key in ("name", "lang", "country"):
        if key in item and not isinstance(item[key], str):
            problems.append((f"{where}.{key}", f"{where}.{key} must be a string"))
    return problems


def _int_param(request: web.Request, name: str, default: int) -> int:
    value = request.query.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError as exc:
        raise _ApiError(400, f"{name} must be an integer", field=name) from exc


def build_emulator_app(
    options: EmulatorOptions, *, clock: Callable[[], float] = time.monotonic
) -> web.Application:
    """The emulator as an aiohttp application; ``clock`` times token expiry."""
    emulator = _Emulator(options, clock)
    app = web.Application(middlewares=[emulator.middleware])
    base = "/api/v2/accounts/{account_id}/emergency"
    router = app.router
    router.add_post("/api/v1/oauth2/token", emulator.token)
    router.add_post(f"{base}/addresses", emulator.create_address)
    router.add_get(f"{base}/addresses", emulator.list_addresses)
    router.add_get(f"{base}/addresses/{{address_id}}", emulator.get_address)
    router.add_patch(f"{base}/addresses/{{address_id}}", emulator.patch_address)
    router.add_delete(f"{base}/addresses/{{address_id}}", emulator.delete_address)
    router.add_post(f"{base}/endpoints", emulator.create_endpoints)
    router.add_get(f"{base}/endpoints", emulator.list_endpoints)
    router.add_delete(f"{base}/endpoints", emulator.delete_endpoints)
    router.add_get(f"{base}/endpoints/{{endpoint_id}}", emulator.get_endpoint)
    router.add_patch(f"{base}/endpoints/{{endpoint_id}}", emulator.patch_endpoint)
    router.add_delete(f"{base}/endpoints/{{endpoint_id}}", emulator.delete_endpoint)
    router.add_get(f"{base}/orders/{{order_id}}", emulator.get_order)
    router.add_get(f"{base}/orders/{{order_id}}/details", emulator.order_details)
    router.add_get(f"{base}/orders/{{order_id}}/history", emulator.order_history)
    router.add_post("/api/v2/users/{account_id}/messages", emulator.create_message)
    router.add_post("/_emulator/faults", emulator.add_faults)
    router.add_get("/_emulator/faults", emulator.list_faults)
    router.add_delete("/_emulator/faults", emulator.clear_faults)
    router.add_get("/_emulator/state", emulator.state)
    router.add_post("/_emulator/reset", emulator.reset_handler)
    router.add_post("/_emulator/tokens/expire", emulator.expire_tokens)
    return app


async def serve_emulator(
    options: EmulatorOptions,
    *,
    host: str,
    port: int,
    ready: Callable[[int], None] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Serve the emulator on ``host:port`` until ``stop`` is set or the task is cancelled.

    ``ready`` is called with the bound port once the socket listens (``port=0`` picks a free
    one). Handlers are cancelled when their client disconnects, so an injected ``delay``
    does not outlive the request that timed out.
    """
    runner = web.AppRunner(build_emulator_app(options), handler_cancellation=True)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound = _bound_port(runner, port)
        _LOG.info(
            "Bandwidth emulator listening on http://%s:%d (account %s)",
            host,
            bound,
            options.account_id,
        )
        if ready is not None:
            ready(bound)
        if stop is None:
            await asyncio.Event().wait()
        else:
            await stop.wait()
    finally:
        await runner.cleanup()


def _bound_port(runner: web.AppRunner, requested: int) -> int:
    for address in runner.addresses:
        if isinstance(address, tuple) and len(address) >= 2 and isinstance(address[1], int):
            return address[1]
    return requested
