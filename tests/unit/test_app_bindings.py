"""The emergency policy and the datagram classifier as ``app`` binds them: the same answers
as the functions called with the configured numbers."""

from __future__ import annotations

import pytest

from e911_sip.app import datagram_classifier, emergency_policy
from e911_sip.policy.emergency import emergency_number
from e911_sip.proxy.admission import Priority, classify
from e911_sip.sip.uri import parse_uri

NUMBERS = frozenset({"911", "933"})
URIS = (
    "sip:911@192.0.2.1;user=phone",
    "tel:911",
    "sip:933@192.0.2.1",
    "urn:service:sos",
    "urn:service:sos.fire",
    "urn:service:test.sos",
    "sip:3215550000@192.0.2.1",
    "sips:112@192.0.2.1",
)


def request(method: str, ruri: str, to_tag: str = "") -> bytes:
    return (
        f"{method} {ruri} SIP/2.0\r\n"
        "Via: SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bK-1\r\n"
        "From: <sip:3215550001@192.0.2.10>;tag=a\r\n"
        f"To: <{ruri}>{to_tag}\r\n"
        "Call-ID: c1@192.0.2.10\r\n"
        f"CSeq: 1 {method}\r\n"
        "Content-Length: 0\r\n\r\n"
    ).encode()


@pytest.mark.parametrize("numbers", [NUMBERS, frozenset({"911"}), frozenset()])
def test_the_policy_answers_as_emergency_number(numbers: frozenset[str]) -> None:
    policy = emergency_policy(numbers)
    for text in URIS:
        uri = parse_uri(text)
        assert policy(uri) == emergency_number(uri, numbers), text


def test_the_classifier_answers_as_classify_with_the_policy() -> None:
    classifier = datagram_classifier(NUMBERS)
    policy = emergency_policy(NUMBERS)
    datagrams = [request("INVITE", uri) for uri in URIS]
    datagrams += [
        request("INVITE", "sip:911@192.0.2.1", ";tag=b"),
        request("BYE", "sip:911@192.0.2.1", ";tag=b"),
        request("OPTIONS", "sip:192.0.2.1"),
        b"SIP/2.0 180 Ringing\r\n\r\n",
        b"",
        b"garbage",
    ]
    priorities = [classifier(data) for data in datagrams]
    assert priorities == [classify(data, policy) for data in datagrams]
    assert priorities[0] is Priority.EMERGENCY
    assert priorities[6] is Priority.NEW
    assert priorities[len(URIS) + 1] is Priority.ONGOING
