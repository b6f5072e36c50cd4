"""Overload control that needs no I/O: which datagram goes first, and when to shed.

A flood must never delay a 911 call. The UDP adapter reads every datagram the kernel holds,
sorts each into a :class:`Priority` with :func:`classify` (a look at the start line and the To
header, no parse) and serves the queues in that order. When the edge's own load passes a
threshold (:class:`LoadSignal`), the core answers new non-emergency requests with a
stateless 503 and a Retry-After (RFC 3261 §21.5.4) instead of proxying them; emergency
INVITEs and the requests that finish admitted work (ACK, CANCEL, BYE, in-dialog requests,
responses) are never shed for load.

The classifier and the core agree on what an emergency call is because both call the same
policy function (``e911_sip.policy.emergency.emergency_number``, injected as
``emergency``): an initial INVITE whose Request-URI it names.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from enum import IntEnum

from e911_sip.sip.errors import SipError
from e911_sip.sip.uri import Uri, parse_uri


class Priority(IntEnum):
    """Order in which queued datagrams are served; lower first."""

    EMERGENCY = 0
    """An INVITE whose Request-URI is an emergency number or service."""
    ONGOING = 1
    """Work that finishes what was admitted: responses, ACK, CANCEL, BYE, in-dialog requests."""
    NEW = 2
    """Anything else: new non-emergency requests and whatever cannot be read."""


_ONGOING_METHODS = frozenset({b"ACK", b"CANCEL", b"BYE", b"PRACK"})
# A To (or compact t) header carrying a tag: the request is inside a dialog (RFC 3261 §12.2).
_TO_TAG = re.compile(rb"\r\n(?:to|t)[ \t]*:[^\r\n]*;[ \t]*tag[ \t]*=", re.IGNORECASE)


def classify(data: bytes, emergency: Callable[[Uri], str | None]) -> Priority:
    """The priority of one raw message, read from its bytes.

    ``emergency`` is the policy's emergency-number function bound to the configured
    numbers. Anything this cannot read is :attr:`Priority.NEW`: the core answers or drops
    it in its turn.
    """
    start = 0
    while data.startswith(b"\r\n", start):
        start += 2
    if data.startswith(b"SIP/2.0 ", start):
        return Priority.ONGOING
    space = data.find(b" ", start, start + 32)
    if space < 0:
        return Priority.NEW
    method = data[start:space]
    if method in _ONGOING_METHODS:
        return Priority.ONGOING
    end = data.find(b"\r\n\r\n", space)
    if end < 0:
        end = len(data)
    if method == b"INVITE":
        uri_end = data.find(b" ", space + 1, end)
        if uri_end > space + 1:
            try:
                uri = parse_uri(data[space + 1 : uri_end].decode("latin-1"))
            except SipError:
                return Priority.NEW
            if emergency(uri) is not None:
                return Priority.EMERGENCY
    if _TO_TAG.search(data, start, end) is not None:
        return Priority.ONGOING
    return Priority.NEW


class LoadSignal:
    """The edge's own load as its adapters last measured it.

    The adapters write ``lag``, ``queue_depth`` and ``queue_delay``; the core asks
    :meth:`shed_reason` only when a new non-emergency request would create a transaction, so
    the check costs nothing on the rest of the traffic.

    ``queue_delay`` is how long the datagram being served waited in the receive queue: what a
    caller feels of the edge's load, whatever the rate. A depth alone is not that: at a few
    thousand calls a second a burst from the softswitch queues hundreds of datagrams that are
    served within milliseconds, and refusing calls for it (the depth bound was once the only
    queue signal) turned calls away at two thirds of a core.
    """

    __slots__ = ("lag", "queue_depth", "queue_delay", "max_lag", "max_queue", "max_queue_delay")

    def __init__(
        self, *, max_lag: float, max_queue: int, max_queue_delay: float = float("inf")
    ) -> None:
        self.lag = 0.0
        """Seconds the event loop's last periodic tick came late."""
        self.queue_depth = 0
        """Datagrams read but not yet processed."""
        self.queue_delay = 0.0
        """Seconds the datagram being served waited between its read and its turn."""
        self.max_lag = max_lag
        self.max_queue = max_queue
        self.max_queue_delay = max_queue_delay

    def shed_reason(self) -> str | None:
        """``queue_delay``, ``queue`` or ``lag`` when new non-emergency work must be refused
        now, else None."""
        if self.queue_delay > self.max_queue_delay:
            return "queue_delay"
        if self.queue_depth > self.max_queue:
            return "queue"
        if self.lag > self.max_lag:
            return "lag"
        return None
