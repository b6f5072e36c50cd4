"""Cutting a byte stream (TCP, TLS) into SIP messages by Content-Length (RFC 3261 §18.3).

A stream carries no message boundaries, so the header block is found by its blank line and
the body by the Content-Length header, which streams make mandatory. CRLF keep-alives between
messages (RFC 5626 §3.5.1) are recognised: a double CRLF "ping" asks for a single CRLF "pong".
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from e911_sip.sip.errors import MalformedMessage, MessageTooLarge
from e911_sip.sip.message import DEFAULT_MAX_SIZE
from e911_sip.sip.numbers import MAX_CONTENT_LENGTH, bounded_uint

_CONTENT_LENGTH = re.compile(rb"\r\n(?:content-length|l)[ \t]*:[ \t]*(\d+)[ \t]*(?=\r\n)", re.I)


@dataclass(slots=True)
class Frames:
    """What one call to :meth:`StreamFramer.feed` produced."""

    messages: list[bytes] = field(default_factory=list)
    """Whole messages, each exactly as received."""
    pong: bool = False
    """True when a CRLFCRLF ping arrived and a CRLF pong is due."""


class StreamFramer:
    """Buffers stream bytes and hands out whole messages."""

    __slots__ = ("_buffer", "_max_size")

    def __init__(self, *, max_size: int = DEFAULT_MAX_SIZE) -> None:
        self._buffer = bytearray()
        self._max_size = max_size

    def feed(self, data: bytes) -> Frames:
        """Add received bytes and return every message they complete.

        Raises:
            MalformedMessage: a header block without a usable Content-Length (none, or
                several that disagree); the stream cannot be re-synchronised and the
                connection should be closed.
            MessageTooLarge: a message longer than the limit, or a Content-Length of more
                digits than any length the limit allows; the connection should be closed.
        """
        buf = self._buffer
        buf += data
        out = Frames()
        while buf:
            # Keep-alives and stray CRLFs between messages (RFC 3261 §7.5, RFC 5626).
            if buf[0] in b"\r\n":
                if buf.startswith(b"\r\n\r\n"):
                    del buf[:4]
                    out.pong = True
                    continue
                if len(buf) < 4 and b"\r\n\r\n".startswith(bytes(buf)):
                    break  # might become a ping with the next read
                del buf[:1]
                continue
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > self._max_size:
                    raise MessageTooLarge("header block exceeds the message size limit")
                break
            if end + 4 > self._max_size:
                raise MessageTooLarge("header block exceeds the message size limit")
            # Every Content-Length is read: framing by one of several disagreeing values
            # would cut the following messages at the wrong place.
            found = {m.group(1) for m in _CONTENT_LENGTH.finditer(buf, 0, end + 2)}
            if not found:
                raise MalformedMessage("stream message without Content-Length")
            lengths = {bounded_uint(text.decode("ascii"), MAX_CONTENT_LENGTH) for text in found}
            if len(lengths) > 1:
                raise MalformedMessage("conflicting Content-Length headers")
            length = lengths.pop()
            if length is None:
                raise MessageTooLarge("Content-Length beyond any message size limit")
            total = end + 4 + length
            if total > self._max_size:
                raise MessageTooLarge(f"message of {total} bytes exceeds the size limit")
            if len(buf) < total:
                break
            out.messages.append(bytes(buf[:total]))
            del buf[:total]
        return out

    @property
    def buffered(self) -> int:
        """Bytes waiting for the rest of their message."""
        return len(self._buffer)
