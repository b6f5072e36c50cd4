"""Bandwidth's Messaging API as the notifier's SMS sender.

The notifier (:mod:`e911_sip.notify`) knows only :class:`~e911_sip.notify.channels.MessageSender`;
this adapter sends through :meth:`BandwidthClient.send_message`, so texts share the emergency
client's OAuth2 token handling and its back-off with jitter on 429 and 5xx, and maps
:class:`BandwidthError` to :class:`DeliveryFailed`.
"""

from __future__ import annotations

import asyncio

from e911_sip.notify.channels import DeliveryFailed
from e911_sip.provisioning.bandwidth import (
    AuthenticationFailed,
    BandwidthClient,
    BandwidthError,
    RateLimited,
)


class BandwidthMessageSender:
    """Sends texts from ``sender`` with Bandwidth messaging application ``application_id``."""

    def __init__(
        self,
        client: BandwidthClient,
        *,
        sender: str,
        application_id: str,
        owns_client: bool = False,
        rate_limited_pause: float = 5.0,
    ) -> None:
        self._client = client
        self._sender = sender
        self._application_id = application_id
        self._owns_client = owns_client
        self._pause = rate_limited_pause

    async def send_message(self, *, to: str, text: str, tag: str) -> None:
        """Send one text. Raises DeliveryFailed."""
        try:
            await self._client.send_message(
                to=to,
                sender=self._sender,
                text=text,
                application_id=self._application_id,
                tag=tag,
            )
        except RateLimited as exc:
            # The account's queue stayed full through the client's own retries: pause the
            # whole channel, and let the notifier retry this one later.
            pause = exc.retry_after if exc.retry_after is not None else self._pause
            raise DeliveryFailed(f"rate limited: {exc.type}", retry_after=pause) from None
        except AuthenticationFailed as exc:
            raise DeliveryFailed(f"refused credentials: {exc.type}") from None
        except BandwidthError as exc:
            permanent = 400 <= exc.status < 500
            raise DeliveryFailed(
                f"bandwidth {exc.status or exc.type}: {exc.description}", permanent=permanent
            ) from None

    async def close(self) -> None:
        if self._owns_client:
            await self._client.close()
            # Closed transports release their sockets on the loop's next turn.
            await asyncio.sleep(0)
