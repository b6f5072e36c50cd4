"""The byte-level classifier has one semantics: the expression it was first written with.

``reference`` below is that first implementation, kept verbatim: a case-insensitive regular
expression searched over the whole header block. ``classify`` finds the To lines with a
search per line instead; on every message generated here, both give the same priority.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable

from hypothesis import example, given, settings
from hypothesis import strategies as st

from e911_sip.policy.emergency import emergency_number
from e911_sip.proxy.admission import Priority, classify
from e911_sip.sip.errors import SipError
from e911_sip.sip.message import Request, parse
from e911_sip.sip.uri import Uri, cached_uri, parse_uri

POLICY = functools.partial(emergency_number, numbers=frozenset({"911", "933"}))

_ONGOING_METHODS = frozenset({b"ACK", b"CANCEL", b"BYE", b"PRACK"})
_TO_TAG = re.compile(rb"\r\n(?:to|t)[ \t]*:[^\r\n]*;[ \t]*tag[ \t]*=", re.IGNORECASE)


def reference(data: bytes, emergency: Callable[[Uri], str | None]) -> Priority:
    """``classify`` as first written (parse_uri was uncached then; the answer is the same)."""
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


def agree(data: bytes) -> None:
    assert classify(data, POLICY) is reference(data, POLICY), data


# -- generated messages -----------------------------------------------------------------------

NEWLINES = st.sampled_from([b"\r\n"] * 6 + [b"\n", b"\r", b"\r\r\n", b"\n\r"])
BLANKS = st.sampled_from([b"", b"", b" ", b"\t", b"  ", b" \t"])
RURIS = st.sampled_from(
    [
        b"sip:911@192.0.2.1;user=phone",
        b"urn:service:sos",
        b"tel:933",
        b"sip:3215550000@192.0.2.1",
        b"sip:911@192.0.2.1;tag=1",
        b"mailto:911@x",
        b"sip:@x",
        b"",
    ]
)
METHODS = st.sampled_from(
    [
        b"INVITE",
        b"INVITE",
        b"OPTIONS",
        b"INFO",
        b"UPDATE",
        b"MESSAGE",
        b"NOTIFY",
        b"ACK",
        b"BYE",
        b"CANCEL",
        b"PRACK",
        b"invite",
        b"Ack",
        b"X" * 40,
    ]
)
NAMES = st.sampled_from(
    [
        b"To",
        b"To",
        b"to",
        b"TO",
        b"tO",
        b"t",
        b"T",
        b"From",
        b"f",
        b"Via",
        b"Call-ID",
        b"Timestamp",
        b"Too",
        b"To-X",
        b"Tag",
        b" To",
        b"",
    ]
)
PARTS = st.sampled_from(
    [
        b"<sip:3215550000@192.0.2.1>",
        b"sip:911@x",
        b'"Bob; tag=x" <sip:b@x>',
        b"<sip:b@x;user=phone>",
        b"<sip:b@x;tag=1>",
        b";tag=abc",
        b";TAG=abc",
        b"; tag = abc",
        b";\ttag\t=1",
        b";tag",
        b";tagx=1",
        b";xtag=1",
        b";ta",
        b";t",
        b"tag=1",
        b";",
        b";;tag=",
        b" ",
        b"=",
        b"\r",
        b"\n",
    ]
)


@st.composite
def header_line(draw: st.DrawFn) -> bytes:
    name = draw(NAMES)
    colon = draw(st.sampled_from([b":", b":", b":", b"", b"="]))
    value = b"".join(draw(st.lists(PARTS, max_size=5)))
    return name + draw(BLANKS) + colon + draw(BLANKS) + value


@st.composite
def message(draw: st.DrawFn) -> bytes:
    prefix = draw(st.sampled_from([b"", b"", b"\r\n", b"\r\n\r\n", b"\n", b"\r", b"\r\n\n"]))
    if draw(st.integers(0, 5)) == 0:
        start = b"SIP/2.0 " + draw(st.sampled_from([b"200 OK", b"180 Ringing", b"x"]))
    else:
        start = draw(METHODS) + draw(st.sampled_from([b" ", b" ", b"", b"  "])) + draw(RURIS)
        start += draw(st.sampled_from([b" SIP/2.0", b" SIP/2.0", b"", b"SIP/2.0"]))
    out = prefix + start
    for line in draw(st.lists(header_line(), max_size=8)):
        out += draw(NEWLINES) + line
        if draw(st.integers(0, 7)) == 0:
            out += draw(NEWLINES) + draw(st.sampled_from([b" ", b"\t"])) + draw(PARTS)  # folded
    ending = draw(st.sampled_from([b"\r\n\r\n", b"\r\n\r\n", b"\r\n", b"", b"\n\n"]))
    out += ending
    if ending == b"\r\n\r\n":
        # A body that looks like headers (message/sipfrag, an SDP's t= line): never read.
        body = draw(st.sampled_from([b"", b"To: <sip:x@y>;tag=1\r\n", b"v=0\r\nt=0 0\r\n"]))
        out += body
    return out


@settings(max_examples=3000, deadline=None)
@given(message())
@example(b"INVITE sip:3215550000@x SIP/2.0\r\nTo: <sip:a@b>\r\n\r\nTo: <sip:a@b>;tag=1\r\n")
@example(b"OPTIONS sip:x SIP/2.0\r\nt : <sip:a@b>; TAG =1\r\n\r\n")
@example(b"INFO sip:x SIP/2.0\r\nTo: <sip:a@b>\r\n t: x;tag=1\r\nTo:\t;tag=\r\n\r\n")
@example(b"\r\n\r\nOPTIONS sip:x SIP/2.0\r\ntO:;tag=\r\n")
@example(b"OPTIONS sip:x SIP/2.0\r\nTo: <sip:a@b>\r;tag=1\r\n\r\n")
@example(b"OPTIONS sip:x SIP/2.0\r\nTo: <sip:a@b>\n;tag=1\r\n\r\n")
@example(b"X\r\nto:;tag= y\r\n\r\n")
@example(b"X\r\n\r\nto:;tag= y\r\n\r\n")
@example(b"INVITE sip:911@x\r\n\r\nTo: ;tag=1 SIP/2.0\r\n")
@example(b"INVITE sip:911@x\r\nVia: x\r\n\r\n")
def test_classify_agrees_with_the_expression_on_generated_messages(data: bytes) -> None:
    agree(data)


SOUP = st.sampled_from(
    [
        b"\r\n",
        b"\r\n",
        b"\r",
        b"\n",
        b"t",
        b"T",
        b"o",
        b"O",
        b":",
        b";",
        b"tag",
        b"TaG",
        b"ta",
        b"g",
        b"=",
        b" ",
        b"\t",
        b"x",
        b"INVITE ",
        b"OPTIONS ",
        b"SIP/2.0 ",
        b"ACK ",
        b"sip:911@x",
        b"sip:1@x",
        b"To",
        b"\xff",
    ]
)


@settings(max_examples=3000, deadline=None)
@given(st.lists(SOUP, max_size=40).map(b"".join))
def test_classify_agrees_with_the_expression_on_token_soup(data: bytes) -> None:
    agree(data)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200))
def test_classify_agrees_with_the_expression_on_any_bytes(data: bytes) -> None:
    agree(data)


def test_the_request_uri_parsed_here_is_the_one_the_core_finds_in_the_cache() -> None:
    ruri = "sip:3215559876@192.0.2.77:5070;user=phone"
    data = (
        f"INVITE {ruri} SIP/2.0\r\n"
        "Via: SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bKcache1\r\n"
        "Max-Forwards: 70\r\n"
        "From: <sip:3215551234@192.0.2.10>;tag=a\r\n"
        f"To: <{ruri}>\r\n"
        "Call-ID: cache-1\r\n"
        "CSeq: 1 INVITE\r\n"
        "Content-Length: 0\r\n\r\n"
    ).encode()
    assert cached_uri(ruri) is None
    assert classify(data, POLICY) is Priority.NEW
    uri = cached_uri(ruri)
    assert uri is not None and uri.raw == ruri
    request = parse(data)
    assert isinstance(request, Request)
    assert request.request_uri is uri
