"""A transport that records what it is asked to send: the double for tests and tools."""

from __future__ import annotations

from dataclasses import dataclass, field

from e911_sip.sip.peer import Peer


@dataclass(slots=True)
class Sent:
    """One message handed to the transport."""

    data: bytes
    peer: Peer
    branch: str | None


@dataclass(slots=True)
class RecordingTransport:
    """Keeps every message it is given; ``fail_to`` hosts report a delivery failure."""

    sink: object | None = None
    sent: list[Sent] = field(default_factory=list)
    fail_to: set[str] = field(default_factory=set)
    bound: bool = True

    def send(self, data: bytes, peer: Peer, branch: str | None) -> None:
        """Record the message, or report it undeliverable to the sink."""
        if peer.host in self.fail_to:
            failed = getattr(self.sink, "delivery_failed", None)
            if failed is not None:
                failed(branch, peer, "unreachable (recording transport)")
            return
        self.sent.append(Sent(data, peer, branch))

    def take(self) -> list[Sent]:
        """Everything recorded since the last call."""
        out = self.sent
        self.sent = []
        return out
