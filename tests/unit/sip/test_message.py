"""Parsing, serialising and changing SIP messages, on raw wire messages from tests/data."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from e911_sip.sip.errors import MalformedMessage, MessageTooLarge, RemoteSipError
from e911_sip.sip.message import (
    ParseFailure,
    Request,
    Response,
    error_response,
    make_response,
    parse,
)

DATA = Path(__file__).resolve().parents[2] / "data"
VALID = sorted((DATA / "valid").glob("*.sip"))
INVALID = sorted((DATA / "invalid").glob("*.sip"))


def test_data_files_present() -> None:
    assert len(VALID) >= 6 and len(INVALID) >= 15


@pytest.mark.parametrize("path", VALID, ids=lambda p: p.stem)
def test_valid_messages_parse_and_round_trip_byte_for_byte(path: Path) -> None:
    data = path.read_bytes()
    message = parse(data)
    assert message.to_bytes() == data


@pytest.mark.parametrize("path", VALID, ids=lambda p: p.stem)
def test_valid_messages_survive_a_header_change_elsewhere(path: Path) -> None:
    data = path.read_bytes()
    message = parse(data)
    changed = message.prepend("Via", "SIP/2.0/UDP 198.51.100.1:5070;branch=z9hG4bKx")
    added = b"Via: SIP/2.0/UDP 198.51.100.1:5070;branch=z9hG4bKx\r\n"
    first_via = [h.raw for h in message.headers if h.key == "via"][0].encode("latin-1")
    at = data.index(b"\r\n" + first_via) + 2
    # Our header goes right before the first Via; every other byte is as it came.
    assert changed.to_bytes() == data[:at] + added + data[at:]


def test_tortuous_invite_values() -> None:
    message = parse((DATA / "valid" / "tortuous_invite.sip").read_bytes())
    assert isinstance(message, Request)
    assert message.method == "INVITE"
    assert message.cseq == (9, "INVITE")
    assert message.get("max-forwards") == "0068"
    assert message.to_tag == "1918181833n"
    assert message.from_tag == "98asjd8"
    assert message.get("subject") == ""
    assert message.get("newfangledheader") == "newfangled value continued newfangled value"
    vias = message.vias
    assert [v.transport for v in vias] == ["UDP", "TCP", "UDP"]
    assert [v.host for v in vias] == ["192.0.2.2", "spindle.example.com", "192.168.255.111"]
    assert vias[0].branch == "z9hG4bK390skdjuw"
    assert vias[2].branch == "z9hG4bK30239"
    assert "sip:bob@192.0.2.4" in (message.get("contact") or "")
    assert len(message.body) == int(message.get("content-length") or 0)


def test_unusual_method_and_uri() -> None:
    message = parse((DATA / "valid" / "unusual_method.sip").read_bytes())
    assert isinstance(message, Request)
    assert message.method == "!interesting-Method0123456789_*+`.%indeed'~"
    assert message.request_uri.host == "example.com"
    assert message.cseq[1] == message.method


def test_response_without_reason_phrase() -> None:
    message = parse((DATA / "valid" / "response_no_reason.sip").read_bytes())
    assert isinstance(message, Response)
    assert message.status == 100
    assert message.reason == ""


def test_compact_forms_are_read_under_their_long_names() -> None:
    data = (
        b"OPTIONS sip:edge@192.0.2.1 SIP/2.0\r\n"
        b"v: SIP/2.0/UDP 192.0.2.10;branch=z9hG4bKc1\r\n"
        b"f: <sip:a@b>;tag=1\r\nt: <sip:c@d>\r\ni: compact@x\r\nCSeq: 1 OPTIONS\r\n"
        b"m: <sip:a@192.0.2.10>\r\ny: token\r\nl: 0\r\n\r\n"
    )
    message = parse(data)
    assert message.call_id == "compact@x"
    assert message.get("identity") == "token"
    assert message.get("contact") == "<sip:a@192.0.2.10>"
    assert message.top_via.branch == "z9hG4bKc1"
    assert message.to_bytes() == data


STATUS_BY_PREFIX = {"400": 400, "416": 416, "505": 505}


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.stem)
def test_invalid_messages_are_answered_or_dropped(path: Path) -> None:
    data = path.read_bytes()
    with pytest.raises(RemoteSipError) as info:
        parse(data)
    prefix = path.stem.split("_", 1)[0]
    error = info.value
    if prefix == "drop":
        reply = error_response(error) if isinstance(error, ParseFailure) else None
        assert reply is None
        return
    assert isinstance(error, ParseFailure), f"{path.name}: {error!r}"
    reply = error_response(error, to_tag="tag1")
    assert reply is not None
    assert reply.status == STATUS_BY_PREFIX[prefix]
    # The reply copies what RFC 3261 §8.2.6.2 says it copies.
    assert reply.get("via") is not None
    assert reply.get("call-id") is not None
    assert reply.to_tag == "tag1"


def test_datagram_body_is_cut_to_content_length() -> None:
    data = (DATA / "valid" / "tel_911.sip").read_bytes()
    message = parse(data + b"trailing garbage")
    assert message.body == b""


def test_stream_messages_keep_their_framed_body() -> None:
    data = (DATA / "valid" / "portasip_911.sip").read_bytes()
    message = parse(data, datagram=False)
    assert message.body.startswith(b"v=0")


def test_size_and_header_limits() -> None:
    data = (DATA / "valid" / "portasip_911.sip").read_bytes()
    with pytest.raises(MessageTooLarge) as size:
        parse(data, max_size=100)
    assert size.value.status_code == 513
    with pytest.raises(ParseFailure) as count:
        parse(data, max_headers=5)
    assert count.value.status_code == 513
    reply = error_response(count.value)
    assert reply is not None and reply.status == 513


def test_header_changes_return_new_messages() -> None:
    original = parse((DATA / "valid" / "portasip_911.sip").read_bytes())
    assert isinstance(original, Request)
    before = original.to_bytes()
    changed = original.replace("Priority", "emergency").append("X-Test", "1").remove("user-agent")
    assert original.to_bytes() == before
    assert changed.get("priority") == "emergency"
    assert not changed.has("user-agent")
    names = [h.raw.split(":", 1)[0] for h in changed.headers]
    assert names[-1] == "Content-Length"
    assert names.index("Priority") < names.index("X-Test") < names.index("Content-Length")


def test_replace_keeps_position_and_drops_duplicates() -> None:
    message = Request("INVITE", "sip:911@x").append("X-A", "1")
    message = message.append("P-Asserted-Identity", "<sip:1@x>").append("X-B", "2")
    message = message.append("P-Asserted-Identity", "<tel:+1>")
    replaced = message.replace("P-Asserted-Identity", "<sip:3215551234@x>")
    assert [h.key for h in replaced.headers] == ["x-a", "p-asserted-identity", "x-b"]
    assert replaced.get_all("p-asserted-identity") == ["<sip:3215551234@x>"]


def test_pop_first_value_of_a_multi_value_via() -> None:
    message = parse((DATA / "valid" / "tortuous_invite.sip").read_bytes())
    first_via_line = [h for h in message.headers if h.key == "via"][0]
    popped = message.pop_top_via()
    assert first_via_line.raw not in [h.raw for h in popped.headers]
    assert [v.host for v in popped.vias] == ["spindle.example.com", "192.168.255.111"]
    twice = popped.pop_top_via()
    assert [v.host for v in twice.vias] == ["192.168.255.111"]


def test_content_length_added_when_missing() -> None:
    data = (
        b"OPTIONS sip:x@192.0.2.1 SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.10;branch=z9hG4bKq\r\n"
        b"From: <sip:a@b>;tag=1\r\nTo: <sip:c@d>\r\nCall-ID: q\r\nCSeq: 1 OPTIONS\r\n\r\n"
    )
    message = parse(data)
    assert message.to_bytes() == data[:-2] + b"Content-Length: 0\r\n\r\n"


def test_make_response_copies_the_right_headers() -> None:
    request = parse((DATA / "valid" / "portasip_911.sip").read_bytes())
    assert isinstance(request, Request)
    response = make_response(request, 486, to_tag="abc")
    assert response.status == 486 and response.reason == "Unknown"
    assert response.get("via") == request.get("via")
    assert response.get("from") == request.get("from")
    assert response.to_tag == "abc"
    assert response.cseq == (102, "INVITE")
    assert not response.has("contact") and not response.has("identity")
    trying = make_response(request, 100, to_tag="abc")
    assert trying.to_tag is None  # RFC 3261 §8.2.6.2: no tag on 100


def test_malformed_start_line_is_not_answerable() -> None:
    with pytest.raises(MalformedMessage):
        parse(b"NOT A SIP MESSAGE\r\n\r\n")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400), st.integers(min_value=0, max_value=700))
def test_parse_raises_only_sip_errors(noise: bytes, cut: int) -> None:
    data = (DATA / "valid" / "portasip_911.sip").read_bytes()
    mangled = data[:cut] + noise + data[cut + len(noise) :]
    try:
        message = parse(mangled)
    except RemoteSipError:
        return
    message.to_bytes()


def test_non_ascii_digits_are_not_numbers() -> None:
    data = (DATA / "valid" / "tel_911.sip").read_bytes()
    with pytest.raises(ParseFailure):
        parse(data.replace(b"Content-Length: 0", b"Content-Length: \xb2"))
    with pytest.raises(ParseFailure):
        parse(data.replace(b"CSeq: 1 INVITE", b"CSeq: \xb2 INVITE"))
