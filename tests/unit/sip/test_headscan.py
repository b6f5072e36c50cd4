"""The header block's scan: the extension module's functions give what the Python ones give,
on every input, and the Python ones say what the plain parse needs of a block."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from e911_sip import build
from e911_sip.sip import headscan
from e911_sip.sip.headscan import names_match_python, split_head_python

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
# Latin-1 and wider characters: a wider string never comes from a parse, but is compared
# right all the same.
names = st.text(alphabet="Via:ÿé€ ", max_size=6)


def test_the_build_uses_the_native_scan_when_it_is_built() -> None:
    # Compiled, the parse must not quietly fall back to the slower Python definitions.
    assert headscan.NATIVE == (native is not None)
    if os.environ.get("E911_SIP_EXPECT_BUILD") == "compiled":
        assert headscan.NATIVE
        assert "e911_sip.sip._headscan" in build.compiled_modules()


def test_split_head_cuts_the_block_at_its_crlfs() -> None:
    data = b"INVITE sip:911@x SIP/2.0\r\nVia: a\r\nTo: b\r\n\r\nbody\r\n\r\n"
    assert split_head_python(data) == (39, "INVITE sip:911@x SIP/2.0", ["Via: a", "To: b"])


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


@needs_native
@settings(max_examples=1000)
@given(start=st.sampled_from([b"", b"OPTIONS x SIP/2.0", b"SIP/2.0 200 OK"]), block=blocks)
def test_native_split_head_agrees_on_any_block(start: bytes, block: bytes) -> None:
    data = start + block
    assert native.split_head(data) == split_head_python(data)
    # Any object with the buffer protocol reads as its bytes.
    assert native.split_head(bytearray(data)) == split_head_python(data)


@needs_native
@settings(max_examples=400)
@given(
    st.lists(st.tuples(names.filter(bool), names), max_size=6),
    st.booleans(),
)
def test_native_names_match_agrees(pairs: list[tuple[str, str]], shorter: bool) -> None:
    lines = [line for line, _ in pairs]
    spellings = [spelt for _, spelt in pairs]
    if shorter and spellings:
        spellings.pop()
    assert native.names_match(lines, spellings) == names_match_python(lines, spellings)
    # A spelling that is the line's own start always matches.
    prefixes = [line[: len(line) // 2] for line in lines]
    assert native.names_match(lines, prefixes) is True


@needs_native
def test_native_functions_refuse_what_is_not_their_type() -> None:
    with pytest.raises(TypeError):
        native.split_head("text")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        native.names_match(("a",), ["a"])  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        native.names_match([b"a"], ["a"])  # type: ignore[list-item]
