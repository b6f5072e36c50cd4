"""What a peer's bytes can do to the SIP layer: only ever a SipError, with the right status.

Each case here was an exception other than a SipError (a ValueError from int() on 4,300+
digits, an IndexError on a Via of nothing but commas) or a wrong answer found by
bench/fuzz.py; the raw messages are in tests/data/invalid/.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from e911_sip.sip.errors import (
    MalformedMessage,
    MessageTooLarge,
    RemoteSipError,
    UnsupportedUriScheme,
)
from e911_sip.sip.framing import StreamFramer
from e911_sip.sip.message import ParseFailure, Request, error_response, parse
from e911_sip.sip.numbers import MAX_CSEQ, bounded_uint, wire_uint
from e911_sip.sip.peer import Peer, peer_for_uri, response_peer
from e911_sip.sip.uri import parse_uri, parse_via, split_values

DATA = Path(__file__).resolve().parents[2] / "data"
INVALID = DATA / "invalid"
VALID = (DATA / "valid" / "portasip_911.sip").read_bytes()
SOURCE = Peer("udp", "192.0.2.10", 5060)


def failure(name: str) -> ParseFailure:
    with pytest.raises(ParseFailure) as info:
        parse((INVALID / name).read_bytes())
    return info.value


# -- numbers -------------------------------------------------------------------------------


def test_bounded_uint_checks_digits_before_converting() -> None:
    assert bounded_uint("0068", 255) == 68
    assert bounded_uint("0" * 5000 + "7", 255) == 7  # 1*DIGIT allows leading zeros
    assert bounded_uint("0", 255) == 0
    assert bounded_uint("9" * 4400, 2**32) is None  # int() would raise ValueError
    assert bounded_uint("256", 255) is None
    assert bounded_uint("\u00b2", 255) is None  # isdigit() but not for int()
    assert bounded_uint("", 255) is None
    assert bounded_uint("-1", 255) is None
    assert bounded_uint(" 1", 255) is None
    assert bounded_uint(str(MAX_CSEQ), MAX_CSEQ) == MAX_CSEQ
    with pytest.raises(MalformedMessage, match="Max-Forwards"):
        wire_uint("x" * 10_000, "Max-Forwards", 255)


# -- the parser: every huge number is a 400, never a ValueError ----------------------------


@pytest.mark.parametrize(
    "name",
    [
        "400_content_length_4400_digits.sip",
        "400_max_forwards_4400_digits.sip",
        "400_cseq_4400_digits.sip",
        "400_uri_port_4400_digits.sip",
    ],
)
def test_numbers_of_4400_digits_are_answered_400(name: str) -> None:
    error = failure(name)
    assert error.status_code == 400
    reply = error_response(error, to_tag="t")
    assert reply is not None and reply.status == 400
    assert reply.get("call-id") is not None


def test_cseq_fault_is_echoed_in_the_reply_as_rfc_4475_wants() -> None:
    # The reply must copy the CSeq it answers, so it carries the same fault; nothing else.
    reply = error_response(failure("400_cseq_4400_digits.sip"))
    assert reply is not None
    assert reply.get("cseq") == "1" * 4400 + " INVITE"


def test_via_port_of_4400_digits_is_dropped() -> None:
    error = failure("drop_via_port_4400_digits.sip")
    assert error_response(error) is None  # no Via to answer to


def test_content_length_with_leading_zeros_is_a_number() -> None:
    data = VALID.replace(b"Content-Length: ", b"Content-Length: " + b"0" * 5000, 1)
    message = parse(data)
    assert message.body.startswith(b"v=0")


def test_max_forwards_is_read_at_parse_time() -> None:
    message = parse(VALID)
    assert isinstance(message, Request)
    assert message.max_forwards == 20
    absent = parse(VALID.replace(b"Max-Forwards: 20\r\n", b""))
    assert isinstance(absent, Request) and absent.max_forwards is None


def test_four_digit_status_code_is_dropped() -> None:
    with pytest.raises(MalformedMessage):
        parse((INVALID / "drop_response_status_four_digits.sip").read_bytes())


def test_uri_and_via_ports_are_bounded() -> None:
    with pytest.raises(MalformedMessage):
        parse_uri("sip:a@host:" + "9" * 4400)
    with pytest.raises(MalformedMessage):
        parse_uri("sip:a@host:65536")
    assert parse_uri("sip:a@host:0065535").port == 65535
    with pytest.raises(MalformedMessage):
        parse_via("SIP/2.0/UDP host:" + "9" * 4400)
    with pytest.raises(MalformedMessage):
        parse_via("SIP/2.0/UDP host:65536")
    assert parse_via("SIP/2.0/UDP host:05060").port == 5060


# -- other decode faults --------------------------------------------------------------------


def test_a_header_name_without_colon_is_refused_even_when_the_name_is_known() -> None:
    # "Subject" alone once matched the cache of header spellings that a valid message had
    # filled, and was taken as an empty Subject header.
    parse(VALID)
    parse(VALID.replace(b"User-Agent:", b"Subject:"))
    error = failure("400_header_name_alone.sip")
    assert error.status_code == 400
    assert "colon" in str(error)
    reply = error_response(error)
    assert reply is not None and reply.status == 400


def test_bare_lf_is_refused_and_never_echoed() -> None:
    error = failure("400_bare_lf_in_header.sip")
    assert "bare CR or LF" in str(error)
    reply = error_response(error)
    assert reply is not None and reply.status == 400
    assert b"Injected" not in reply.to_bytes()
    # In a field the reply would have to copy, the request is dropped instead.
    assert error_response(failure("drop_bare_lf_in_cseq.sip")) is None


def test_bare_cr_is_refused() -> None:
    with pytest.raises(ParseFailure, match="bare CR"):
        parse(VALID.replace(b"User-Agent: PortaSIP", b"User-Agent: Porta\rSIP"))


def test_empty_call_id_is_answered_400() -> None:
    error = failure("400_empty_call_id.sip")
    assert "Call-ID" in str(error)
    reply = error_response(error)
    assert reply is not None and reply.status == 400


def test_via_of_nothing_but_commas_is_a_sip_error() -> None:
    # It raised IndexError out of parse().
    assert split_values(", ,") == [""]
    assert split_values('"a", ,') == ['"a"']
    error = failure("drop_via_only_commas.sip")
    assert error_response(error) is None


def test_response_with_unreadable_to_is_dropped() -> None:
    error = failure("drop_response_to_not_a_name_addr.sip")
    assert error.method is None
    assert error_response(error) is None


def test_oversized_datagram_is_answered_513_when_its_headers_fit() -> None:
    data = VALID.replace(b"Content-Length: ", b"X-Pad: " + b"p" * 2000 + b"\r\nContent-Length: ")
    head_end = data.index(b"\r\n\r\n") + 4
    with pytest.raises(ParseFailure) as info:
        parse(data + b"x" * 3000, max_size=head_end + 10)
    assert info.value.status_code == 513
    reply = error_response(info.value)
    assert reply is not None and reply.status == 513 and reply.reason == "Message Too Large"
    # With not even the header block inside the limit there is nothing to answer with.
    with pytest.raises(MessageTooLarge):
        parse(data, max_size=200)


def test_every_parse_error_is_a_remote_sip_error_for_non_utf8_bytes() -> None:
    for noise in (b"\xff\xfe", b"\xc3\x28", b"\xed\xa0\x80", b"\x00"):
        mangled = VALID.replace(b"CSeq: ", b"CSeq: " + noise, 1)
        with pytest.raises(RemoteSipError):
            parse(mangled)


# -- addresses ------------------------------------------------------------------------------


def test_rport_out_of_range_falls_back_to_the_sent_by_port() -> None:
    for rport in ("9" * 4400, "99999", "0", "\u00b2"):
        via = parse_via(f"SIP/2.0/UDP 192.0.2.10:5062;branch=z9hG4bKr;rport={rport}")
        assert response_peer(via, SOURCE) == Peer("udp", "192.0.2.10", 5062)
    via = parse_via("SIP/2.0/UDP 192.0.2.10:5062;branch=z9hG4bKr;rport=5099")
    assert response_peer(via, SOURCE).port == 5099


def test_tel_and_urn_uris_have_no_host_to_send_to() -> None:
    with pytest.raises(UnsupportedUriScheme):
        peer_for_uri(parse_uri("tel:911"))
    with pytest.raises(UnsupportedUriScheme):
        peer_for_uri(parse_uri("urn:service:sos"))
    assert peer_for_uri(parse_uri("sip:198.51.100.1")) == Peer("udp", "198.51.100.1", 5060)


# -- the stream framer ---------------------------------------------------------------------


def test_framer_content_length_of_4400_digits_closes_the_stream() -> None:
    data = VALID.replace(b"Content-Length: 176", b"Content-Length: " + b"9" * 4400)
    assert data != VALID
    with pytest.raises(MessageTooLarge):
        StreamFramer().feed(data)


def test_framer_reads_leading_zeros() -> None:
    data = VALID.replace(b"Content-Length: ", b"Content-Length: " + b"0" * 4400)
    assert StreamFramer(max_size=10_000).feed(data).messages == [data]


def test_framer_refuses_disagreeing_content_lengths() -> None:
    data = VALID.replace(b"Content-Length: ", b"Content-Length: 3\r\nContent-Length: ")
    with pytest.raises(MalformedMessage, match="conflicting"):
        StreamFramer().feed(data)
    same = VALID.replace(b"Content-Length: 176", b"Content-Length: 176\r\nl: 0176")
    assert StreamFramer().feed(same).messages == [same]


def test_framer_refuses_a_header_block_over_the_limit_even_when_complete() -> None:
    with pytest.raises(MessageTooLarge):
        StreamFramer(max_size=100).feed(VALID)
