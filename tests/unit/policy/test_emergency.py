"""Which calls are emergency calls, and which line is calling."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from e911_sip.policy.emergency import (
    _VISUAL_SEPARATORS,
    _without_separators,
    caller_line,
    emergency_number,
    normalize_nanp,
)
from e911_sip.sip.message import Request, parse
from e911_sip.sip.uri import parse_uri


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("sip:911@192.0.2.1", "911"),
        ("sip:911@192.0.2.1;user=phone", "911"),
        ("sips:933@edge.example.com", "933"),
        ("sip:911;phone-context=+1@192.0.2.1;user=phone", "911"),
        ("tel:911", "911"),
        ("tel:933;phone-context=+1", "933"),
        ("urn:service:sos", "911"),
        ("urn:service:sos.fire", "911"),
        ("urn:service:sos.animal-control", "911"),
        ("URN:Service:SOS.Police", "911"),
        ("urn:service:test.sos", "933"),
        ("sip:9111@192.0.2.1", None),
        ("sip:411@192.0.2.1", None),
        ("sip:3215551234@192.0.2.1", None),
        ("urn:service:counseling", None),
        ("urn:service:sossy", None),
        ("sip:192.0.2.1", None),
    ],
)
def test_emergency_number(uri: str, expected: str | None) -> None:
    assert emergency_number(parse_uri(uri)) == expected


def test_configured_numbers_are_honoured() -> None:
    assert emergency_number(parse_uri("sip:112@x"), frozenset({"112"})) == "112"
    assert emergency_number(parse_uri("sip:911@x"), frozenset({"112"})) is None
    assert emergency_number(parse_uri("urn:service:test.sos"), frozenset({"911"})) is None


@pytest.mark.parametrize(
    ("number", "expected"),
    [
        ("+13215551234", "3215551234"),
        ("13215551234", "3215551234"),
        ("3215551234", "3215551234"),
        ("(321) 555-1234", "3215551234"),
        ("321.555.1234", "3215551234"),
        ("+1-321-555-1234", "3215551234"),
        ("+443215551234", None),
        ("+1321551234", None),
        ("1321551234", "1321551234"),
        ("321555123", None),
        ("132155512345", None),
        ("anonymous", None),
        ("", None),
    ],
)
def test_normalize_nanp(number: str, expected: str | None) -> None:
    assert normalize_nanp(number) == expected


def request(*extra: str, from_uri: str = "sip:+13215551234@192.0.2.10") -> Request:
    lines = [
        "INVITE sip:911@192.0.2.1 SIP/2.0",
        "Via: SIP/2.0/UDP 192.0.2.10;branch=z9hG4bK1",
        f"From: <{from_uri}>;tag=1",
        "To: <sip:911@192.0.2.1>",
        "Call-ID: c",
        "CSeq: 1 INVITE",
        *extra,
        "Content-Length: 0",
    ]
    message = parse(("\r\n".join(lines) + "\r\n\r\n").encode())
    assert isinstance(message, Request)
    return message


def test_caller_from_from_when_no_pai() -> None:
    assert caller_line(request()) == "3215551234"


def test_pai_wins_over_from() -> None:
    assert caller_line(request("P-Asserted-Identity: <sip:13215551000@x>")) == "3215551000"


def test_first_usable_pai_value_counts() -> None:
    pai = 'P-Asserted-Identity: "Desk" <sip:desk@pbx.example.com>, <tel:+1-321-555-1000>'
    assert caller_line(request(pai)) == "3215551000"


def test_unusable_pai_falls_back_to_from() -> None:
    assert caller_line(request("P-Asserted-Identity: <sip:anonymous@x>")) == "3215551234"


def test_no_line_at_all() -> None:
    assert caller_line(request(from_uri="sip:anonymous@anonymous.invalid")) is None


@settings(deadline=None)
@given(st.text(alphabet="+0123456789-.() x\u0663\u00b2", max_size=16))
def test_the_digits_short_cut_takes_out_what_translate_does(text: str) -> None:
    assert _without_separators(text) == text.translate(_VISUAL_SEPARATORS)
