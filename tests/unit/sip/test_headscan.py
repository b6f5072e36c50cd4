"""The header block's scan: the extension module's functions give what the Python ones give,
on every input, and the Python ones say what the plain parse needs of a block."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from e911_sip import build
from e911_sip.sip import headscan, message, uri
from e911_sip.sip.errors import RemoteSipError
from e911_sip.sip.headscan import (
    line_of_python,
    lines_of_python,
    names_match_python,
    pop_first_python,
    read_plain_python,
    split_head_python,
)

DATA = Path(__file__).resolve().parents[2] / "data"
CORPUS = [p.read_bytes() for p in sorted(DATA.glob("*/*.sip"))]

try:
    from e911_sip.sip import _headscan as native
except ImportError:  # the pure-Python build: there is nothing native to compare
    native = None  # type: ignore[assignment]

needs_native = pytest.mark.skipif(native is None, reason="the pure-Python build")

# Bytes that matter to the scan, in proportions that make CRLFs, bare CRs and LFs, blank
# lines and non-ASCII octets common.
PIECES = [b"\r\n", b"\r", b"\n", b"\r\n\r\n", b"Via: x", b":", b" ", b"a", b"\xe9", b"\x00"]
blocks = st.lists(st.sampled_from(PIECES), max_size=24).map(b"".join)


def test_the_build_uses_the_native_scan_when_it_is_built() -> None:
    # Compiled, the parse must not quietly fall back to the slower Python definitions.
    assert headscan.NATIVE == (native is not None)
    if os.environ.get("E911_SIP_EXPECT_BUILD") == "compiled":
        assert headscan.NATIVE
        assert "e911_sip.sip._headscan" in build.compiled_modules()


def _lines(data: bytes) -> tuple[int, str, bytes, list[str]]:
    """split_head_python's answer for a block that is plain, with the lines it found."""
    scanned = split_head_python(data)
    assert scanned is not None
    end, first, at = scanned
    return end, first, at, lines_of_python(data, at)


def test_split_head_cuts_the_block_at_its_crlfs() -> None:
    data = b"INVITE sip:911@x SIP/2.0\r\nVia: a\r\nTo: b\r\n\r\nbody\r\n\r\n"
    end, first, at, lines = _lines(data)
    assert (end, first, lines) == (39, "INVITE sip:911@x SIP/2.0", ["Via: a", "To: b"])
    # Where each line starts, then where one after the last would: 32-bit integers.
    assert memoryview(at).cast("I").tolist() == [26, 34, 41]
    assert [line_of_python(data, at, i) for i in range(2)] == lines


def _agree_on_lines(data: bytes) -> None:
    """The lines found in ``data`` read alike natively and in Python, whole or one by one."""
    scanned = split_head_python(data)
    if scanned is None:
        return
    at = scanned[2]
    lines = lines_of_python(data, at)
    assert native.lines_of(data, at) == lines
    assert [native.line_of(data, at, i) for i in range(len(lines))] == lines


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\r\n\r\n",  # nothing before the end of the block
        b"OPTIONS x SIP/2.0\r\n\r\n",  # no header line
        b"\r\nOPTIONS x SIP/2.0\r\nVia: a\r\n\r\n",  # a CRLF before the start line
        b"OPTIONS x SIP/2.0\r\nVia: a\nTo: b\r\n\r\n",  # a bare LF
        b"OPTIONS x SIP/2.0\r\nVia: a\rTo: b\r\n\r\n",  # a bare CR
        b"OPTIONS x SIP/2.0\r\nVia: a\r\r\n\r\n",  # a CR before the last CRLF
        b"OPTIONS x SIP/2.0\r\nVia: a\r\n",  # no end of the block
    ],
)
def test_split_head_leaves_what_is_not_plain(data: bytes) -> None:
    assert split_head_python(data) is None
    if native is not None:
        assert native.split_head(data) is None


def test_names_match_needs_every_name_and_equal_lengths() -> None:
    assert names_match_python(["Via: a", "To: b"], ["Via:", "To:"])
    assert not names_match_python(["Via: a", "To: b"], ["Via:", "From:"])
    assert not names_match_python(["Via: a"], ["Via:", "To:"])
    assert not names_match_python(["Vi"], ["Via:"])
    assert names_match_python([], [])


@needs_native
@pytest.mark.parametrize("data", CORPUS, ids=range(len(CORPUS)))
def test_native_split_head_agrees_on_the_corpus(data: bytes) -> None:
    assert native.split_head(data) == split_head_python(data)
    _agree_on_lines(data)


@needs_native
@settings(max_examples=1000)
@given(start=st.sampled_from([b"", b"OPTIONS x SIP/2.0", b"SIP/2.0 200 OK"]), block=blocks)
def test_native_split_head_agrees_on_any_block(start: bytes, block: bytes) -> None:
    data = start + block
    assert native.split_head(data) == split_head_python(data)
    # Any object with the buffer protocol reads as its bytes.
    assert native.split_head(bytearray(data)) == split_head_python(data)
    _agree_on_lines(data)


@needs_native
def test_native_functions_refuse_what_is_not_their_type() -> None:
    with pytest.raises(TypeError):
        native.split_head("text")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        native.via_parts(b"SIP/2.0/UDP h")  # type: ignore[arg-type]
    data = PLAIN[1]
    end, first, at_lines, lines = _lines(data)
    _learn_names()
    template = message._new_template(lines)
    assert template is not None
    spellings, keys, at, lengths, cut = template
    for bad in [
        (tuple(spellings), keys, at, lengths, cut),  # names not in a list
        ([s.encode() for s in spellings], keys, at, lengths, cut),  # names as bytes
        (["V€a:"] + spellings[1:], keys, at, lengths, cut),  # wider than latin-1
        (spellings, keys, at, lengths),  # a tuple of four
        (spellings, keys, at[:3], lengths, cut),  # an at of three slots
        (spellings, keys, at, "1", cut),  # a count that is not a number
        (spellings, keys, [len(lines)] * 8, lengths, cut),  # a line that is not there
        (spellings, keys, at, lengths, [-1] * 8),  # a cut before the line
    ]:
        with pytest.raises((TypeError, ValueError)):
            native.read_plain(data, end, first, at_lines, bad, 256, True)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        native.read_plain(data, len(data), first, at_lines, template, 256, True)
    with pytest.raises(TypeError):
        native.read_plain(data, end, first, lines, template, 256, True)  # type: ignore[arg-type]
    # Offsets that are not of lines inside the header block: refused, never read.
    count = len(at_lines) // 4
    bad_offsets = [
        b"",  # no line
        at_lines[:4],  # a start with no end
        at_lines[:-1],  # not whole integers
        at_lines[4:8] + at_lines[:4],  # going back
        at_lines[:4] * 2,  # an empty line without its CRLF
        at_lines[:-4] + (end + 3).to_bytes(4, sys.byteorder),  # past the block
        b"\xff" * 4 * count,  # far past the data
    ]
    for bad_at in bad_offsets:
        with pytest.raises(ValueError):
            native.read_plain(data, end, first, bad_at, template, 256, True)
    # Past the block, but inside the data: lines_of reads any line of the bytes.
    for bad_at in bad_offsets[:5] + bad_offsets[6:]:
        with pytest.raises(ValueError):
            native.lines_of(data, bad_at)
        with pytest.raises(ValueError):
            native.line_of(data, bad_at, 0)
        with pytest.raises(ValueError):
            native.pop_first(data, bad_at, 0, "x", None)
        with pytest.raises(ValueError):
            native.copy_lines(data, bad_at, [], frozenset(), b"", b"", "")
    with pytest.raises(TypeError):
        native.lines_of(bytearray(data), at_lines)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        native.lines_of(data, bytearray(at_lines))  # type: ignore[arg-type]
    for index in (-1, count - 1, 2**40):
        with pytest.raises((IndexError, OverflowError)):
            native.line_of(data, at_lines, index)
        with pytest.raises((IndexError, OverflowError)):
            native.pop_first(data, at_lines, index, "x", None)
    with pytest.raises(TypeError):
        native.pop_first(data, at_lines, 0, b"x", None)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        native.pop_first(data, at_lines, 0, "x", b"x")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        native.pop_first(data, at_lines, 0, "x")  # type: ignore[call-arg]
    keys = ["x"] * (count - 1)
    for bad_keys in (keys[1:], [*keys, "x"]):
        with pytest.raises(ValueError):
            native.copy_lines(data, at_lines, bad_keys, frozenset(), b"", b"", "")
    for args in (
        (tuple(keys), frozenset(), b"", b"", ""),
        (keys, ["x"], b"", b"", ""),
        (keys, _OwnContains(), b"", b"", ""),
        (keys, frozenset(), "", b"", ""),
        (keys, frozenset(), b"", bytearray(), ""),
        (keys, frozenset(), b"", b"", b""),
    ):
        with pytest.raises(TypeError):
            native.copy_lines(data, at_lines, *args)  # type: ignore[arg-type]
    # Bytes of another type are not read: the careful parse takes them.
    assert native.read_plain(bytearray(data), end, first, at_lines, template, 256, True) is None  # type: ignore[arg-type]


class _OwnContains(frozenset[str]):
    """A set whose membership is its own: what copy_lines_python asks it, the C could not."""

    __slots__ = ()

    def __contains__(self, key: object) -> bool:
        return True


# Messages as the edge meets them, and the corpus: the values read_plain reads, each
# mutated below with the characters its checks turn on.
PLAIN = [
    b"INVITE sip:911@10.0.0.1:5070 SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP 10.0.0.2:5060;branch=z9hG4bK-1, SIP/2.0/UDP 10.0.0.3;branch=z9hG4bK-2\r\n"
    b"Max-Forwards: 70\r\n"
    b'From: "Front Desk" <sip:3215551234@10.0.0.2>;tag=a1\r\n'
    b"To: <sip:911@10.0.0.1>\r\n"
    b"Call-ID: c1@10.0.0.2\r\n"
    b"CSeq: 1 INVITE\r\n"
    b"P-Asserted-Identity: <sip:+13215551234@10.0.0.2>\r\n"
    b"Content-Length: 4\r\n\r\nv=0\n",
    b"SIP/2.0 180 Ringing\r\n"
    b"Via: SIP/2.0/UDP 10.0.0.1:5070;branch=z9hG4bKe1\r\n"
    b"From: <sip:3215551234@10.0.0.2>;tag=a1\r\n"
    b"To: <sip:911@10.0.0.1>;tag=b2\r\n"
    b"Call-ID: c1@10.0.0.2\r\n"
    b"CSeq: 1 INVITE\r\n"
    b"Content-Length: 0\r\n\r\n",
    b"BYE sip:911@10.0.0.1 SIP/2.0\r\n"
    b"v: SIP/2.0/UDP 10.0.0.2;branch=z9hG4bK-3\r\n"
    b"f: <sip:3215551234@10.0.0.2>;tag=a1\r\n"
    b"t: sip:911@10.0.0.1;tag=b2\r\n"
    b"i: c1@10.0.0.2\r\n"
    b"CSeq: 2 BYE\r\n"
    b"l: 0\r\n\r\n",
]
EDITS = [" ", "\t", "\xa0", "\x85", "\x1c", '"', "<", ">", ",", "0", "9", "a", ";tag=", "SIP/2.0"]


def _read_both(data: bytes, max_headers: int, datagram: bool) -> object:
    """read_plain's answer, native and Python held equal, for ``data`` read against the
    template of its own names."""
    scanned = split_head_python(data)
    if scanned is None:
        return None
    end, first, at = scanned
    template = message._new_template(lines_of_python(data, at))
    if template is None:
        return None
    python = read_plain_python(data, end, first, at, template, max_headers, datagram)
    if native is not None:
        assert native.read_plain(data, end, first, at, template, max_headers, datagram) == (python)
    return python


def _learn_names() -> None:
    # The spellings of these messages' names, as the parser learns them when it meets them.
    for data in PLAIN + CORPUS:
        try:
            message.parse(data)
        except RemoteSipError:
            pass


@pytest.mark.parametrize("data", PLAIN, ids=range(len(PLAIN)))
def test_read_plain_reads_what_the_parse_keeps(data: bytes) -> None:
    _learn_names()
    plain = _read_both(data, 256, True)
    assert plain is not None
    parsed = message.parse(data)
    keys, body, wire, cseq, call_id, _, _, _, _, _, status, text, _, _ = plain
    assert (keys, body, wire, cseq, call_id) == (
        parsed._keys,
        parsed.body,
        data,
        parsed.cseq,
        parsed.call_id,
    )
    if isinstance(parsed, message.Response):
        assert (status, text) == (parsed.status, parsed.reason)
    else:
        assert (status, text) == (0, parsed.uri)
    assert _read_both(data, 3, True) is None  # over max_headers


@settings(max_examples=600)
@given(
    st.sampled_from(PLAIN + CORPUS),
    st.lists(st.tuples(st.integers(0, 400), st.sampled_from(EDITS), st.integers(0, 3))),
    st.integers(0, 12),
    st.booleans(),
)
def test_read_plain_native_and_python_agree_on_mutated_messages(
    data: bytes, edits: list[tuple[int, str, int]], max_headers: int, datagram: bool
) -> None:
    _learn_names()
    text = data.decode("latin-1")
    for at, insert, cut in edits:
        at = at % (len(text) + 1)
        text = text[:at] + insert + text[at + cut :]
    mutated = text.encode("latin-1")
    _read_both(mutated, 256, datagram)
    _read_both(mutated, max_headers, not datagram)


pads = st.sampled_from(["", " ", "\t", "  ", "\xa0", "\x85", "\x1c", "\x0b"])


def _value(*cores: str) -> st.SearchStrategy[str]:
    # The first core, the plain one, half the time.
    core = st.one_of(st.just(cores[0]), st.sampled_from(cores))
    return st.tuples(pads, core, pads).map("".join)


@st.composite
def messages(draw: st.DrawFn) -> bytes:
    """A message whose every value read_plain reads is drawn from its edge cases."""
    # Mostly valid, so that most examples reach every check.
    method = draw(st.sampled_from(["INVITE", "ACK", "BYE", "INVITE", "ACK", "BYE", "FOO", ""]))
    start = draw(
        st.sampled_from(
            [
                f"{method} sip:911@h SIP/2.0",
                "SIP/2.0 200 OK",
                f"{method} sip:911@h SIP/2.0",
                f"{method} sip:911@h SIP/2.0 ",
                f"{method}  sip:911@h SIP/2.0",
                f"{method} sip:911@h SIP/2.1",
                f"{method}  SIP/2.0",
                "SIP/2.0 200 OK",
                "SIP/2.0 180",
                "SIP/2.0 099 Low",
                "SIP/2.0 1x0 Bad",
                "SIP/2.0 4000 Long",
                "SIP/2.0  200 Two spaces",
            ]
        )
    )
    body = draw(st.sampled_from(["", "v=0\n", "v=0\r\nmore"]))
    headers = [
        (
            "Via",
            _value(
                "SIP/2.0/UDP h;branch=z9hG4bK1",
                "SIP/2.0/UDP h, SIP/2.0/TCP g",
                "",
                ",x",
                '"q", SIP/2.0/UDP h',
                "<x>",
                " , ",
            ),
        ),
        ("Max-Forwards", _value("70", "0", "255", "1000", "7a", "", "007", "0070")),
        (
            "From",
            _value("<sip:a@h>;tag=1", "sip:a@h;tag=1", '"A" <sip:a@h>', "<sip:a@h", "x>y<", ""),
        ),
        ("To", _value("<sip:911@h>", "sip:911@h", "<sip:911@h>;tag=2", '"B" <sip:b@h>', "<")),
        ("Call-ID", _value("c1@h", "", "c 1")),
        (
            "CSeq",
            _value(
                f"1 {method}",
                f"1  {method}",
                "1 INVITE",
                "x INVITE",
                "1234567890 BYE",
                "1",
                f"1 {method} x",
                f"0 {method}",
            ),
        ),
        (
            "Content-Length",
            _value(str(len(body)), "0", "99999", "123456", "000000", "00001", "", "1"),
        ),
    ]
    lines = [start]
    for name, strategy in headers:
        for _ in range(draw(st.sampled_from([1] * 12 + [0, 2]))):
            lines.append(f"{name}:{draw(strategy)}")
    order = draw(st.permutations(lines[1:]))
    return ("\r\n".join([lines[0], *order]) + "\r\n\r\n" + body).encode("latin-1")


@settings(max_examples=1500)
@given(messages(), st.booleans())
def test_read_plain_native_and_python_agree_on_every_edge_of_a_value(
    data: bytes, datagram: bool
) -> None:
    _learn_names()
    _read_both(data, 256, datagram)


via_texts = st.lists(
    st.sampled_from(
        ["SIP/2.0/UDP", "SIP/2.0/TLS-SCTP", "SIP/2.0/udp", "SIP/2.0/WSS", " ", "h", "Host.EX"]
        + ["10.0.0.1", ":", "5060", "065535", "0000000000080", "99999", "00000", ";", "branch"]
        + ["=", "z9hG4bK-1", "RPort", "[", "]", "\t", "\x1c", "\xa0", "é", "==", ";;", ","]
    ),
    max_size=10,
).map("".join)


@settings(max_examples=1500)
@given(st.one_of(via_texts, st.text(max_size=20)))
def test_a_via_is_read_by_the_native_short_cut_as_by_the_python_one(text: str) -> None:
    uri._VIA_BASES.clear()
    python = uri._via_parts(text)
    if native is not None:
        parts = native.via_parts(text)
        assert parts is None or parts == python
        if text.isascii():
            assert parts == python  # only non-ASCII text is left to Python
    if python is not None:
        # The short cut reads what the full expression reads.
        assert uri.new_via(*python, text) == uri._parse_via_fully(text)


def test_a_via_read_natively_is_the_parse_s() -> None:
    text = "SIP/2.0/UDP Edge.Example:05060;branch=z9hG4bK-1;RPort;received=10.0.0.1"
    assert uri._parse_via(text) == uri._parse_via_fully(text)
    if native is not None:
        assert native.via_parts(text) == (
            "UDP",
            "edge.example",
            5060,
            (("branch", "z9hG4bK-1"), ("rport", None), ("received", "10.0.0.1")),
        )


@pytest.mark.parametrize("data", PLAIN, ids=range(len(PLAIN)))
@settings(max_examples=200)
@given(index=st.integers(0, 20), spelt=st.text(alphabet="Via:é ", max_size=6))
def test_names_other_than_the_template_s_are_told_apart_from_values_not_plain(
    data: bytes, index: int, spelt: str
) -> None:
    # False (names not of this template: the parser makes another), not None (a value for
    # the careful parse), and the same answer natively.
    _learn_names()
    end, first, at, lines = _lines(data)
    template = message._new_template(lines)
    assert template is not None
    spellings = list(template[0])
    i = index % len(spellings)
    spellings[i] = spelt
    changed = (spellings, *template[1:])
    python = read_plain_python(data, end, first, at, changed, 256, True)
    assert (python is False) == (not lines[i].startswith(spelt))
    if native is not None:
        assert native.read_plain(data, end, first, at, changed, 256, True) == python


def test_a_message_of_a_known_shape_with_other_names_makes_its_own_template() -> None:
    _learn_names()
    message._TEMPLATES.clear()
    first = message.parse(PLAIN[1])
    assert len(message._TEMPLATES) == 1
    # The same shape (a response of as many lines) with its To and From swapped.
    lines = PLAIN[1].split(b"\r\n")
    lines[2], lines[3] = lines[3], lines[2]
    swapped = message.parse(b"\r\n".join(lines))
    assert (swapped.get("from"), swapped.get("to")) == (first.get("from"), first.get("to"))
    ((spellings, *_),) = message._TEMPLATES.values()
    assert spellings[1:3] == ["To:", "From:"]


@needs_native
@pytest.mark.parametrize("method", headscan.METHODS)
def test_every_method_the_python_reading_takes_the_native_one_takes(method: str) -> None:
    # The C module spells the methods and the Via protocols out again: the lists must agree.
    data = (
        f"{method} sip:911@h SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\n"
        f"From: <sip:a@h>;tag=1\r\nTo: <sip:b@h>\r\nCall-ID: c\r\nCSeq: 1 {method}\r\n"
        "Content-Length: 0\r\n\r\n"
    ).encode()
    _learn_names()
    plain = _read_both(data, 256, True)
    assert isinstance(plain, tuple)
    assert plain[3] == (1, method)
    assert _read_both(data.replace(method.encode(), b"FOO"), 256, True) is None


@needs_native
@pytest.mark.parametrize("protocol", sorted(uri._VIA_PROTOCOLS))
def test_every_via_protocol_the_python_short_cut_reads_the_native_one_reads(
    protocol: str,
) -> None:
    text = f"{protocol} h:5060;branch=z9hG4bK1"
    assert native.via_parts(text) == uri._via_parts(text) is not None
    assert native.via_parts(text.replace(protocol, protocol + "X")) is None


# The Via lines a response brings back, and values cut from them: pop_first's cases.
VIA_VALUES = [
    "SIP/2.0/UDP 10.0.0.1:5070;branch=z9hG4bKours;rport",
    "SIP/2.0/UDP up;branch=z9hG4bKu",
]
VIA_PIECES = [*VIA_VALUES, ", ", ",", " ", "\t", '"', "<", "\xa0", "\x85", "é", "\n", ""]


def _response(via_line: str) -> bytes:
    return (
        f"SIP/2.0 200 OK\r\n{via_line}\r\nFrom: <sip:a@h>;tag=1\r\nTo: <sip:b@h>;tag=2\r\n"
        "Call-ID: c\r\nCSeq: 1 INVITE\r\nContent-Length: 1\r\n\r\nx"
    ).encode("latin-1")


def test_pop_first_cuts_the_first_value_and_moves_the_lines_after_it() -> None:
    ours, upstream = VIA_VALUES
    data = _response(f"Via: {ours}, {upstream}")
    end, first, at, lines = _lines(data)
    popped = pop_first_python(data, at, 0, ours, None)
    assert popped is not None
    assert pop_first_python(data, at, 0, ours, upstream) == popped
    assert pop_first_python(data, at, 0, ours, upstream + ";x") is None
    assert pop_first_python(data, at, 0, ours, upstream[:-1]) is None
    wire, moved = popped
    assert wire == _response(f"Via: {upstream}")
    assert lines_of_python(wire, moved) == [f"Via: {upstream}", *lines[1:]]
    assert split_head_python(wire) == (end - len(ours) - 2, first, moved)
    # A line that does not start with that value, or holds one value: not cut here.
    assert pop_first_python(data, at, 0, upstream, None) is None
    assert pop_first_python(data, at, 1, ours, None) is None


@settings(max_examples=1500)
@given(
    name=st.sampled_from(["Via: ", "Via:", "Via : ", "v: ", "Via:  ", "Via:\t"]),
    pieces=st.lists(st.sampled_from(VIA_PIECES), min_size=1, max_size=5),
    first=st.sampled_from([*VIA_VALUES, " " + VIA_VALUES[0], VIA_VALUES[0] + " ", "é", ""]),
    index=st.integers(0, 5),
)
def test_pop_first_native_and_python_agree_on_any_via_line(
    name: str, pieces: list[str], first: str, index: int
) -> None:
    data = _response(name + "".join(pieces))
    scanned = split_head_python(data)
    if scanned is None:
        return  # a bare LF drawn: not a block the parse would cut
    at = scanned[2]
    python = pop_first_python(data, at, index, first, None)
    other: str | None = None
    if python is not None:
        # What the general path writes: that line as "Name: <the other value>".
        line = lines_of_python(data, at)[index]
        rest = uri.split_values(message._value_of(line))
        assert rest[0] == first and len(rest) == 2
        assert lines_of_python(*python)[index] == line[: line.find(":")] + ": " + rest[1]
        other = rest[1]
    # Checked against the value left: cut only when it is that one.
    for expected in (None, other, *VIA_VALUES, " " + VIA_VALUES[1], "é", ""):
        checked = pop_first_python(data, at, index, first, expected)
        assert checked == (python if expected is None or expected == other else None)
        if native is not None:
            assert native.pop_first(data, at, index, first, expected) == checked
            assert native.pop_first(data, at, index, first + "€", expected) is None


@settings(max_examples=1000)
@given(
    st.tuples(
        pads,
        st.sampled_from(
            ["<sip:b@h>", "sip:b@h", '"B" <sip:b@h>', "< >", "<sip:b@h", "B <sip:b@h>"]
        ),
        st.sampled_from(
            ["", ";tag=", ";tag=x", ";TAG=x", ";tag= x ;a", ";x=tag", ">", ";tag=x;tag=y"]
        ),
        pads,
    ).map("".join),
    st.booleans(),
)
def test_the_to_tag_read_with_the_values_is_the_property_s(value: str, response: bool) -> None:
    _learn_names()
    start = "SIP/2.0 200 OK" if response else "BYE sip:b@h SIP/2.0"
    data = (
        f"{start}\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\nFrom: <sip:a@h>;tag=1\r\n"
        f"To: {value}\r\nCall-ID: c\r\nCSeq: 2 BYE\r\nContent-Length: 0\r\n\r\n"
    ).encode("latin-1")
    plain = _read_both(data, 256, True)
    if not isinstance(plain, tuple):
        return
    tag = plain[13]
    if response:
        assert tag is False  # a response's is read when asked for
    elif tag is not False:
        assert tag == message._to_tag_of(plain[6])
    try:
        parsed = message.parse(data)
        expected = message._to_tag_of(plain[6])
    except RemoteSipError:
        return  # a To the parse refuses: nothing to read a tag from
    assert parsed.to_tag == expected


# -- uri_parts: a caller's sip URI read natively ---------------------------------------------

URI_TEXTS = st.tuples(
    # The common spelling half the time for each part, so that many texts are read natively.
    st.one_of(
        st.just("sip:"),
        st.sampled_from(["SIP:", "sips:", "sIpS:", "tel:", "urn:", "", "si:", "sipx:"]),
    ),
    st.sampled_from(["", "alice@", "a:pw@", "+13215551234@", ":pw@", "é@", "a@b@", "a;x=1@"]),
    st.sampled_from(["h", "EXAMPLE.com", "10.0.0.1", "[::1]", "", "h]", "H-1.Example"]),
    st.sampled_from(["", ":5060", ":", ":65535", ":65536", ":0005060", ":00000000000080", ":x"]),
    st.sampled_from(["", ";transport=TCP", ";lr", ";", ";a=b;c", ";A=B;;", ";x=é"]),
    st.sampled_from(["", "?x=y", "?", "?a;b=c"]),
    st.one_of(st.just(""), st.sampled_from([" ", "\t", "\x0b", "\x1c"])),
    st.integers(0, 60),
).map(lambda p: _with_space("".join(p[:6]), p[6], p[7]))


def _with_space(text: str, space: str, at: int) -> str:
    at %= len(text) + 1
    return text[:at] + space + text[at:]


@needs_native
@settings(max_examples=2000)
@given(URI_TEXTS)
def test_uri_parts_reads_what_the_python_reading_reads(text: str) -> None:
    parts = native.uri_parts(text)
    try:
        expected = uri._read_uri(text)
    except RemoteSipError:
        assert parts is None  # refused: the Python reading names why
        return
    if parts is not None:
        assert (*parts, text) == tuple(expected)
    assert uri.read_uri(text) == expected


@needs_native
def test_uri_parts_reads_a_caller_written_the_common_way() -> None:
    assert native.uri_parts("sip:+13215551234@Edge.example:5060;user=phone") == (
        "sip",
        "+13215551234",
        "edge.example",
        5060,
        (("user", "phone"),),
    )
    assert native.uri_parts("tel:+13215551234") is None
    with pytest.raises(TypeError):
        native.uri_parts(b"sip:a@h")  # type: ignore[arg-type]


COPIED = frozenset({"via", "from", "to", "call-id", "cseq"})


def _keys_of(lines: list[str]) -> list[str]:
    return [line.partition(":")[0].strip().lower() for line in lines]


@settings(max_examples=500)
@given(
    data=st.sampled_from([*PLAIN, *CORPUS]),
    wanted=st.sampled_from([COPIED, frozenset(), frozenset({"via"}), frozenset({"x", "cseq"})]),
    head=st.sampled_from([b"SIP/2.0 100 Trying\r\n", b"", b"\xe9\r\n"]),
    last=st.sampled_from([b"Content-Length: 0", b"", b"X: \xe9"]),
)
def test_copy_lines_makes_a_head_of_the_lines_wanted(
    data: bytes, wanted: frozenset[str], head: bytes, last: bytes
) -> None:
    scanned = split_head_python(data)
    if scanned is None:
        return
    at = scanned[2]
    lines = lines_of_python(data, at)
    keys = _keys_of(lines)
    wire, moved, taken = headscan.copy_lines_python(data, at, keys, wanted, head, last, "k")
    picked = [line for line, key in zip(lines, keys, strict=True) if key in wanted]
    assert wire == head + b"".join(f"{line}\r\n".encode("latin-1") for line in picked) + (
        last + b"\r\n\r\n"
    )
    assert lines_of_python(wire, moved) == [*picked, last.decode("latin-1")]
    assert taken == [key for key in keys if key in wanted] + ["k"]
    if head and last:
        assert split_head_python(wire) == (len(wire) - 4, head[:-2].decode("latin-1"), moved)
    if native is not None:
        assert native.copy_lines(data, at, keys, wanted, head, last, "k") == (wire, moved, taken)


@needs_native
def test_copy_lines_reads_the_keys_again_after_looking_them_up() -> None:
    # A key whose comparison changes the list: refused, never read past its end.
    data = PLAIN[0]
    scanned = split_head_python(data)
    assert scanned is not None
    at = scanned[2]
    keys = _keys_of(lines_of_python(data, at))

    class Shrinking(str):
        __slots__ = ()

        def __hash__(self) -> int:
            return hash("via")

        def __eq__(self, other: object) -> bool:
            keys.clear()
            return str.__eq__(self, other)

    keys[0] = Shrinking("via")
    with pytest.raises(ValueError):
        native.copy_lines(data, at, keys, COPIED, b"", b"", "k")
