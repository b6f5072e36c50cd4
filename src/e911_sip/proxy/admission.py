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

from collections.abc import Callable
from enum import IntEnum
from typing import Final

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


# Compiled, a member read through the class is an attribute look-up on a Python type (an
# enum is not a native class) each time; these are read once, at import.
_EMERGENCY: Final = Priority.EMERGENCY
_ONGOING: Final = Priority.ONGOING
_NEW: Final = Priority.NEW


def classify(data: bytes, emergency: Callable[[Uri], str | None]) -> Priority:
    """The priority of one raw message, read from its bytes.

    ``emergency`` is the policy's emergency-number function bound to the configured
    numbers. Anything this cannot read is :attr:`Priority.NEW`: the core answers or drops
    it in its turn.

    A response, and an ACK, CANCEL, BYE or PRACK, is :attr:`Priority.ONGOING`; an INVITE whose
    Request-URI ``emergency`` names is :attr:`Priority.EMERGENCY`; any other request is
    ONGOING when a To (or compact ``t``) header of its header block carries a tag (it is
    inside a dialog, RFC 3261 §12.2), else NEW. Leading CRLFs are skipped; the method is the
    text before the first space among the first 32 bytes (none there: NEW); the Request-URI
    is the text up to the next space, if that comes before the end of the header block
    (the first blank line after the method). A header line carries a tag as the expression
    ``\\r\\n(?:to|t)[ \\t]*:[^\\r\\n]*;[ \\t]*tag[ \\t]*=`` (ASCII letters in any case) reads it:
    a ``;`` anywhere in the line, the URI's parameters included, then ``tag=``.
    """
    if data.startswith(b"\r\n"):
        data = _without_crlfs(data)
    # Byte prefixes, no copy: a native memcmp each. "ACK " is exactly a method ACK, its
    # space the first one.
    if (
        data.startswith(b"SIP/2.0 ")
        or data.startswith(b"ACK ")
        or data.startswith(b"BYE ")
        or data.startswith(b"CANCEL ")
        or data.startswith(b"PRACK ")
    ):
        return _ONGOING
    # Searched as text: compiled, str.find is a direct call where bytes.find parses its
    # arguments as a Python call does (about a thousand instructions a call). latin-1 maps
    # byte n to character n, so positions and the URI's text are the bytes'.
    text = data.decode("latin-1")
    space = text.find(" ", 0, 32)
    if space < 0:
        return _NEW
    if data.startswith(b"INVITE "):
        uri_end = text.find(" ", space + 1)
        if uri_end > space + 1:
            uri_text = text[space + 1 : uri_end]
            # A space past the end of the header block is no Request-URI's end.
            if "\r\n\r\n" not in uri_text:
                try:
                    # The parser's cache: the core's parse of this INVITE finds it there.
                    uri = parse_uri(uri_text)
                except SipError:
                    return _NEW
                if emergency(uri) is not None:
                    return _EMERGENCY
    return _ONGOING if _to_tag(data, text, space) else _NEW


def _without_crlfs(data: bytes) -> bytes:
    """``data`` after its leading CRLFs (keep-alives, RFC 5626 §4.4.1, may precede a message)."""
    start = 0
    while data.startswith(b"\r\n", start):
        start += 2
    return data[start:]


def _to_tag(data: bytes, text: str, space: int) -> bool:
    """Whether a To header line before the end of the header block carries a tag.

    Each line is found with a search for its LF (memchr) and only its first byte read, so
    the block costs a native call a line; ``text`` is ``data`` decoded as latin-1 and
    ``space`` the end of the method. The end of the block is the first CRLF CRLF at or after
    ``space``.
    """
    n = len(data)
    lf = text.find("\n", 1)
    while lf >= 0:
        line = lf + 1
        if line < n and data[lf - 1] == 13:  # a CRLF ends the line before
            first = data[line]
            if first == 116 or first == 84:  # t, T
                if _to_line_tag(data, text, line):
                    return True
            elif first == 13 and lf > space and line + 1 < n and data[line + 1] == 10:
                return False  # CRLF CRLF: the end of the header block
        lf = text.find("\n", line)
    return False


def _to_line_tag(data: bytes, text: str, line: int) -> bool:
    """Whether the line at ``line`` (starting with t or T) is a To header with a tag."""
    n = len(data)
    at = line + 1
    if at < n and data[at] | 32 == 111:  # o, O
        at += 1
    while at < n and (data[at] == 32 or data[at] == 9):
        at += 1
    if at >= n or data[at] != 58:  # ':'
        return False
    # The line ends at its first CR or LF.
    eol = text.find("\r", at)
    if eol < 0:
        eol = n
    lf = text.find("\n", at, eol)
    if lf >= 0:
        eol = lf
    semicolon = text.find(";", at, eol)
    while semicolon >= 0:
        if _tag_param_at(data, semicolon + 1, eol):
            return True
        semicolon = text.find(";", semicolon + 1, eol)
    return False


def _tag_param_at(data: bytes, at: int, eol: int) -> bool:
    """Whether ``[ \\t]*tag[ \\t]*=`` (any case) starts at ``at`` and ends before ``eol``."""
    while at < eol and (data[at] == 32 or data[at] == 9):
        at += 1
    if (
        at + 3 > eol
        or data[at] | 32 != 116  # t
        or data[at + 1] | 32 != 97  # a
        or data[at + 2] | 32 != 103  # g
    ):
        return False
    at += 3
    while at < eol and (data[at] == 32 or data[at] == 9):
        at += 1
    return at < eol and data[at] == 61  # =


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

    The delay sheds only once it has stayed over ``max_queue_delay`` for
    ``queue_delay_sustain`` seconds without a break (``queue_delay_over``): a process that
    loses its core for a moment (a busy host, a collector pass) serves the datagrams it held
    late, then catches up within milliseconds, and refusing every call in that moment turned
    away a hundred calls at half a core. An edge that cannot keep up sees the delay stay up.
    """

    __slots__ = (
        "lag",
        "queue_depth",
        "queue_delay",
        "queue_delay_over",
        "max_lag",
        "max_queue",
        "max_queue_delay",
        "queue_delay_sustain",
    )

    def __init__(
        self,
        *,
        max_lag: float,
        max_queue: int,
        max_queue_delay: float = float("inf"),
        queue_delay_sustain: float = 0.0,
    ) -> None:
        self.lag = 0.0
        """Seconds the event loop's last periodic tick came late."""
        self.queue_depth = 0
        """Datagrams read but not yet processed."""
        self.queue_delay = 0.0
        """Seconds the datagram being served waited between its read and its turn."""
        self.queue_delay_over = 0.0
        """Seconds the datagrams served have all waited more than ``max_queue_delay``, from
        the first of them to the one being served (0 when it waited less)."""
        self.max_lag = max_lag
        self.max_queue = max_queue
        self.max_queue_delay = max_queue_delay
        self.queue_delay_sustain = queue_delay_sustain

    def shed_reason(self) -> str | None:
        """``queue_delay``, ``queue`` or ``lag`` when new non-emergency work must be refused
        now, else None."""
        if (
            self.queue_delay > self.max_queue_delay
            and self.queue_delay_over >= self.queue_delay_sustain
        ):
            return "queue_delay"
        if self.queue_depth > self.max_queue:
            return "queue"
        if self.lag > self.max_lag:
            return "lag"
        return None
