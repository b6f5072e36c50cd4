"""The short cuts of the relay path give exactly what the general path gives.

Each short cut (a response's bytes spliced rather than written out again, our own Via put in
the Via cache parsed) must fall back to the general path for anything unusual; these tests
compare the two on usual and unusual input.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from e911_sip.proxy.routing import LocalAddress, own_via
from e911_sip.sip.errors import MalformedMessage, RemoteSipError
from e911_sip.sip.message import (
    Message,
    Request,
    Response,
    _after_vias,
    _tag_of,
    make_response,
    parse,
)
from e911_sip.sip.peer import Peer, response_peer
from e911_sip.sip.uri import (
    _VIA_BASES,
    _VIA_CACHE,
    NameAddr,
    Via,
    _parse_via,
    _split_params,
    _via_parts,
    name_addr_uri_text,
    param_of,
    parse_name_addr,
    parse_uri,
    parse_via,
    uri_hostport,
)

DATA = Path(__file__).resolve().parents[2] / "data"
VALID = sorted((DATA / "valid").glob("*.sip"))

OURS = "SIP/2.0/UDP 10.0.0.1:5070;branch=z9hG4bKours;rport"
UPSTREAM = "SIP/2.0/UDP 10.0.0.2:5060;branch=z9hG4bKup;received=10.0.0.2;rport=5060"


def _response(start: str, via_lines: list[str], *, body: bytes = b"") -> bytes:
    head = [
        start,
        *via_lines,
        "From: <sip:a@example.com>;tag=1",
        "To: <sip:b@example.com>;tag=2",
        "Call-ID: abc@example.com",
        "CSeq: 1 INVITE",
        f"Content-Length: {len(body)}",
    ]
    return "\r\n".join(head).encode("latin-1") + b"\r\n\r\n" + body


def _written_whole(message: Response) -> bytes:
    """What the general path writes: the popped copy serialised from its header lines."""
    return message.pop_first_value("via").to_bytes()


CASES = {
    "one line, two values": ["Via: " + OURS + ", " + UPSTREAM],
    "two lines": ["Via: " + OURS, "Via: " + UPSTREAM],
    "compact form": ["v: " + OURS + "," + UPSTREAM],
    "odd spacing": ["Via:   " + OURS + " ,\t" + UPSTREAM + "  "],
    "three values": ["Via: " + OURS + ", " + UPSTREAM + ", SIP/2.0/TCP 10.0.0.3;branch=z9hG4bKx"],
    "folded": ["Via: " + OURS + ",", " " + UPSTREAM],
    "quoted comma": ["Via: " + OURS + ';x="a,b", ' + UPSTREAM],
    "empty first value": ["Via: , " + OURS + ", " + UPSTREAM],
    "lone value": ["Via: " + OURS],
    "not first": ["Record-Route: <sip:10.0.0.1;lr>", "Via: " + OURS + ", " + UPSTREAM],
}


@pytest.mark.parametrize("vias", CASES.values(), ids=CASES.keys())
@pytest.mark.parametrize(
    "start",
    ["SIP/2.0 180 Ringing", "SIP/2.0 200 OK", "SIP/2.0 200", "SIP/2.0 200 ", "SIP/2.0 200  x "],
)
def test_popping_our_via_writes_what_a_whole_rewrite_writes(start: str, vias: list[str]) -> None:
    data = _response(start, vias, body=b"v=0\r\n")
    message = parse(data)
    assert isinstance(message, Response)
    assert message.to_bytes() == data  # the parse kept the received bytes
    popped = message.pop_top_via()
    assert popped.to_bytes() == _written_whole(message)
    assert popped.values("via") == message.values("via")[1:]


@given(
    reason=st.text(st.characters(min_codepoint=32, max_codepoint=255, exclude_characters="\x7f")),
    status=st.integers(100, 699),
)
@settings(max_examples=200, deadline=None)
def test_any_status_line_is_spliced_as_the_whole_rewrite_writes_it(
    status: int, reason: str
) -> None:
    # The splice finds where the start line ends without writing it out: the status line
    # read must be the one start_line() writes, whatever its reason phrase holds.
    data = _response(f"SIP/2.0 {status} {reason}", ["Via: " + OURS + ", " + UPSTREAM])
    message = parse(data)
    assert isinstance(message, Response)
    assert message.to_bytes() == data
    assert message.pop_top_via().to_bytes() == _written_whole(message)


def test_a_response_read_past_leading_crlfs_is_spliced_as_the_whole_rewrite_writes_it() -> None:
    # The careful parse (it skips CRLFs before the start line) keeps the bytes from the
    # start line on: the splice counts from there.
    data = _response("SIP/2.0 180 Ringing", ["Via: " + OURS + ", " + UPSTREAM])
    message = parse(b"\r\n\r\n" + data)
    assert isinstance(message, Response)
    assert message.to_bytes() == data
    assert message.pop_top_via().to_bytes() == _written_whole(message)


def test_a_response_written_here_is_spliced_as_the_whole_rewrite_writes_it() -> None:
    # Bytes from to_bytes, not from a parse: a Content-Length added at the end, a reason
    # phrase of our choosing, and a status line of another length than three digits.
    for status, reason in [(180, "Ringing"), (200, ""), (486, "Busy Here Now"), (99, " x")]:
        received = parse(_response("SIP/2.0 200 OK", ["Via: " + OURS + ", " + UPSTREAM]))
        made = Response(status, reason, received.headers).remove("content-length")
        made.to_bytes()
        assert made.pop_top_via().to_bytes() == _written_whole(made)


def test_a_start_line_without_reason_falls_back_to_the_whole_rewrite() -> None:
    message = parse(_response("SIP/2.0 200", ["Via: " + OURS + ", " + UPSTREAM]))
    assert isinstance(message, Response)
    popped = message.pop_top_via()
    assert popped.to_bytes().startswith(b"SIP/2.0 200 \r\nVia: " + UPSTREAM.encode())


def test_a_datagram_cut_to_its_content_length_is_spliced_without_the_excess() -> None:
    data = _response("SIP/2.0 200 OK", ["Via: " + OURS + ", " + UPSTREAM], body=b"abc")
    message = parse(data + b"trailing junk", datagram=True)
    assert isinstance(message, Response)
    popped = message.pop_top_via()
    assert popped.to_bytes() == _written_whole(message)
    assert popped.to_bytes().endswith(b"\r\n\r\nabc")


@pytest.mark.parametrize("path", VALID, ids=lambda p: p.stem)
def test_popping_a_via_of_each_valid_message_matches_the_whole_rewrite(path: Path) -> None:
    message = parse(path.read_bytes())
    assert message.pop_top_via().to_bytes() == message.pop_first_value("via").to_bytes()


@pytest.mark.parametrize(
    "local",
    [
        LocalAddress("udp", "127.0.0.1", 5070),
        LocalAddress("tcp", "Edge.Example.COM", 5060),
        LocalAddress("tls", "10.1.2.3", 5061),
        LocalAddress("udp", "::1", 5070),
    ],
    ids=lambda local: f"{local.transport}-{local.host}",
)
def test_our_via_in_the_cache_is_what_parsing_it_gives(local: LocalAddress) -> None:
    text = own_via(local, "z9hG4bKabcdefABCDEF-_0123456789xy")
    assert parse_via(text) == _parse_via(text)
    assert parse_via(text).raw == text


def test_a_via_for_no_response_is_not_cached() -> None:
    text = own_via(LocalAddress("udp", "127.0.0.1", 5070), "z9hG4bKack-only", answered=False)
    assert text not in _VIA_CACHE


EDITS = [
    ("replace", "Priority", "emergency"),
    ("append", "Geolocation", "<https://example.com/loc>"),
    ("append", "Geolocation-Routing", "no"),
    ("replace", "P-Asserted-Identity", "<sip:3215551234@example.com>"),
    ("remove", "p-preferred-identity", ""),
    ("remove", "via", ""),
    ("replace", "Max-Forwards", "12"),
    ("append", "Via", "SIP/2.0/UDP 10.9.9.9;branch=z9hG4bKnew"),
    ("replace", "Contact", "<sip:x@example.com>"),
    ("remove", "contact", ""),
    ("replace", "To", "<sip:b@example.com>;tag=zz"),
]


def _apply_chained(message, edits):  # type: ignore[no-untyped-def]
    for op, name, value in edits:
        message = message.remove(name) if op == "remove" else getattr(message, op)(name, value)
    return message


def _read(message):  # type: ignore[no-untyped-def]
    out = [message.to_bytes(), message.headers]
    for name in ("top_via", "cseq", "call_id", "to_tag", "from_tag", "max_forwards", "vias"):
        try:
            out.append(getattr(message, name))
        except Exception as exc:  # noqa: BLE001 - the same failure either way is the point
            out.append(type(exc))
    return out


@pytest.mark.parametrize("path", VALID, ids=lambda p: p.stem)
@pytest.mark.parametrize("start", range(len(EDITS)))
def test_edits_on_one_copy_give_what_the_chain_of_copies_gives(path: Path, start: int) -> None:
    message = parse(path.read_bytes())
    message.top_via  # noqa: B018 - cached values must carry over (or not) the same way
    edits = EDITS[start:] + EDITS[:start]
    for count in range(len(edits) + 1):
        edit = message.edit()
        for op, name, value in edits[:count]:
            edit = edit.remove(name) if op == "remove" else getattr(edit, op)(name, value)
        assert _read(edit.done()) == _read(_apply_chained(message, edits[:count]))


def test_an_edit_that_changes_nothing_is_the_message_itself() -> None:
    message = parse(VALID[0].read_bytes())
    assert message.edit().remove("x-not-there").done() is message
    assert message.edit().has("via")
    assert message.edit().append("X-A", "1").get_all("x-a") == ["1"]


@pytest.mark.parametrize(
    "text",
    [
        OURS,
        "SIP/2.0/TCP host.example;received=192.0.2.4;flag",
        "SIP / 2.0 / udp [::1] : 5060 ; branch = b",
    ],
)
def test_a_parsed_via_is_the_value_its_constructor_builds(text: str) -> None:
    via = _parse_via(text)
    assert type(via) is Via
    assert via == Via(*via)
    assert (via.transport, via.host, via.raw) == (via[0], via[1], text)
    for name in ("branch", "rport", "received", "flag", "absent"):
        assert param_of(via.params, name) == via.param(name)


def _via_or_error(text: str) -> Via | str:
    try:
        return _parse_via(text)
    except MalformedMessage as exc:
        return str(exc)


_VIA_BASE_TEXTS = [
    "SIP/2.0/UDP 10.0.0.2:5060",
    "SIP/2.0/TLS Edge.Example.COM",
    "SIP/2.0/TCP h:99999",
]


@settings(max_examples=400, deadline=None)
@given(
    st.sampled_from(_VIA_BASE_TEXTS),
    st.lists(
        st.sampled_from(
            [";", "branch", "=", "z9hG4bK-1", " ", "\t", "rport", "\xa0", ":", "[", ","]
        ),
        max_size=8,
    ).map("".join),
)
def test_a_via_read_after_its_sent_by_was_kept_is_what_the_full_cut_reads(
    base: str, tail: str
) -> None:
    first = f"{base};branch=z9hG4bK-first"
    _VIA_BASES.clear()
    _via_parts(first)  # keeps the part before the ';' when the short cut read it
    text = f"{base};{tail}"
    warm = _via_parts(text)
    _VIA_BASES.clear()
    assert warm == _via_parts(text)
    assert warm == _via_parts(text)  # the cold read may have kept it: the same again
    if warm is not None:
        assert _via_or_error(text) == Via(*warm, text)


def _params_by_the_loop(text: str) -> tuple[tuple[str, str | None], ...]:
    out: list[tuple[str, str | None]] = []
    for part in text.split(";"):
        name, eq, value = part.partition("=")
        if eq:
            out.append((name.strip().lower(), value.strip()))
        elif part:
            out.append((part.strip().lower(), None))
    return tuple(out)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([";", "=", " ", "Branch", "x", "\t"]), max_size=6).map("".join))
def test_parameters_are_cut_as_the_loop_over_every_part_cuts_them(text: str) -> None:
    assert _split_params(text) == _params_by_the_loop(text)


def test_a_via_sent_by_is_kept_only_when_the_short_cut_read_it() -> None:
    # The Python short cut's own cache (the native reading, when built, needs none).
    _VIA_BASES.clear()
    _via_parts("SIP/2.0/UDP 10.0.0.2:5060;branch=z9hG4bK-1")
    _via_parts("SIP / 2.0 / UDP 10.0.0.3 ;branch=z9hG4bK-2")
    _via_parts("SIP/2.0/UDP 10.0.0.4")
    assert _VIA_BASES == {"SIP/2.0/UDP 10.0.0.2:5060": ("UDP", "10.0.0.2", 5060)}


@pytest.mark.parametrize("text", ['"A" <sip:a@x>;tag=1;x', "sip:b@y;tag=2", "<sip:c@z>"])
def test_a_parsed_name_addr_is_the_value_its_constructor_builds(text: str) -> None:
    addr = parse_name_addr(text)
    assert type(addr) is NameAddr
    assert addr == NameAddr(*addr)
    assert (addr.uri, addr.raw) == (addr[1], text)
    for name in ("tag", "x", "absent"):
        assert param_of(addr.params, name) == addr.param(name)


def _uri_of(read: Callable[[str], str], value: str) -> str | type[Exception]:
    try:
        return read(value)
    except MalformedMessage:
        return MalformedMessage


@settings(deadline=None)
@given(st.text(alphabet='<>;=" \t:@sipab', max_size=24))
def test_the_uri_of_a_name_addr_is_the_full_parse_s(value: str) -> None:
    assert _uri_of(name_addr_uri_text, value) == _uri_of(
        lambda text: parse_name_addr(text).uri, value
    )


def _tag_by_full_parse(value: str) -> str | None | type[Exception]:
    try:
        return param_of(parse_name_addr(value).params, "tag")
    except MalformedMessage:
        return MalformedMessage


def _tag_in_place(value: str) -> str | None | type[Exception]:
    try:
        return _tag_of(value)
    except MalformedMessage:
        return MalformedMessage


@pytest.mark.parametrize(
    "value",
    [
        "<sip:b@example.com>;tag=2",
        "<sip:b@example.com>;tag=2;x=y",
        " <sip:b@example.com>;tag= 2 ;x",
        "Bob <sip:b@example.com>;tag=",
        '"Bob" <sip:b@example.com>;tag=2',
        "<sip:b@example.com> ;tag=2",
        "<sip:b@example.com>;TAG=2",
        "<sip:b@example.com>;x;tag=2",
        "<sip:b@example.com;tag=uri>;tag=2",
        "<sip:b@example.com>",
        "<sip:b@example.com>x;tag=2",
        "< >;tag=2",
        "<sip:b@example.com;tag=2",
        "sip:b@example.com;tag=2",
        "<sip:b@example.com>;tag=2<",
    ],
)
def test_a_tag_read_in_place_is_the_one_the_full_parse_reads(value: str) -> None:
    assert _tag_in_place(value) == _tag_by_full_parse(value)


@settings(max_examples=400, deadline=None)
@given(
    st.lists(
        st.sampled_from(["<", ">", ";", "tag", "=", " ", '"', "sip:a@b", "x", "TAG", ","]),
        max_size=12,
    ).map("".join)
)
def test_any_to_or_from_gives_the_tag_the_full_parse_gives(value: str) -> None:
    assert _tag_in_place(value) == _tag_by_full_parse(value)


_VIA_VALUES = [OURS, UPSTREAM] * 3 + ['SIP/2.0/TCP 10.0.0.3;x="a,b"', "", " ", "<", OURS + " "]
_VIA_SEPARATORS = [", "] * 5 + [",", " , ", ",\t", ", ,"]


@st.composite
def _via_values(draw: st.DrawFn) -> str:
    """Via values joined as responses usually join them (", "), with now and then a value
    or a separator the in-place cut must leave to the general path."""
    values = draw(st.lists(st.sampled_from(_VIA_VALUES), min_size=1, max_size=3))
    values.insert(0, draw(st.sampled_from([OURS, OURS, " "])))
    out = values[0]
    for value in values[1:]:
        out += draw(st.sampled_from(_VIA_SEPARATORS)) + value
    return out + draw(st.sampled_from(["", "", "", "", " ", ","]))


@settings(max_examples=400, deadline=None)
@given(
    st.sampled_from(["Via: ", "Via: ", "Via: ", "Via:", "v: ", "VIA : "]),
    _via_values(),
    st.sampled_from(["SIP/2.0 200 OK", "SIP/2.0 200 OK", "SIP/2.0 200"]),
)
def test_any_via_line_is_popped_as_the_whole_rewrite_pops_it(
    name: str, value: str, start: str
) -> None:
    data = _response(start, [name + value], body=b"x")
    try:
        message = parse(data)
    except RemoteSipError:
        return  # nothing to pop: the parse refused it
    assert isinstance(message, Response)
    message.top_via  # noqa: B018 - the in-place cut reads the top Via the parse kept
    popped = message.pop_top_via()
    general = message.pop_first_value("via")
    assert _read(popped) == _read(general)
    assert popped.to_bytes() == _written_whole(message)


@pytest.mark.parametrize("name", ["Via", "v"])
def test_a_usual_via_line_is_cut_in_place(name: str) -> None:
    message = parse(_response("SIP/2.0 180 Ringing", [f"{name}: {OURS}, {UPSTREAM}"]))
    assert message._wire is not None
    popped = message._pop_top_via_in_place(message._wire, OURS, None)
    assert popped is not None  # the usual shape must not fall back to the general path
    assert popped.to_bytes() == _written_whole(message)


_RESPONSE_ATTRIBUTES = (
    "status",
    "reason",
    "body",
    "_wire",
    "_at",
    "_vias",
    "_top_via",
    "_cseq",
    "_call_id",
    "_to_tag",
    "_from_tag",
    "_mf",
)


def test_a_made_response_holds_what_the_constructor_leaves() -> None:
    request = parse(
        b"INVITE sip:911@10.0.0.1 SIP/2.0\r\nVia: " + OURS.encode() + b"\r\n"
        b"From: <sip:a@example.com>;tag=1\r\nTo: <sip:911@example.com>\r\n"
        b"Call-ID: c@example.com\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n"
    )
    assert isinstance(request, Request)
    made = make_response(request, 100)
    built = Response(100, "Trying")
    # Named here: compiled, the classes have no __slots__ to list them.
    if hasattr(Response, "__slots__"):
        slots = set(Response.__slots__) | set(Message.__slots__)
        assert slots - {"_lines", "_keys"} == set(_RESPONSE_ATTRIBUTES)
    # Made from the request's received bytes, it holds bytes and offsets as a parsed
    # response does; all else as the constructor leaves it.
    for name in _RESPONSE_ATTRIBUTES:
        if name not in ("_wire", "_at"):
            assert getattr(made, name) == getattr(built, name), name
    assert made._at and made._wire == Response(100, "Trying", made.headers).to_bytes()
    # Made from the request's lines, it holds exactly what the constructor leaves.
    request._text()
    lined = make_response(request, 100)
    for name in _RESPONSE_ATTRIBUTES:
        assert getattr(lined, name) == getattr(built, name), name
    assert lined.to_bytes() == made.to_bytes()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["via", "from", "to", "route", "record-route"]), max_size=8))
def test_the_place_after_the_vias_is_found_from_the_end(keys: list[str]) -> None:
    expected = len(keys) - keys[::-1].index("via") if "via" in keys else 0
    assert _after_vias(keys) == expected


@pytest.mark.parametrize(
    "text",
    [
        "sip:10.0.0.1",
        "sip:10.0.0.1:5080;transport=tcp",
        "sip:911@trunk.example.com:5061;transport=TLS",
        "sips:[2001:db8::1]:5061",
        "sip:[2001:db8::1]",
    ],
)
def test_a_uri_hostport_read_natively_is_the_property(text: str) -> None:
    uri = parse_uri(text)
    host = f"[{uri.host}]" if ":" in uri.host else uri.host
    assert uri_hostport(uri) == (host if uri.port is None else f"{host}:{uri.port}")
    assert uri.hostport == uri_hostport(uri)


@pytest.mark.parametrize(
    ("via", "source", "expected"),
    [
        ("SIP/2.0/UDP 10.0.0.9:5060;branch=z9hG4bKa;rport", ("udp", "10.0.0.9", 5062), 5062),
        ("SIP/2.0/UDP 10.0.0.9;branch=z9hG4bKa;rport=5064;received=10.0.0.8", None, 5064),
        ("SIP/2.0/UDP 10.0.0.9;branch=z9hG4bKa", None, 5060),
        ("SIP/2.0/TLS 10.0.0.9;branch=z9hG4bKa", ("tls", "10.0.0.9", 4000), 5061),
        ("SIP/2.0/UDP 10.0.0.9:5070;branch=z9hG4bKa;rport=99999", None, 5070),
    ],
)
def test_a_response_peer_is_a_plain_peer(
    via: str, source: tuple[str, str, int] | None, expected: int
) -> None:
    # Built without the NamedTuple's constructor, it is the value the constructor builds.
    transport, host, port = source or ("udp", "10.0.0.7", 5999)
    peer = response_peer(parse_via(via), Peer(transport, host, port))
    assert type(peer) is Peer
    assert peer.port == expected
    assert peer == Peer(*peer[:3]) and peer.connection is None
    assert repr(peer) == repr(Peer(peer.transport, peer.host, peer.port))
