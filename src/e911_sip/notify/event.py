"""What the edge reports about an emergency call, and what is delivered to whom.

The edge knows only the call: :class:`CallEvent` is the minimal record it enqueues. The
notifier on the provisioning side adds what provisioning knows (the line's contacts, the
level and the standardised address) and turns each event into one :class:`Delivery` per
target. A delivery's id is derived from the call and the target, so the same notification
retried, or re-created after a restart, carries the same idempotency key.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from e911_sip.timefmt import utc_millis

CHANNELS = ("webhook", "email", "sms")
"""Every delivery channel, in the order a call's notifications are queued."""


def rfc3339(epoch: float) -> str:
    """``2026-12-01T20:31:07.123Z`` for a Unix time."""
    return utc_millis(epoch)


@dataclass(frozen=True, slots=True, kw_only=True)
class CallEvent:
    """An emergency call the edge forwarded, as the edge saw it."""

    call_id: str
    """SIP Call-ID of the INVITE."""
    caller: str | None
    """The calling line, 10 digits, or None when no line could be read."""
    callback: str | None
    """The callback number sent to the PSAP (the record's, else the line)."""
    dialed: str
    """The emergency number dialled: ``911`` or ``933``."""
    provider_endpoint: str | None
    """``{bw_account_id}/{endpoint_id}`` the call carried, or None."""
    outcome: str
    """The edge's outcome for the call (``enriched``, ``no_location``, ...)."""
    received_at: float
    """Unix time the INVITE arrived (the start of the notification latency)."""

    @property
    def time(self) -> str:
        """``received_at`` in RFC 3339, UTC."""
        return rfc3339(self.received_at)

    @classmethod
    def now(
        cls,
        *,
        call_id: str,
        caller: str | None,
        callback: str | None,
        dialed: str,
        provider_endpoint: str | None,
        outcome: str,
        age: float = 0.0,
    ) -> CallEvent:
        """An event for an INVITE that arrived ``age`` seconds ago, by the wall clock."""
        return cls(
            call_id=call_id,
            caller=caller,
            callback=callback or caller,
            dialed=dialed,
            provider_endpoint=provider_endpoint,
            outcome=outcome,
            received_at=time.time() - max(0.0, age),
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON form; :meth:`from_dict` reads it back."""
        # Written out: ``dataclasses.asdict`` deep-copies every field, once per call event.
        return {
            "call_id": self.call_id,
            "caller": self.caller,
            "callback": self.callback,
            "dialed": self.dialed,
            "provider_endpoint": self.provider_endpoint,
            "outcome": self.outcome,
            "received_at": self.received_at,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CallEvent:
        """Parse :meth:`to_dict` output. Raises KeyError or TypeError when malformed."""
        return cls(
            call_id=str(data["call_id"]),
            caller=_opt(data.get("caller")),
            callback=_opt(data.get("callback")),
            dialed=str(data["dialed"]),
            provider_endpoint=_opt(data.get("provider_endpoint")),
            outcome=str(data["outcome"]),
            received_at=float(data["received_at"]),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Targets:
    """Where one call's notifications go."""

    webhooks: tuple[str, ...] = ()
    """HTTP(S) URLs that receive a signed JSON POST."""
    emails: tuple[str, ...] = ()
    """Email addresses."""
    sms: tuple[str, ...] = ()
    """Phone numbers (10 digits or E.164) that receive a text message."""

    @property
    def empty(self) -> bool:
        """True when there is nowhere to send anything."""
        return not (self.webhooks or self.emails or self.sms)


@dataclass(frozen=True, slots=True, kw_only=True)
class Resolution:
    """What provisioning knows about the calling line."""

    targets: Targets = field(default_factory=Targets)
    """The line's effective contacts (empty: use the global fallback)."""
    level: str | None = None
    """Where the line's location comes from: ``account``, ``site``, ``customer`` or None."""
    address: str | None = None
    """The standardised one-line dispatchable location, or None."""
    name: str | None = None
    """A display name for the line (customer / site / account), or None."""


def payload(event: CallEvent, resolution: Resolution) -> dict[str, Any]:
    """The notification body every channel renders (the webhook sends it as is)."""
    return {
        "event": "emergency_call",
        "call_id": event.call_id,
        "caller": event.caller,
        "callback": event.callback,
        "dialed": event.dialed,
        "provider_endpoint": event.provider_endpoint,
        "level": resolution.level,
        "address": resolution.address,
        "name": resolution.name,
        "time": event.time,
        "outcome": event.outcome,
    }


def delivery_id(call_id: str, channel: str, target: str) -> str:
    """The idempotency key of one call's notification to one target."""
    digest = hashlib.sha256(f"{call_id}\x00{channel}\x00{target}".encode()).hexdigest()
    return digest[:32]


@dataclass(frozen=True, slots=True, kw_only=True)
class Delivery:
    """One notification to one target, as queued."""

    delivery_id: str
    """Idempotency key: the same for every attempt and every re-creation."""
    channel: str
    """``webhook``, ``email`` or ``sms``."""
    target: str
    """URL, email address or phone number."""
    body: Mapping[str, Any]
    """The :func:`payload`."""
    received_at: float
    """Unix time the INVITE arrived."""

    def to_dict(self) -> dict[str, Any]:
        """JSON form; :meth:`from_dict` reads it back."""
        return {
            "delivery_id": self.delivery_id,
            "channel": self.channel,
            "target": self.target,
            "body": dict(self.body),
            "received_at": self.received_at,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Delivery:
        """Parse :meth:`to_dict` output. Raises KeyError or TypeError when malformed."""
        body = data["body"]
        if not isinstance(body, Mapping):
            raise TypeError("delivery body must be an object")
        return cls(
            delivery_id=str(data["delivery_id"]),
            channel=str(data["channel"]),
            target=str(data["target"]),
            body=dict(body),
            received_at=float(data["received_at"]),
        )


def deliveries(
    event: CallEvent, resolution: Resolution, fallback: Targets, *, always: bool = False
) -> list[Delivery]:
    """One delivery per target: the line's contacts, else the global ``fallback`` (with
    ``always``: the line's contacts and the global targets)."""
    targets = resolution.targets if not resolution.targets.empty else fallback
    if always:
        own = resolution.targets
        targets = Targets(
            webhooks=own.webhooks + fallback.webhooks,
            emails=own.emails + fallback.emails,
            sms=own.sms + fallback.sms,
        )
    body = payload(event, resolution)
    out = []
    for channel, items in (
        ("webhook", targets.webhooks),
        ("email", targets.emails),
        ("sms", targets.sms),
    ):
        for target in dict.fromkeys(items):
            out.append(
                Delivery(
                    delivery_id=delivery_id(event.call_id, channel, target),
                    channel=channel,
                    target=target,
                    body=body,
                    received_at=event.received_at,
                )
            )
    return out


def _opt(value: Any) -> str | None:
    return None if value is None else str(value)
