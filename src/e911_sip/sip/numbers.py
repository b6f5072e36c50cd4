"""Numbers read from the wire, bounded before they are converted.

Every number a peer writes (Content-Length, CSeq, Max-Forwards, ports, rport, status codes)
goes through here. ``int()`` on a string of more than 4,300 digits raises ``ValueError``
(CPython's guard against quadratic conversion), and ``str.isdigit()`` accepts digits such as
'²' that ``int()`` refuses; either would escape the parser as something other than a
:class:`~e911_sip.sip.errors.SipError`. The digit count is checked first, after leading zeros,
which RFC 3261's ``1*DIGIT`` allows in any number.
"""

from __future__ import annotations

from typing import Final

from e911_sip.sip.errors import MalformedMessage

MAX_PORT: Final = 65535
MAX_CSEQ: Final = 2**31 - 1
"""RFC 3261 §8.1.1.5: a CSeq number is below 2**31."""
MAX_CONTENT_LENGTH: Final = 2**32 - 1
"""Far above any message limit; a larger value is refused as malformed, not as too large."""


def is_digits(text: str) -> bool:
    """ASCII digits only, at least one."""
    return text.isascii() and text.isdigit()


def short_uint(text: str) -> int:
    """The value of ``text`` when it is one to nine ASCII digits, else -1.

    The parser's common case of each number (a Content-Length, CSeq, Max-Forwards, status
    code or port of a few digits), checked and converted in one pass: compiled,
    ``ord(text[i])`` reads a code point natively, where ``isdigit()`` and then ``int()``
    went through CPython's general conversion (about 500 instructions for three digits).
    """
    n = len(text)
    if n == 0 or n > 9:
        return -1
    value = 0
    for i in range(n):
        digit = ord(text[i]) - 48
        if digit < 0 or digit > 9:
            return -1
        value = value * 10 + digit
    return value


def bounded_uint(text: str, maximum: int) -> int | None:
    """The value of ``text`` when it is ASCII digits worth at most ``maximum``, else None.

    ``maximum`` must be below 10**19 (every field's limit is).
    """
    if not (text.isascii() and text.isdigit()):
        return None
    if len(text) > 9:
        # Leading zeros are allowed, so the digits that count are those after them.
        text = text.lstrip("0") or "0"
        if len(text) > 19:
            return None
    value = int(text)
    return value if value <= maximum else None


def wire_uint(text: str, what: str, maximum: int) -> int:
    """The value of ``text``, a decimal number of at most ``maximum``.

    Raises:
        MalformedMessage: not ASCII digits, or above ``maximum`` (``what`` names the field).
    """
    value = bounded_uint(text, maximum)
    if value is None:
        raise MalformedMessage(f"bad {what} {text[:40]!r}")
    return value
