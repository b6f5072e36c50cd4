"""Client for Bandwidth's emergency provisioning API v2 (Unified Emergency Services).

Provisioning turns a customer, site or account address into a Bandwidth *address* and an
*endpoint* that points at it; the edge later names that endpoint in the Geolocation header of
every 911 call. This module is the only code that talks to Bandwidth for that, and it hides
the parts of the API that make a naive client unsafe:

* OAuth2 client credentials. The token is cached and refreshed ``token_refresh_margin``
  before it expires; a 401 drops it, fetches one more and retries once.
* Back-off and retry (Bandwidth's own guidance): 429, 5xx, timeouts and connection errors
  are retried with exponential back-off and full jitter, honouring ``Retry-After``, within
  ``max_attempts`` and ``max_retry_time``. Other 4xx are final. A 429 is about the
  account, not the request: while one caller waits out its back-off, every other call
  through this client waits too (one shared gate) instead of adding to the storm.
* Endpoint writes are asynchronous orders (202). The client polls the order, reads its
  details (per-endpoint failures appear only there) and waits a bounded time.
* Endpoint ids are chosen by us (:func:`make_endpoint_id`), so provisioning is idempotent:
  an endpoint that already exists is re-pointed with ``PATCH {"action": "PROVISION"}``
  rather than duplicated.

Every failure surfaces as a :class:`BandwidthError` subclass; aiohttp and asyncio
exceptions never escape. ``sleep``, ``clock`` and ``rand`` are injected so retry timing is
testable without waiting. Logs go to ``e911_sip.bandwidth`` and never carry credentials or
tokens.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import hashlib
import json
import logging
import random
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self, TypeVar
from urllib.parse import quote

import aiohttp

from e911_sip.provisioning.model import Address, StandardizedAddress

__all__ = [
    "AddressRejected",
    "AuthenticationFailed",
    "BandwidthClient",
    "BandwidthError",
    "BandwidthOptions",
    "Endpoint",
    "NotFound",
    "OrderFailed",
    "ProviderUnavailable",
    "RateLimited",
    "make_endpoint_id",
]

_LOG = logging.getLogger("e911_sip.bandwidth")

_ENDPOINT_ID = re.compile(r"[A-Za-z0-9]{10,30}")
_KIND_PREFIX = re.compile(r"[^A-Za-z0-9]")
_FINAL_ORDER_STATES = frozenset({"COMPLETED", "PARTIAL", "FAILED"})
_USER_AGENT = "e911-sip"


@dataclass(frozen=True, slots=True, kw_only=True)
class BandwidthOptions:
    """How to reach Bandwidth's emergency API and how patient to be with it."""

    account_id: str
    """Bandwidth account id; also the first half of every ``provider_endpoint``."""
    client_id: str
    """OAuth2 client id of the API credential."""
    client_secret: str
    """OAuth2 client secret; only ever sent to ``token_url`` and never logged."""
    api_base: str = "https://api.bandwidth.com/api/v2"
    """API root; calls go to ``{api_base}/accounts/{account_id}/emergency/...``."""
    token_url: str = "https://api.bandwidth.com/api/v1/oauth2/token"
    """OAuth2 token endpoint (client credentials grant)."""
    region: str = "NA"
    """Sent as ``?region=`` on every API call; Bandwidth requires it even for US data."""
    request_timeout: float = 10.0
    """Seconds one HTTP exchange may take before it counts as a timeout (and is retried)."""
    max_attempts: int = 5
    """Attempts per logical call for 429, 5xx, timeouts and connection errors."""
    max_retry_time: float = 30.0
    """Seconds, from the first attempt, after which no further retry is started."""
    backoff_base: float = 0.5
    """Back-off before retry n is ``min(backoff_cap, backoff_base * 2**(n-1)) * rand()``."""
    backoff_cap: float = 8.0
    """Upper bound of one back-off, before jitter."""
    order_poll_interval: float = 0.5
    """Seconds between polls of a 202 order."""
    order_timeout: float = 30.0
    """Seconds to wait for an order to finish before giving up with ProviderUnavailable."""
    token_refresh_margin: float = 60.0
    """Refresh the OAuth2 token this long before it expires (at most half its lifetime)."""
    page_size: int = 100
    """``limit`` used when listing endpoints page by page."""
    messaging_base: str = "https://messaging.bandwidth.com/api/v2"
    """Messaging API root; texts go to ``{messaging_base}/users/{account_id}/messages``."""
    accept_unvalidated: bool = False
    """Accept an address Bandwidth returns as UNVALIDATED. Off: such an address is refused,
    because an unvalidated address may not route a 911 call to the right PSAP."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Endpoint:
    """An emergency endpoint as ``GET /endpoints/{id}`` shows it."""

    id: str
    """Our endpoint id (see :func:`make_endpoint_id`)."""
    account_id: str
    """Bandwidth account holding the endpoint."""
    phone_number: str
    """E.164 callback number (``+13215551234``)."""
    name: str
    """Display name, for operators."""
    address_id: str
    """The address the endpoint dispatches to."""
    created: str
    """Creation time as Bandwidth reports it."""
    updated: str
    """Last update time as Bandwidth reports it."""

    @property
    def provider_endpoint(self) -> str:
        """``{account_id}/{id}``: what the location store holds and the Geolocation URL ends in."""
        return f"{self.account_id}/{self.id}"


class BandwidthError(Exception):
    """Bandwidth refused or could not serve a request.

    The attributes mirror Bandwidth's error body (``errors[0]``). ``status`` is 0 when the
    failure was not an HTTP error status (network failure, timeout, an order's outcome).
    """

    def __init__(
        self,
        description: str,
        *,
        status: int = 0,
        type: str = "",
        code: int | None = None,
        field: str | None = None,
    ) -> None:
        super().__init__(description)
        self.status = status
        self.type = type
        self.code = code
        self.description = description
        self.field = field

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.description!r}, status={self.status}, "
            f"type={self.type!r}, code={self.code!r}, field={self.field!r})"
        )


class AuthenticationFailed(BandwidthError):
    """The credentials were refused (401 after one token refresh, or 403)."""


class NotFound(BandwidthError):
    """Bandwidth answered 404 for something that should exist."""


class RateLimited(BandwidthError):
    """Bandwidth kept answering 429 until the retry budget ran out."""

    def __init__(self, description: str, *, retry_after: float | None = None, **kw: Any) -> None:
        super().__init__(description, **kw)
        self.retry_after = retry_after
        """Seconds Bandwidth last asked us to wait, if it said."""


class AddressRejected(BandwidthError):
    """Bandwidth found the address invalid; ``description`` says what to fix."""


class OrderFailed(BandwidthError):
    """An endpoint order ended FAILED or PARTIAL, or an endpoint in it ended in ERROR.

    ``description`` is the endpoint's ``error`` text and ``code`` its ``errorCode``.
    """

    def __init__(
        self,
        description: str,
        *,
        order_id: str,
        order_status: str,
        endpoint_id: str | None = None,
        **kw: Any,
    ) -> None:
        super().__init__(description, **kw)
        self.order_id = order_id
        """Bandwidth's order id, for support tickets."""
        self.order_status = order_status
        """The order's final orderStatus."""
        self.endpoint_id = endpoint_id
        """The endpoint whose result carried the error, when one did."""


class ProviderUnavailable(BandwidthError):
    """Bandwidth is down, slow or unreachable (after retries), or an order did not finish."""


_E = TypeVar("_E", bound=BandwidthError)


def make_endpoint_id(kind: str, entity_id: str) -> str:
    """A stable endpoint id for the entity whose address it carries.

    The id is up to four alphanumeric characters of ``kind`` (readable in Bandwidth's
    portal: ``cust``, ``site``, ``acco``) followed by the SHA-256 of ``(kind, entity_id)`` in
    hex, 30 characters in all, so distinct entities get distinct ids (104 bits) and the same
    entity always gets the same one; that is what makes a retried provisioning idempotent.
    """
    if not kind or not entity_id:
        raise ValueError("make_endpoint_id needs a kind and an entity id")
    prefix = _KIND_PREFIX.sub("", kind)[:4].lower() or "e"
    digest = hashlib.sha256(f"{kind}\x00{entity_id}".encode()).hexdigest()
    return (prefix + digest)[:30]


@dataclass(frozen=True, slots=True)
class _Reply:
    status: int
    body: Any
    retry_after: float | None = None


@dataclass(frozen=True, slots=True)
class _Token:
    value: str
    refresh_at: float


class BandwidthClient:
    """Bandwidth emergency API v2 client. Use as ``async with BandwidthClient(options):``."""

    def __init__(
        self,
        options: BandwidthOptions,
        *,
        session: aiohttp.ClientSession | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self._options = options
        self._session = session
        self._owns_session = session is None
        self._sleep = sleep
        self._clock = clock
        self._rand = rand
        self._token: _Token | None = None
        self._token_lock = asyncio.Lock()
        self._closed = False
        self._hold_until = 0.0
        """Clock time before which no request is sent: the back-off of the last 429."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the HTTP session if this client created it."""
        self._closed = True
        if self._owns_session and self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def account_id(self) -> str:
        """The Bandwidth account this client provisions into."""
        return self._options.account_id

    # -- addresses --------------------------------------------------------------------

    async def create_address(self, address: Address, *, description: str) -> StandardizedAddress:
        """Create and validate an address; return it as Bandwidth standardised it.

        Raises:
            AddressRejected: Bandwidth answered 400, or 201 with validationStatus INVALID
                (or UNVALIDATED, unless ``accept_unvalidated``).
        """
        body = {
            "description": description,
            "addressLine1": address.line1,
            "addressLine2": address.line2,
            "city": address.city,
            "state": address.state,
            "postalCode": address.postal_code,
            "country": address.country,
        }
        reply = await self._call("POST", "/addresses", json_body=body)
        if reply.status == 400:
            raise _error_from_reply(AddressRejected, reply, "the address was refused")
        if reply.status not in (200, 201):
            raise _unexpected(reply, "POST /addresses")
        standard = _parse_address(reply.body, default_country=address.country)
        status = standard.validation_status.upper()
        if status == "VALID" or (status == "UNVALIDATED" and self._options.accept_unvalidated):
            _LOG.info(
                "address %s created: %s",
                standard.address_id,
                standard.one_line,
            )
            return standard
        # An address that failed validation is of no use to anyone; leaving it would only
        # clutter the account, so it is removed (best effort: the refusal matters more).
        try:
            await self.delete_address(standard.address_id)
        except BandwidthError as exc:
            _LOG.warning("could not remove refused address %s: %s", standard.address_id, exc)
        if status == "INVALID":
            text = (
                f"street {standard.street_line} was not found in {standard.city}, "
                f"{standard.state} {standard.postal_code}; check the house number, street "
                "name and ZIP"
            )
        else:
            text = (
                f"the address {standard.one_line} could not be validated "
                f"(status {standard.validation_status or 'missing'}); check it and try again"
            )
        raise AddressRejected(text, status=reply.status, type="address-validation")

    async def delete_address(self, address_id: str) -> None:
        """Delete an address; one that does not exist counts as deleted."""
        reply = await self._call("DELETE", f"/addresses/{_segment(address_id)}")
        if reply.status in (200, 202, 204, 404):
            return
        raise _unexpected(reply, "DELETE /addresses")

    # -- endpoints --------------------------------------------------------------------

    async def provision_endpoint(
        self, *, endpoint_id: str, phone_number: str, name: str, address_id: str
    ) -> Endpoint:
        """Make endpoint ``endpoint_id`` exist and dispatch to ``address_id``.

        A new id is created with ``POST /endpoints``. An existing one (a retry after a
        crash, or an address change) is re-pointed with ``PATCH {"action": "PROVISION"}``;
        when it already points at ``address_id`` nothing is sent. If its phone number
        differs, the endpoint is deleted and created again, since the documented PATCH only
        re-points the address. Returns the endpoint as ``GET`` shows it afterwards.

        Raises:
            OrderFailed: the order (or this endpoint within it) failed.
            ProviderUnavailable: Bandwidth unreachable, or the order did not finish in time.
        """
        _check_endpoint_id(endpoint_id)
        number = _e164(phone_number)
        existing = await self.get_endpoint(endpoint_id)
        if existing is not None and existing.phone_number != number:
            _LOG.info("endpoint %s changes phone number; recreating it", endpoint_id)
            await self.delete_endpoint(endpoint_id)
            existing = None
        if existing is None:
            body = {
                "endpoints": [
                    {
                        "id": endpoint_id,
                        "phoneNumber": number,
                        "name": name,
                        "lang": "en",
                        "country": "US",
                        "addressId": address_id,
                    }
                ]
            }
            reply = await self._call("POST", "/endpoints", json_body=body)
            if reply.status not in (200, 201, 202):
                raise _unexpected(reply, "POST /endpoints")
            try:
                await self._follow_order(reply, f"add endpoint {endpoint_id}")
            except OrderFailed:
                # A retried POST (its first try timed out after Bandwidth accepted it) fails
                # as a duplicate; the endpoint then exists and is handled like any other.
                existing = await self.get_endpoint(endpoint_id)
                if existing is None or existing.phone_number != number:
                    raise
            else:
                created = await self._require_endpoint(endpoint_id)
                _LOG.info("endpoint %s created at address %s", endpoint_id, address_id)
                return created
        if existing.address_id == address_id:
            return existing
        reply = await self._call(
            "PATCH",
            f"/endpoints/{endpoint_id}",
            json_body={"action": "PROVISION", "addressId": address_id},
        )
        if reply.status == 404:
            raise _error_from_reply(NotFound, reply, f"endpoint {endpoint_id} vanished")
        if reply.status not in (200, 202):
            raise _unexpected(reply, "PATCH /endpoints")
        if reply.status == 202:
            await self._follow_order(reply, f"re-point endpoint {endpoint_id}")
        updated = await self._require_endpoint(endpoint_id)
        _LOG.info(
            "endpoint %s re-pointed from address %s to %s",
            endpoint_id,
            existing.address_id,
            address_id,
        )
        return updated

    async def get_endpoint(self, endpoint_id: str) -> Endpoint | None:
        """The endpoint, or None if Bandwidth does not know it."""
        _check_endpoint_id(endpoint_id)
        reply = await self._call("GET", f"/endpoints/{endpoint_id}")
        if reply.status == 404:
            return None
        if reply.status != 200:
            raise _unexpected(reply, "GET /endpoints/{id}")
        return _parse_endpoint(reply.body, default_account=self._options.account_id)

    async def delete_endpoint(self, endpoint_id: str) -> None:
        """Delete the endpoint and wait for the order; an unknown id counts as deleted."""
        _check_endpoint_id(endpoint_id)
        reply = await self._call("DELETE", f"/endpoints/{endpoint_id}")
        if reply.status in (200, 204, 404):
            return
        if reply.status != 202:
            raise _unexpected(reply, "DELETE /endpoints/{id}")
        try:
            await self._follow_order(reply, f"delete endpoint {endpoint_id}")
        except OrderFailed:
            # Deleted meanwhile by someone else: the goal is reached all the same.
            if await self.get_endpoint(endpoint_id) is not None:
                raise
        _LOG.info("endpoint %s deleted", endpoint_id)

    async def list_endpoints(self, *, address_id: str | None = None) -> list[Endpoint]:
        """Every endpoint in the account (or at one address), following the pages to the end."""
        limit = max(1, self._options.page_size)
        offset = 0
        found: list[Endpoint] = []
        seen: set[str] = set()
        while True:
            params: dict[str, str] = {"limit": str(limit), "offset": str(offset)}
            if address_id is not None:
                params["addressId"] = address_id
            reply = await self._call("GET", "/endpoints", params=params)
            if reply.status != 200:
                raise _unexpected(reply, "GET /endpoints")
            body = _object(reply.body, "endpoint list")
            raw = body.get("endpoints")
            if not isinstance(raw, list):
                raise _malformed("endpoint list without an endpoints array")
            page = [_parse_endpoint(e, default_account=self._options.account_id) for e in raw]
            fresh = [e for e in page if e.id not in seen]
            found += fresh
            seen.update(e.id for e in fresh)
            # Stop at a short page, at a page with nothing new (a server ignoring offset),
            # or when the server sends links and none of them is "next".
            links = body.get("links")
            has_next = isinstance(links, list) and any(
                isinstance(link, dict) and link.get("rel") == "next" for link in links
            )
            if len(page) < limit or not fresh or (isinstance(links, list) and not has_next):
                return found
            offset += len(page)

    # -- orders -----------------------------------------------------------------------

    async def _follow_order(self, accepted: _Reply, what: str) -> None:
        order = _object(accepted.body, "order")
        order_id = _text(order, "orderId")
        if not order_id:
            raise _malformed(f"order for {what} has no orderId")
        status = _text(order, "orderStatus").upper()
        deadline = self._clock() + self._options.order_timeout
        while status not in _FINAL_ORDER_STATES:
            if self._clock() + self._options.order_poll_interval > deadline:
                raise ProviderUnavailable(
                    f"Bandwidth order {order_id} ({what}) was still {status or 'pending'} "
                    f"after {self._options.order_timeout:g}s",
                    type="order-timeout",
                )
            await self._sleep(self._options.order_poll_interval)
            reply = await self._call("GET", f"/orders/{_segment(order_id)}")
            if reply.status != 200:
                raise _unexpected(reply, "GET /orders/{id}")
            status = _text(_object(reply.body, "order"), "orderStatus").upper()
        reply = await self._call("GET", f"/orders/{_segment(order_id)}/details")
        if reply.status != 200:
            raise _unexpected(reply, "GET /orders/{id}/details")
        details = _object(reply.body, "order details")
        results = details.get("endpoints")
        failed = [
            r
            for r in (results if isinstance(results, list) else [])
            if isinstance(r, dict) and str(r.get("status", "")).upper() == "ERROR"
        ]
        if status == "COMPLETED" and not failed:
            return
        first: dict[str, Any] = failed[0] if failed else {}
        text = str(first.get("error") or f"Bandwidth order {order_id} ({what}) ended {status}")
        _LOG.warning("order %s (%s) ended %s: %s", order_id, what, status, text)
        raise OrderFailed(
            text,
            order_id=order_id,
            order_status=status,
            endpoint_id=str(first["id"]) if first.get("id") is not None else None,
            type=f"order-{status.lower()}",
            code=_int_or_none(first.get("errorCode")),
        )

    async def _require_endpoint(self, endpoint_id: str) -> Endpoint:
        endpoint = await self.get_endpoint(endpoint_id)
        if endpoint is None:
            raise NotFound(
                f"endpoint {endpoint_id} is missing after its order completed",
                status=404,
                type="resource-not-found",
            )
        return endpoint

    # -- messaging --------------------------------------------------------------------

    async def send_message(
        self,
        *,
        to: str,
        sender: str,
        text: str,
        application_id: str,
        tag: str = "",
        priority: str = "high",
    ) -> str:
        """Send one SMS through the Messaging API v2; returns Bandwidth's message id.

        A 429 (``max-message-queue-size-exceeded``: the account's 900-second queue is full)
        is retried with the same back-off and jitter as every other call; when the budget
        runs out it raises :class:`RateLimited`. Other failures raise the usual
        :class:`BandwidthError` subclasses.
        """
        account = _segment(self._options.account_id)
        url = f"{self._options.messaging_base}/users/{account}/messages"
        body: dict[str, Any] = {
            "applicationId": application_id,
            "to": [_e164(to)],
            "from": _e164(sender),
            "text": text,
            "priority": priority,
        }
        if tag:
            body["tag"] = tag
        reply = await self._authorized("POST messages", "POST", url, json_body=body)
        if reply.status == 400:
            raise _error_from_reply(BandwidthError, reply, "Bandwidth refused the message")
        if reply.status != 202:
            raise _unexpected(reply, "POST messages")
        return _text(_object(reply.body, "message"), "id")

    # -- transport --------------------------------------------------------------------

    async def _call(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        params: Mapping[str, str] | None = None,
    ) -> _Reply:
        """One logical API call: token, retries, and the single refresh after a 401.

        Returns any reply that is not 401/403/429/5xx; the caller interprets the rest.
        """
        account = _segment(self._options.account_id)
        url = f"{self._options.api_base}/accounts/{account}/emergency{path}"
        query = {"region": self._options.region, **(params or {})}
        return await self._authorized(
            f"{method} {path}", method, url, json_body=json_body, params=query
        )

    async def _authorized(
        self,
        what: str,
        method: str,
        url: str,
        *,
        json_body: Any = None,
        params: Mapping[str, str] | None = None,
    ) -> _Reply:
        """Bearer token, retries, and the single refresh after a 401."""
        refreshed = False
        while True:
            token = await self._access_token()
            reply = await self._with_retries(
                what,
                method,
                url,
                headers={"Authorization": f"Bearer {token}"},
                json_body=json_body,
                params=params,
            )
            if reply.status == 401 and not refreshed:
                _LOG.info("%s answered 401; fetching a new token and retrying once", what)
                self._forget_token(token)
                refreshed = True
                continue
            if reply.status in (401, 403):
                raise _error_from_reply(
                    AuthenticationFailed, reply, f"Bandwidth refused the credentials for {what}"
                )
            return reply

    async def _access_token(self) -> str:
        token = self._token
        if token is not None and self._clock() < token.refresh_at:
            return token.value
        async with self._token_lock:
            token = self._token
            if token is not None and self._clock() < token.refresh_at:
                return token.value
            issued = self._clock()
            value, lifetime = await self._fetch_token()
            # A margin longer than the token's life would mean a fetch per call.
            margin = min(self._options.token_refresh_margin, lifetime / 2)
            self._token = _Token(value, issued + lifetime - margin)
            _LOG.info("obtained a Bandwidth access token valid for %gs", lifetime)
            return value

    def _forget_token(self, value: str) -> None:
        # Only the token that failed: a concurrent call may already hold a newer one.
        if self._token is not None and self._token.value == value:
            self._token = None

    async def _fetch_token(self) -> tuple[str, float]:
        credentials = f"{self._options.client_id}:{self._options.client_secret}".encode()
        basic = "Basic " + base64.b64encode(credentials).decode("ascii")
        reply = await self._with_retries(
            "POST token",
            "POST",
            self._options.token_url,
            headers={"Authorization": basic},
            form={"grant_type": "client_credentials"},
        )
        if reply.status in (400, 401, 403):
            raise _error_from_reply(
                AuthenticationFailed, reply, "Bandwidth refused the API client credentials"
            )
        if reply.status != 200:
            raise _unexpected(reply, "POST token")
        body = _object(reply.body, "token response")
        value = body.get("access_token")
        if not isinstance(value, str) or not value:
            raise _malformed("token response without an access_token")
        lifetime = body.get("expires_in", 3600)
        if isinstance(lifetime, str) and lifetime.isdigit():
            lifetime = int(lifetime)
        if not isinstance(lifetime, int | float) or isinstance(lifetime, bool) or lifetime <= 0:
            lifetime = 3600
        return value, float(lifetime)

    async def _with_retries(
        self,
        what: str,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str],
        json_body: Any = None,
        form: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
    ) -> _Reply:
        """Send until the answer is not 429/5xx/timeout/connection error, or the budget ends."""
        options = self._options
        start = self._clock()
        attempt = 0
        # The hold this caller set and waited out itself; only a later one holds it again.
        own_hold = float("-inf")
        while True:
            attempt += 1
            retry_after: float | None = None
            cause: BaseException | None = None
            if self._hold_until > own_hold:
                await self._wait_for_gate()
            try:
                reply = await self._send(
                    method, url, headers=headers, json_body=json_body, form=form, params=params
                )
            except TimeoutError as exc:
                cause = exc
                error: BandwidthError = ProviderUnavailable(
                    f"Bandwidth did not answer {what} within {options.request_timeout:g}s",
                    type="timeout",
                )
            except (aiohttp.ClientError, OSError) as exc:
                cause = exc
                error = ProviderUnavailable(
                    f"could not reach Bandwidth for {what}: {type(exc).__name__}",
                    type="connection",
                )
            else:
                if reply.status == 429:
                    retry_after = reply.retry_after
                    limited = _error_from_reply(
                        RateLimited, reply, f"Bandwidth rate-limited {what}"
                    )
                    limited.retry_after = retry_after
                    error = limited
                elif reply.status >= 500:
                    retry_after = reply.retry_after
                    error = _error_from_reply(
                        ProviderUnavailable, reply, f"Bandwidth failed {what}"
                    )
                else:
                    return reply
            if retry_after is not None:
                delay = retry_after
            else:
                backoff = min(options.backoff_cap, options.backoff_base * 2 ** (attempt - 1))
                delay = backoff * self._rand()
            if isinstance(error, RateLimited):
                own_hold = self._clock() + delay
                self._hold_until = max(self._hold_until, own_hold)
            elapsed = self._clock() - start
            if attempt >= options.max_attempts or elapsed + delay > options.max_retry_time:
                _LOG.warning(
                    "%s failed after %d attempt(s) in %.1fs: %s",
                    what,
                    attempt,
                    elapsed,
                    error.description,
                )
                raise error from cause
            _LOG.info(
                "%s attempt %d failed (%s); retrying in %.2fs",
                what,
                attempt,
                error.description,
                delay,
            )
            await self._sleep(delay)

    async def _wait_for_gate(self) -> None:
        """Wait out the back-off another call's 429 asked for (one sleep: a caller that meets
        a newer 429 afterwards waits for that one itself)."""
        wait = self._hold_until - self._clock()
        if wait > 0:
            await self._sleep(wait)

    async def _send(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str],
        json_body: Any,
        form: Mapping[str, str] | None,
        params: Mapping[str, str] | None,
    ) -> _Reply:
        session = self._get_session()
        timeout = aiohttp.ClientTimeout(total=self._options.request_timeout)
        async with session.request(
            method,
            url,
            headers=dict(headers),
            json=json_body,
            data=dict(form) if form is not None else None,
            params=dict(params) if params else None,
            timeout=timeout,
        ) as response:
            raw = await response.read()
            return _Reply(
                response.status,
                _decode(raw),
                _parse_retry_after(response.headers.get("Retry-After")),
            )

    def _get_session(self) -> aiohttp.ClientSession:
        if self._closed:
            raise BandwidthError("the Bandwidth client is closed", type="client-closed")
        if self._session is None:
            self._session = aiohttp.ClientSession(
                headers={"User-Agent": _USER_AGENT, "Accept": "application/json"}
            )
        return self._session


# -- parsing helpers ---------------------------------------------------------------------


def _decode(raw: bytes) -> Any:
    if not raw:
        return None
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None


def _parse_retry_after(value: str | None) -> float | None:
    """Retry-After as seconds; the HTTP-date form is converted against the wall clock."""
    if value is None:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _error_fields(body: Any) -> tuple[str, int | None, str, str | None]:
    """(type, code, description, field) from any error body Bandwidth may send.

    The v2 APIs send ``{"errors": [...]}``; the messaging API sends ``{"type",
    "description"}`` and OAuth2 servers ``{"error", "error_description"}``. All are read.
    """
    if not isinstance(body, dict):
        return "", None, "", None
    errors = body.get("errors")
    if isinstance(errors, list) and errors:
        items = [e for e in errors if isinstance(e, dict)]
        if items:
            first = items[0]
            source = first.get("source")
            error_field = source.get("field") if isinstance(source, dict) else None
            descriptions = [str(e["description"]) for e in items if e.get("description")]
            return (
                str(first.get("type") or ""),
                _int_or_none(first.get("code")),
                "; ".join(descriptions),
                str(error_field) if error_field else None,
            )
    if "error" in body and isinstance(body["error"], str):
        return body["error"], None, str(body.get("error_description") or ""), None
    return (
        str(body.get("type") or ""),
        _int_or_none(body.get("code")),
        str(body.get("description") or ""),
        None,
    )


def _error_from_reply(kind: type[_E], reply: _Reply, fallback: str) -> _E:
    error_type, code, description, error_field = _error_fields(reply.body)
    return kind(
        description or f"{fallback} (HTTP {reply.status})",
        status=reply.status,
        type=error_type,
        code=code,
        field=error_field,
    )


def _unexpected(reply: _Reply, what: str) -> BandwidthError:
    """The error type a status implies, for answers the caller did not expect."""
    if reply.status == 404:
        return _error_from_reply(NotFound, reply, f"{what}: not found")
    if reply.status in (401, 403):
        return _error_from_reply(AuthenticationFailed, reply, f"{what}: refused")
    if reply.status == 429:
        return _error_from_reply(RateLimited, reply, f"{what}: rate-limited")
    if reply.status >= 500:
        return _error_from_reply(ProviderUnavailable, reply, f"{what}: server error")
    return _error_from_reply(BandwidthError, reply, f"{what}: unexpected answer")


def _malformed(what: str) -> BandwidthError:
    return BandwidthError(f"Bandwidth sent a malformed answer: {what}", type="malformed-response")


def _object(body: Any, what: str) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise _malformed(f"{what} is not a JSON object")
    return body


def _text(body: Mapping[str, Any], key: str) -> str:
    value = body.get(key)
    return "" if value is None else str(value)


def _int_or_none(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    return None


def _parse_address(body: Any, *, default_country: str) -> StandardizedAddress:
    """Bandwidth's address object (camelCase, parts only) → the model's standardised address."""
    data = _object(body, "address")
    address_id = _text(data, "id")
    if not address_id:
        raise _malformed("address without an id")
    street_line = " ".join(
        p
        for p in (
            _text(data, "houseNumber"),
            _text(data, "predirectional"),
            _text(data, "streetName"),
            _text(data, "streetSuffix"),
            _text(data, "postdirectional"),
        )
        if p
    )
    line2 = _text(data, "addressLine2")
    city = _text(data, "city")
    state = _text(data, "state")
    postal_code = _text(data, "postalCode")
    country = _text(data, "country") or default_country
    one_line = ", ".join(
        p for p in (street_line, line2, city, f"{state} {postal_code}".strip(), country) if p
    )
    return StandardizedAddress(
        address_id=address_id,
        validation_status=_text(data, "validationStatus"),
        one_line=one_line,
        house_number=_text(data, "houseNumber"),
        predirectional=_text(data, "predirectional"),
        street_name=_text(data, "streetName"),
        street_suffix=_text(data, "streetSuffix"),
        postdirectional=_text(data, "postdirectional"),
        address_line2=line2,
        city=city,
        state=state,
        postal_code=postal_code,
        country=country,
    )


def _parse_endpoint(body: Any, *, default_account: str) -> Endpoint:
    data = _object(body, "endpoint")
    endpoint_id = _text(data, "id")
    if not endpoint_id:
        raise _malformed("endpoint without an id")
    return Endpoint(
        id=endpoint_id,
        account_id=_text(data, "accountId") or default_account,
        phone_number=_text(data, "phoneNumber"),
        name=_text(data, "name"),
        address_id=_text(data, "addressId"),
        created=_text(data, "created"),
        updated=_text(data, "updated"),
    )


def _check_endpoint_id(endpoint_id: str) -> None:
    # The id goes into URL paths; refusing anything else here also rules out path tricks.
    if not _ENDPOINT_ID.fullmatch(endpoint_id):
        raise ValueError(f"endpoint id {endpoint_id!r} is not 10-30 letters and digits")


def _segment(value: str) -> str:
    return quote(value, safe="")


def _e164(number: str) -> str:
    """NANP numbers in any common form become E.164; anything else is left for Bandwidth
    to judge (it answers 400 with the field at fault)."""
    digits = re.sub(r"\D", "", number)
    if len(digits) == 10:
        return f"+1{digits}"
    if len(digits) == 11 and digits.startswith("1"):
        return f"+{digits}"
    return number
