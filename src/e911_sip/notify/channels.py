"""The three ways a notification leaves: webhook, email (SMTP) and SMS.

Each channel sends one :class:`~e911_sip.notify.event.Delivery` and either returns (it was
accepted) or raises :class:`DeliveryFailed`, saying whether another attempt could succeed
and, when the far end said so, after how long. Library exceptions never escape.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import formatdate
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit

import aiohttp
import aiosmtplib

from e911_sip.notify.event import Delivery

SIGNATURE_HEADER = "X-E911-Signature"
DELIVERY_ID_HEADER = "X-E911-Delivery-Id"


class DeliveryFailed(Exception):
    """A channel could not deliver.

    ``permanent``: another attempt would fail the same way (a 4xx, a refused address).
    ``retry_after``: seconds the far end asked us to wait, if it did.
    """

    def __init__(
        self, reason: str, *, permanent: bool = False, retry_after: float | None = None
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.permanent = permanent
        self.retry_after = retry_after


class Channel(Protocol):
    """Sends one delivery of its kind."""

    name: str

    async def send(self, delivery: Delivery) -> None:
        """Deliver or raise DeliveryFailed."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...


def sign(secret: bytes, body: bytes) -> str:
    """The ``X-E911-Signature`` value: ``sha256=<hex HMAC-SHA256 of the body>``."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def render_sms(body: Mapping[str, Any]) -> str:
    """The text message: what the front desk needs first (where, who to call back), the
    rest after, since a single segment is cut at 160 characters."""
    where = body.get("address") or "no provisioned address"
    test = " TEST" if body.get("dialed") == "933" else ""
    name = f" {body['name']}" if body.get("name") else ""
    return (
        f"{body.get('dialed')}{test} CALL from {body.get('caller') or 'unknown line'}: {where}. "
        f"Callback {body.get('callback') or 'unknown'}. {body.get('time')}{name}"
    )


def render_text(body: Mapping[str, Any]) -> str:
    """The human-readable notification (email body and SMS text)."""
    number = "test call to 933" if body.get("dialed") == "933" else f"{body.get('dialed')} call"
    caller = body.get("caller") or "an unknown line"
    name = f" ({body['name']})" if body.get("name") else ""
    where = body.get("address") or "no provisioned address"
    return (
        f"EMERGENCY: {number} from {caller}{name} at {body.get('time')}. "
        f"Location: {where}. Callback: {body.get('callback') or 'unknown'}."
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class WebhookOptions:
    """How webhooks are posted."""

    secret: bytes | None = None
    """HMAC-SHA256 key for ``X-E911-Signature``; None: unsigned."""
    timeout: float = 5.0
    """Seconds one POST may take."""


class WebhookChannel:
    """POSTs the JSON payload, signed, with the delivery id as an idempotency key."""

    name = "webhook"

    def __init__(self, options: WebhookOptions) -> None:
        self._options = options
        self._session: aiohttp.ClientSession | None = None

    async def send(self, delivery: Delivery) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(headers={"User-Agent": "e911-sip"})
        data = json.dumps(delivery.body, separators=(",", ":")).encode()
        headers = {
            "Content-Type": "application/json",
            DELIVERY_ID_HEADER: delivery.delivery_id,
        }
        if self._options.secret is not None:
            headers[SIGNATURE_HEADER] = sign(self._options.secret, data)
        try:
            async with self._session.post(
                delivery.target,
                data=data,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=self._options.timeout),
                allow_redirects=False,
            ) as response:
                status = response.status
                retry_after = _seconds(response.headers.get("Retry-After"))
        except TimeoutError:
            raise DeliveryFailed("timeout") from None
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            raise DeliveryFailed(f"connection: {type(exc).__name__}") from None
        if 200 <= status < 300:
            return
        permanent = 400 <= status < 500 and status not in (408, 425, 429)
        raise DeliveryFailed(f"http {status}", permanent=permanent, retry_after=retry_after)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
            # Closed transports release their sockets on the loop's next turn.
            await asyncio.sleep(0)


@dataclass(frozen=True, slots=True, kw_only=True)
class EmailOptions:
    """How email is sent."""

    smtp_url: str
    """``smtp://host[:port]`` (STARTTLS when offered, or required with ``starttls``) or
    ``smtps://host[:port]`` (TLS from the first byte)."""
    sender: str = "e911-sip@localhost"
    """The From address."""
    username: str | None = None
    """SMTP AUTH user (also read from the URL's user part)."""
    password: str | None = None
    """SMTP AUTH password; never logged."""
    starttls: bool | None = None
    """True: require STARTTLS on smtp://; False: never; None: use it when offered."""
    timeout: float = 10.0
    """Seconds one SMTP session may take."""
    validate_certs: bool = True
    """Verify the server's certificate for STARTTLS and smtps://."""
    tls_context: ssl.SSLContext | None = None
    """Trust and TLS settings for STARTTLS and smtps:// (None: the system's CA store)."""


class EmailChannel:
    """One SMTP session per message (alerts are rare; a held connection would go stale)."""

    name = "email"

    def __init__(self, options: EmailOptions) -> None:
        self._options = options
        url = urlsplit(options.smtp_url)
        if url.scheme not in ("smtp", "smtps") or not url.hostname:
            raise ValueError(f"expected smtp://host[:port] or smtps://host[:port], got {url!r}")
        self._host = url.hostname
        self._tls = url.scheme == "smtps"
        self._port = url.port or (465 if self._tls else 587)
        self._username = options.username or (unquote(url.username) if url.username else None)
        self._password = options.password or (unquote(url.password) if url.password else None)

    async def send(self, delivery: Delivery) -> None:
        options = self._options
        body = delivery.body
        message = EmailMessage()
        message["From"] = options.sender
        message["To"] = delivery.target
        dialed = body.get("dialed")
        message["Subject"] = f"Emergency {dialed} call from {body.get('caller') or 'unknown line'}"
        message["Date"] = formatdate(localtime=False, usegmt=True)
        # A deterministic Message-ID: a re-sent notification is recognisably the same one.
        domain = options.sender.rpartition("@")[2] or "e911-sip"
        message["Message-ID"] = f"<{delivery.delivery_id}@{domain}>"
        message["X-E911-Delivery-Id"] = delivery.delivery_id
        message.set_content(render_text(body) + "\n\n" + json.dumps(dict(body), indent=2))
        try:
            await aiosmtplib.send(
                message,
                hostname=self._host,
                port=self._port,
                use_tls=self._tls,
                start_tls=None if self._tls else options.starttls,
                username=self._username,
                password=self._password,
                timeout=options.timeout,
                validate_certs=options.validate_certs,
                tls_context=options.tls_context,
            )
        except aiosmtplib.SMTPRecipientsRefused as exc:
            raise DeliveryFailed(f"recipient refused: {exc}", permanent=True) from None
        except aiosmtplib.SMTPResponseException as exc:
            raise DeliveryFailed(f"smtp {exc.code}", permanent=500 <= exc.code < 600) from None
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            raise DeliveryFailed(f"smtp: {type(exc).__name__}") from None

    async def close(self) -> None:
        return None


class MessageSender(Protocol):
    """Sends one text message (Bandwidth Messaging API v2 in production)."""

    async def send_message(self, *, to: str, text: str, tag: str) -> None:
        """Send ``text`` to ``to``; raise DeliveryFailed when it was not accepted."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...


@dataclass(frozen=True, slots=True, kw_only=True)
class SmsOptions:
    """How text messages are paced."""

    rate: float = 1.0
    """Messages a second sent to Bandwidth: the account-wide dequeue rate (1 by default)."""
    max_length: int = 160
    """Characters per message; longer text is cut (a single segment costs one MPS slot)."""


class SmsChannel:
    """Throttles to the account's dequeue rate; a 429 pauses every send for its back-off."""

    name = "sms"

    def __init__(
        self,
        sender: MessageSender,
        options: SmsOptions,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._sender = sender
        self._options = options
        self._clock = clock
        self._sleep = sleep
        self._lock = asyncio.Lock()
        self._next = 0.0

    def pause(self, seconds: float) -> None:
        """Send nothing for ``seconds`` (Bandwidth's queue is full)."""
        self._next = max(self._next, self._clock() + seconds)

    async def send(self, delivery: Delivery) -> None:
        text = render_sms(delivery.body)[: self._options.max_length]
        async with self._lock:
            wait = self._next - self._clock()
            if wait > 0:
                await self._sleep(wait)
            self._next = self._clock() + 1.0 / self._options.rate
            try:
                await self._sender.send_message(
                    to=delivery.target, text=text, tag=delivery.delivery_id
                )
            except DeliveryFailed as exc:
                if exc.retry_after is not None:
                    self.pause(exc.retry_after)
                raise

    async def close(self) -> None:
        await self._sender.close()


def _seconds(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None
