"""Errors raised by the SIP core.

Each error that a remote peer caused carries the status code of the reply it implies, so the
boundary that catches it can answer without a lookup table (the httpcore/h11 habit).
"""

from __future__ import annotations


class SipError(Exception):
    """Base of every error the SIP core raises."""


class RemoteSipError(SipError):
    """The peer sent something we cannot accept; answer with ``status_code`` where possible."""

    status_code = 400
    reason = "Bad Request"

    def __init__(self, message: str, *, status_hint: int | None = None) -> None:
        super().__init__(message)
        if status_hint is not None:
            self.status_code = status_hint


class MalformedMessage(RemoteSipError):
    """The bytes are not a SIP message we can parse (RFC 3261 §7, §25)."""


class MessageTooLarge(RemoteSipError):
    """The message exceeds the configured size or header-count limit (RFC 3261 §21.5.14)."""

    status_code = 513
    reason = "Message Too Large"


class VersionNotSupported(RemoteSipError):
    """The start line names a SIP version other than 2.0 (RFC 3261 §21.5.16)."""

    status_code = 505
    reason = "Version Not Supported"


class UnsupportedUriScheme(RemoteSipError):
    """The Request-URI scheme is not one we route (RFC 3261 §21.4.16)."""

    status_code = 416
    reason = "Unsupported URI Scheme"


class TooManyHops(RemoteSipError):
    """Max-Forwards reached zero (RFC 3261 §16.3 step 3)."""

    status_code = 483
    reason = "Too Many Hops"


class TransactionStateError(SipError):
    """An event arrived that the transaction's state does not allow (a bug, not a peer error)."""

    def __init__(self, kind: str, state: str, event: str) -> None:
        super().__init__(f"{kind} transaction in state {state} cannot handle event {event}")
        self.kind = kind
        self.state = state
        self.event = event
