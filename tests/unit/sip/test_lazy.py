"""The lean parser: the plain path agrees with the careful one, cached values stay right
through changes, and an unchanged message is written back as the bytes it came in."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from e911_sip.sip import uri as uri_module
from e911_sip.sip.errors import MalformedMessage, RemoteSipError
from e911_sip.sip.message import (
    _TEMPLATES,
    Request,
    Response,
    _parse_careful,
    _parse_plain,
    make_response,
    parse,
)
from e911_sip.sip.numbers import MAX_PORT, bounded_uint, short_uint
from e911_sip.sip.uri import Via, parse_uri, parse_via

DATA = Path(__file__).resolve().parents[2] / "data"
VALID = [p.read_bytes() for p in sorted((DATA / "valid").glob("*.sip"))]
CORPUS = VALID + [p.read_bytes() for p in sorted((DATA / "invalid").glob("*.sip"))]
ACK = (
    b"ACK sip:127.0.0.1:5080 SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bK-uac-7-ack\r\n"
    b"Route: <sip:127.0.0.1:5070;lr>\r\n"
    b"Max-Forwards: 70\r\n"
    b"From: <sip:3215551234@127.0.0.1>;tag=7SIPpTag00\r\n"
    b"To: <sip:911@127.0.0.1:5070>;tag=uas1\r\n"
    b"Call-ID: 7-bench@127.0.0.1\r\n"
    b"CSeq: 102 ACK\r\n"
    b"Content-Length: 0\r\n\r\n"
)
OK = (
    b"SIP/2.0 200 OK\r\n"
    b"Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bKe1, "
    b"SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bK-uac-7-inv\r\n"
    b"From: <sip:3215551234@127.0.0.1>;tag=7SIPpTag00\r\n"
    b"To: <sip:911@127.0.0.1:5070>;tag=uas1\r\n"
    b"Call-ID: 7-bench@127.0.0.1\r\n"
    b"CSeq: 102 INVITE\r\n"
    b"Content-Type: application/sdp\r\n"
    b"Content-Length: 4\r\n\r\nv=0\n"
)


def _outcome(read: object) -> object:
    """What a parse gives, as a comparable value: every observable part, or the error."""
    try:
        message = read() if callable(read) else read
    except RemoteSipError as exc:
        return ("error", type(exc).__name__, str(exc), exc.status_code)
    assert isinstance(message, Request | Response)
    start = (
        (message.method, message.uri, message.request_uri, message.max_forwards)
        if isinstance(message, Request)
        else (message.status, message.reason)
    )
    return (
        type(message).__name__,
        start,
        message.headers,
        message.body,
        message.to_bytes(),
        message.top_via,
        message.cseq,
        message.call_id,
        _tag(lambda: message.to_tag),
        _tag(lambda: message.from_tag),
    )


def _tag(read: Callable[[], str | None]) -> object:
    """A tag as read from a message, or the error reading it raised (tags are read lazily,
    or by the plain parse ahead of time: the two must agree)."""
    try:
        return read()
    except RemoteSipError as exc:
        return ("error", type(exc).__name__, str(exc))


def _mutants(seed: int, count: int) -> list[bytes]:
    rng = random.Random(seed)
    pieces = [
        b"\r\n",
        b"\r",
        b"\n",
        b" ",
        b"\t",
        b":",
        b";",
        b",",
        b"<",
        b">",
        b'"',
        b"0",
        b"9" * 12,
        b"\xb2",
        b"\xa0",
        b"Via: SIP/2.0/UDP h;branch=z9hG4bKm\r\n",
        b"Content-Length: 1\r\n",
        b"l: 0\r\n",
        b"X-New-Header: v\r\n",
        b"SIP/2.0/TCP [::1]:5060",
    ]
    out: list[bytes] = []
    for _ in range(count):
        data = bytearray(rng.choice([*VALID, ACK, OK]))
        for _ in range(rng.choice((1, 1, 1, 2, 3))):
            at = rng.randrange(len(data) + 1)
            roll = rng.random()
            if roll < 0.4:
                data[at:at] = rng.choice(pieces)
            elif roll < 0.7:
                del data[at : at + rng.randrange(1, 8)]
            else:
                data[at : at + 1] = bytes([rng.randrange(256)])
        out.append(bytes(data))
    return out


@pytest.mark.parametrize("datagram", [True, False])
def test_plain_path_gives_what_the_careful_path_gives(datagram: bool) -> None:
    taken = 0
    for data in [*CORPUS, ACK, OK, *_mutants(11, 1500)]:
        careful = _outcome(lambda data=data: _parse_careful(data, 65535, 256, datagram))
        plain = _parse_plain(data, 256, datagram)
        if plain is None:
            continue  # the careful path decides; parse() takes it
        taken += 1
        assert _outcome(plain) == careful, data
        assert _outcome(lambda data=data: parse(data, datagram=datagram)) == careful
    assert taken > 250  # the comparison is not vacuous


def test_plain_path_takes_the_common_messages() -> None:
    for data in (ACK, OK):
        parse(data)  # its header names are known from now on
        assert _parse_plain(data, 256, True) is not None


def test_plain_path_leaves_limits_to_the_careful_path() -> None:
    parse(ACK)
    assert _parse_plain(ACK, 3, True) is None
    assert _parse_plain(b"\r\n" + ACK, 256, True) is None
    with pytest.raises(RemoteSipError):
        parse(ACK, max_headers=3)
    assert parse(b"\r\n" + ACK).to_bytes() == ACK


def test_unchanged_message_is_written_as_received() -> None:
    assert parse(OK).to_bytes() == OK
    assert parse(OK + b"trailing").to_bytes() == OK  # a datagram is cut to Content-Length
    assert parse(OK + b"trailing", datagram=False).to_bytes() == OK + b"trailing"
    assert parse(b"\r\n\r\n" + ACK).to_bytes() == ACK


def test_cached_values_follow_changes_to_their_header() -> None:
    request = parse(ACK)
    assert isinstance(request, Request)
    assert (request.call_id, request.cseq, request.max_forwards) == (
        "7-bench@127.0.0.1",
        (102, "ACK"),
        70,
    )
    assert (request.to_tag, request.from_tag) == ("uas1", "7SIPpTag00")
    assert request.top_via_branch == "z9hG4bK-uac-7-ack"
    assert request.cseq_method == "ACK"

    other = request.replace("Call-ID", "other@x").replace("Max-Forwards", "5")
    assert (other.call_id, other.max_forwards) == ("other@x", 5)
    other = other.replace("To", "<sip:911@x>;tag=t2").replace("From", "<sip:a@x>;tag=f2")
    assert (other.to_tag, other.from_tag) == ("t2", "f2")
    other = other.replace_at("cseq", "103 ACK")
    assert other.cseq == (103, "ACK")
    pushed = other.prepend("Via", "SIP/2.0/UDP 192.0.2.1;branch=z9hG4bKtop")
    assert pushed.top_via_branch == "z9hG4bKtop"
    assert pushed.pop_top_via().top_via_branch == "z9hG4bK-uac-7-ack"
    # Headers nobody changed keep what was read of them.
    assert pushed.call_id == "other@x" and pushed.to_tag == "t2"
    # The original is untouched.
    assert (request.call_id, request.to_tag, request.max_forwards) == (
        "7-bench@127.0.0.1",
        "uas1",
        70,
    )

    removed = request.remove("to")
    assert removed.to_tag is None


def test_popping_a_via_keeps_the_parsed_rest() -> None:
    response = parse(OK)
    assert [v.branch for v in response.vias] == ["z9hG4bKe1", "z9hG4bK-uac-7-inv"]
    popped = response.pop_top_via()
    assert [v.branch for v in popped.vias] == ["z9hG4bK-uac-7-inv"]
    assert popped.top_via.branch == "z9hG4bK-uac-7-inv"
    with pytest.raises(MalformedMessage, match="no Via"):
        _ = popped.pop_top_via().top_via


def _via_uncached(text: str) -> Via:
    uri_module._VIA_CACHE.clear()
    return parse_via(text)


def _via_by_expression(text: str) -> Via:
    m = uri_module._VIA_RE.match(text)
    if m is None:
        raise MalformedMessage("bad Via")
    transport, host, port_text, ptext = m.groups()
    if host.startswith("["):
        host = host[1:-1]
    port = bounded_uint(port_text, MAX_PORT) if port_text else None
    if port_text and port is None:
        raise MalformedMessage("bad port")
    params = uri_module._split_params(ptext[1:] if ptext else "")
    return Via(transport.upper(), host.lower(), port, params, text)


VIA_PIECES = st.sampled_from(
    [
        "SIP/2.0/UDP ",
        "SIP/2.0/TLS ",
        "sip/2.0/udp ",
        "SIP / 2.0 / TCP ",
        "host.example",
        "192.0.2.1",
        "[2001:db8::1]",
        "[",
        "]",
        ":",
        "5060",
        "065535",
        "65536",
        "9" * 30,
        ";branch=z9hG4bKa",
        ";rport",
        ";received=192.0.2.9",
        "=",
        " ",
        "\t",
        "\r\n ",
        "\xa0",
        "\x1c",
        "\xb2",
        ",",
        "x",
    ]
)


@settings(max_examples=300, deadline=None)
@given(st.lists(VIA_PIECES, min_size=1, max_size=8))
def test_via_short_cut_agrees_with_the_expression(pieces: list[str]) -> None:
    text = "".join(pieces)
    for candidate in (text, "SIP/2.0/UDP " + text):
        try:
            expected: object = _via_by_expression(candidate)
        except MalformedMessage:
            expected = MalformedMessage
        for read in (_via_uncached, parse_via):  # parsed, then from the cache
            try:
                got: object = read(candidate)
            except MalformedMessage:
                got = MalformedMessage
            assert got == expected, candidate


def test_via_cache_is_bounded_and_keeps_no_long_via() -> None:
    for i in range(uri_module._VIA_CACHE_SIZE + 10):
        assert parse_via(f"SIP/2.0/UDP 192.0.2.1;branch=z9hG4bK{i}").branch == f"z9hG4bK{i}"
    assert len(uri_module._VIA_CACHE) <= uri_module._VIA_CACHE_SIZE
    long = "SIP/2.0/UDP 192.0.2.1;branch=" + "b" * 300
    assert parse_via(long).branch == "b" * 300
    assert long not in uri_module._VIA_CACHE
    for _ in range(2):
        with pytest.raises(MalformedMessage):
            parse_via("SIP/2.0/UDP 192.0.2.1:99999")  # an error is not cached as a value


def test_uri_cache_is_bounded_and_keeps_no_long_uri() -> None:
    for i in range(uri_module._URI_CACHE_SIZE + 10):
        parse_uri(f"sip:{i}@192.0.2.1")
    assert len(uri_module._URI_CACHE) <= uri_module._URI_CACHE_SIZE
    long = "sip:" + "a" * 300 + "@192.0.2.1"
    assert parse_uri(long).user == "a" * 300
    assert long not in uri_module._URI_CACHE
    with pytest.raises(MalformedMessage):
        parse_uri("sip:@x")
    with pytest.raises(MalformedMessage):
        parse_uri("sip:@x")  # an error is not cached as a value


@given(st.text(alphabet="0123456789²¹ +-a\x00", max_size=11))
@settings(deadline=None)  # a descheduled example is not a misread
def test_short_uint_is_int_of_one_to_nine_ascii_digits(text: str) -> None:
    plain = 0 < len(text) <= 9 and text.isascii() and text.isdigit()
    assert short_uint(text) == (int(text) if plain else -1)


def test_a_message_of_a_known_shape_is_read_against_its_template() -> None:
    _TEMPLATES.clear()
    first = parse(ACK)
    assert len(_TEMPLATES) == 1  # the ACK left the names of its shape
    (spellings, keys, at, lengths, cut) = next(iter(_TEMPLATES.values()))
    assert keys == list(first._keys)
    assert spellings == [line[: line.find(":") + 1] for line in first._text()]
    assert lengths == 1
    # Each header the parse reads has its value's start noted: just past its colon.
    for slot in range(1, 8):
        if at[slot] >= 0:
            line = first._text()[at[slot]]
            assert cut[slot] == line.find(":") + 1
    again = parse(ACK.replace(b"-7-ack", b"-8-ack"))
    # Shared: a message never changes its keys in place (each change copies them).
    assert again._keys is first._keys is keys
    assert len(_TEMPLATES) == 1


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (b"Max-Forwards:", b"Subject:"),  # another header in that place
        (b"Route:", b"route:"),  # the same header spelt otherwise
        (b"Route:", b"Route :"),  # space before the colon
        (b"Call-ID:", b"i:"),  # a compact form
        (b"Max-Forwards:", b"Max-Forwards-X:"),  # a longer name with the same start
        (b"Max-Forwards: 70", b"Max-Forwards"),  # no colon at all
    ],
)
def test_a_message_of_a_known_shape_but_other_names_is_read_by_its_names(
    old: bytes, new: bytes
) -> None:
    changed = ACK.replace(old, new)
    try:
        careful: Request | Response | None = _parse_careful(changed, 65535, 256, True)
    except RemoteSipError:
        careful = None  # the careful path has now seen every name spelt as here
    _TEMPLATES.clear()
    parse(ACK)  # the template the changed message is of the shape of
    plain = _parse_plain(changed, 256, True)
    if careful is None:
        assert plain is None
        return
    assert plain is not None
    assert plain._keys == careful._keys
    assert plain._text() == careful._text()


# An edit of a message that keeps its received bytes (its lines not made) makes its lines
# for itself; the same edit of the same message with its lines made copies them. The two
# must give the same message, and the message edited must keep its bytes.
EDIT_NAMES = ["Via", "Route", "Record-Route", "Max-Forwards", "Priority", "X-Extra", "To"]
EDIT_VALUES = ["SIP/2.0/UDP e:5060;branch=z9hG4bKe;rport", "<sip:e;lr>", "70", "a, b", "é", "€"]
EDIT_OPS = st.lists(
    st.tuples(
        st.sampled_from(
            ["prepend", "append", "replace", "remove", "replace_at", "pop_first_value", "get"]
        ),
        st.sampled_from(EDIT_NAMES),
        st.sampled_from(EDIT_VALUES),
    ),
    max_size=6,
)


def _apply(message: Request | Response, ops: list[tuple[str, str, str]], uri: str | None):
    edit = message.edit()
    seen: list[object] = []
    for op, name, value in ops:
        key = name.lower()
        if op in ("prepend", "append", "replace"):
            getattr(edit, op)(name, value)
        elif op == "remove":
            edit.remove(key)
        elif op == "pop_first_value":
            edit.pop_first_value(key)
        elif op == "replace_at":
            if edit.has(key):
                edit.replace_at(key, value)
        else:
            seen.append((edit.get(key), edit.get_all(key), edit.has(key)))
    if uri is not None and isinstance(message, Request):
        return edit.done(uri=uri), seen
    return edit.done(), seen


@settings(max_examples=500)
@given(
    st.sampled_from([ACK, *VALID]),
    EDIT_OPS,
    st.sampled_from([None, "sip:911@10.0.0.9", "sip:é@h"]),
)
def test_an_edit_from_the_received_bytes_is_the_edit_from_the_lines(
    data: bytes, ops: list[tuple[str, str, str]], uri: str | None
) -> None:
    parsed = _parsed_twice(data)
    if parsed is None:
        return
    kept, made = parsed
    made._text()  # the lines made: the edit works on a copy of them
    if kept._lines is not None:
        return  # a message the careful parse read: it has its lines anyway
    a, seen_a = _apply(kept, ops, uri)
    assert kept._lines is None  # its lines were made for the edit alone
    b, seen_b = _apply(made, ops, uri)
    assert seen_a == seen_b
    assert a._text() == b._text() and a._keys == b._keys
    assert a.headers == b.headers
    try:
        expected = b.to_bytes()
    except UnicodeEncodeError:
        with pytest.raises(UnicodeEncodeError):
            a.to_bytes()
        return
    assert a.to_bytes() == expected
    # What the bytes were written from reads back the same: parsed again, the same message.
    try:
        again = parse(expected)
    except RemoteSipError:
        pass  # an edit drawn to leave a mandatory header out
    else:
        assert again.headers == a.headers
    assert _cached(a) == _cached(b)
    # The message edited is unchanged.
    assert kept.to_bytes() == data[: len(kept.to_bytes())]


def _parsed_twice(data: bytes) -> tuple[Request | Response, Request | Response] | None:
    """Two parses of ``data`` (one to keep as parsed, one to have its lines made), or None
    when it does not parse."""
    try:
        return parse(data), parse(data)
    except RemoteSipError:
        return None


def _cached(message: Request | Response) -> list[object]:
    """The values a message reads and keeps, or the error each raises."""
    out: list[object] = []
    for name in ("top_via", "cseq", "call_id", "max_forwards", "to_tag", "from_tag"):
        try:
            out.append(getattr(message, name))
        except RemoteSipError as exc:
            out.append(type(exc))
    return out


@settings(max_examples=300)
@given(
    st.sampled_from([ACK, *VALID]),
    st.sampled_from([100, 180, 200, 487, 503]),
    st.sampled_from([None, "", "t1"]),
    st.sampled_from([None, "Custom Reason"]),
)
def test_a_response_made_from_the_received_bytes_is_the_one_made_from_the_lines(
    data: bytes, status: int, to_tag: str | None, reason: str | None
) -> None:
    parsed = _parsed_twice(data)
    if parsed is None or not isinstance(parsed[0], Request):
        return
    kept, made = parsed
    assert isinstance(made, Request)
    made._text()
    a = make_response(kept, status, reason, to_tag=to_tag)
    b = make_response(made, status, reason, to_tag=to_tag)
    assert kept._lines is None or kept._at == b""  # the request's lines stay unmade
    if kept._lines is None and not (to_tag and status > 100):
        assert a._lines is None and a._at  # made from the bytes: a parsed response's form
    assert (a.status, a.reason, a._keys) == (b.status, b.reason, b._keys)
    assert a.headers == b.headers
    assert a.to_bytes() == b.to_bytes()
    assert _cached(a) == _cached(b)
    again = parse(a.to_bytes())
    assert again.headers == a.headers and again.to_bytes() == a.to_bytes()
    # Read and changed as any parsed response is.
    assert a.pop_top_via().to_bytes() == b.pop_top_via().to_bytes()
    assert a.append("X-A", "1").to_bytes() == b.append("X-A", "1").to_bytes()


def test_the_response_to_pass_upstream_is_cut_only_below_the_expected_via() -> None:
    response = parse(OK)
    assert isinstance(response, Response)
    upstream = "SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bK-uac-7-inv"
    relayed = response.pop_top_via_before(upstream)
    assert relayed is not None
    assert relayed.to_bytes() == response.pop_top_via().to_bytes()
    assert relayed.to_bytes() == OK.replace(b"SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bKe1, ", b"")
    assert response.pop_top_via_before(upstream + ";rport") is None
    assert response.pop_top_via_before(upstream[:-1]) is None
    # A message written from its lines has no received bytes to cut.
    assert response.append("X-A", "1").pop_top_via_before(upstream) is None
