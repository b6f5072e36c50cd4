"""Stream framing by Content-Length (RFC 3261 §18.3) and CRLF keep-alives."""

from __future__ import annotations

from pathlib import Path

import pytest

from e911_sip.sip.errors import MalformedMessage, MessageTooLarge
from e911_sip.sip.framing import StreamFramer

DATA = Path(__file__).resolve().parents[2] / "data" / "valid"
MESSAGE = (DATA / "portasip_911.sip").read_bytes()


def test_one_message_in_one_read() -> None:
    assert StreamFramer().feed(MESSAGE).messages == [MESSAGE]


def test_message_split_across_reads_byte_by_byte() -> None:
    framer = StreamFramer()
    out: list[bytes] = []
    for i in range(len(MESSAGE)):
        out.extend(framer.feed(MESSAGE[i : i + 1]).messages)
    assert out == [MESSAGE]
    assert framer.buffered == 0


def test_two_messages_in_one_read() -> None:
    frames = StreamFramer().feed(MESSAGE + MESSAGE[:50])
    assert frames.messages == [MESSAGE]


def test_compact_content_length() -> None:
    msg = MESSAGE.replace(b"Content-Length:", b"l :")
    assert StreamFramer().feed(msg + msg).messages == [msg, msg]


def test_keepalive_ping_asks_for_pong() -> None:
    frames = StreamFramer().feed(b"\r\n\r\n" + MESSAGE)
    assert frames.pong is True
    assert frames.messages == [MESSAGE]


def test_ping_split_across_reads() -> None:
    framer = StreamFramer()
    assert framer.feed(b"\r\n").pong is False
    assert framer.feed(b"\r\n").pong is True


def test_missing_content_length_is_fatal_for_the_stream() -> None:
    msg = MESSAGE.replace(b"Content-Length: ", b"X-Length: ")
    with pytest.raises(MalformedMessage):
        StreamFramer().feed(msg)


def test_size_limit() -> None:
    with pytest.raises(MessageTooLarge):
        StreamFramer(max_size=200).feed(MESSAGE)
    with pytest.raises(MessageTooLarge):
        StreamFramer(max_size=100).feed(b"INVITE " + b"x" * 200)
