"""What the transports hand up and what they need from their owner."""

from __future__ import annotations

from typing import Protocol

from e911_sip.sip.peer import Peer


class MessageSink(Protocol):
    """The owner of a transport: receives whole messages and delivery failures."""

    def message_received(self, data: bytes, source: Peer) -> None:
        """One SIP message (a datagram, or one framed stream message) arrived."""
        ...

    def delivery_failed(self, branch: str | None, peer: Peer, reason: str) -> None:
        """A message for ``peer`` could not be sent; ``branch`` names its client transaction."""
        ...
