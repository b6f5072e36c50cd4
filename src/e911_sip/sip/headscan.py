"""The passes of the plain parse over the bytes of a message: cutting its header block into
lines, then confirming the lines' names against those of a message of the same shape and
reading the values of fixed form (Content-Length, CSeq, Call-ID, the start line, Max-Forwards, the
text of the top Via, whether From and To need the full name-addr check).

These are the Python definitions. The built package replaces them with the functions of
the extension module ``e911_sip.sip._headscan`` (``_headscan.c`` beside this file), which
have the same contract: compiled by mypyc, each string operation these make is a call of a
few hundred instructions, and a message makes about sixty of them; the native versions make
a memchr or a memcmp where these make a call. docs/decisions.md records what it gains. A
pure-Python install, or one where the extension cannot load, runs the definitions below
with the same results (tests/unit/sip/test_headscan.py holds the two equal on messages
drawn to sit at every edge of what they accept).
"""

from __future__ import annotations

import struct
import sys
from collections.abc import Callable
from itertools import accumulate
from typing import Final, Literal

from e911_sip.sip.numbers import short_uint as _short_uint

__all__ = [
    "METHODS",
    "NATIVE",
    "Plain",
    "Template",
    "UriParts",
    "ViaParts",
    "copy_lines",
    "copy_lines_python",
    "line_of",
    "line_of_python",
    "lines_of",
    "lines_of_python",
    "names_match_python",
    "pop_first",
    "pop_first_python",
    "read_plain",
    "read_plain_python",
    "split_head",
    "split_head_python",
    "tag_in_place",
    "uri_parts",
    "via_parts",
]

METHODS: Final = (
    "INVITE",
    "ACK",
    "BYE",
    "CANCEL",
    "OPTIONS",
    "REGISTER",
    "PRACK",
    "UPDATE",
    "INFO",
) + ("SUBSCRIBE", "NOTIFY", "REFER", "MESSAGE", "PUBLISH")
"""Methods the plain parse takes without the token check (all are tokens); any other goes to
the careful parse."""
_METHODS: Final = frozenset(METHODS)
_MAX_END: Final = 2**32 - 3
"""The longest header block whose offsets (its end plus a CRLF) fit in 32 bits."""

Template = tuple[list[str], list[str], list[int], int, list[int]]
"""The header names of a message shape, as the parser keeps them: each line's name as spelt
(colon included), the lines' keys, ``at`` (the index of the first header of each slot, -1
for none: Via, From, To, Call-ID, CSeq, Content-Length, Max-Forwards at 1 to 7), the number
of Content-Length headers, and ``cut`` (where that first header's value starts in its
line)."""

ViaParts = tuple[str, str, int | None, tuple[tuple[str, str | None], ...]]
UriParts = tuple[str, str | None, str, int | None, tuple[tuple[str, str | None], ...]]
"""A URI's scheme, user (None when absent), host (lower case), port (None when absent) and
parameters, as ``uri.Uri`` holds them."""
"""A Via's transport, host (lower case), port (None when absent) and parameters, as
``uri.Via`` holds them."""

Plain = tuple[
    list[str],
    bytes,
    bytes,
    tuple[int, str],
    str,
    str | None,
    str,
    bool,
    str,
    bool,
    int,
    str,
    int | str | None,
    str | Literal[False] | None,
]
"""What ``read_plain`` reads of a message: (keys (the template's own list: a message never
changes its keys in place, so every message of a shape shares them), body, wire, cseq,
Call-ID, the From value
when it must be checked as a name-addr else None, the To value, whether it must be,
the top Via's text, whether that is the first of the values as it stands, the status code
(0 for a request), the reason phrase or the Request-URI, Max-Forwards: its value, None when
there is none, the text when it is not one to three digits), and a request's To tag: None
when the value holds no "tag" in any case, the tag when it is written ``...<uri>;tag=x``
(``tag_in_place``), False for a response or any other spelling (the parser reads it)."""


def split_head_python(data: bytes) -> tuple[int, str, bytes] | None:
    """(index of the first CRLFCRLF, start line decoded as latin-1, where the header lines
    are) of a message; None when the block is not written plainly: no CRLFCRLF past the
    first byte, a CR or LF that is not part of a CRLF, no header line, an empty start line
    (a CRLF before it), or a block too long for the offsets.

    The third item holds, as unsigned 32-bit integers in the machine's order, the index in
    ``data`` where each header line starts and then where a line after the last would
    (the end of the block plus its CRLF): line ``i`` is ``data[at[i] : at[i + 1] - 2]``.
    One object for the whole block, where a string per line would be a dozen, which most
    messages (a relayed response) never need (``lines_of`` and ``line_of`` make them)."""
    whole = data.decode("latin-1")
    end = whole.find("\r\n\r\n")
    if end <= 0 or end > _MAX_END:
        return None
    lines = whole[:end].split("\r\n")
    # Every CR and every LF is part of one of the CRLFs just cut at: the lines joined are
    # searched with memchr, where count() would test every character.
    joined = "".join(lines)
    if len(lines) < 2 or "\r" in joined or "\n" in joined:
        return None
    first = lines.pop(0)
    if not first:
        return None
    starts = list(accumulate([len(line) + 2 for line in lines], initial=len(first) + 2))
    at = _pack(starts)
    global _last_split
    _last_split = (at, lines)
    return end, first, at


_last_split: tuple[bytes, list[str]] = (b"", [])
"""The offsets the last ``split_head_python`` made and the lines it cut: ``read_plain_python``
reads the same lines next, and need not cut them again (matched by the offsets' identity,
so a stale entry is never taken for another message's)."""


def _pack(starts: list[int]) -> bytes:
    return struct.pack(f"={len(starts)}I", *starts)


def _starts(at: bytes) -> tuple[int, ...]:
    return struct.unpack(f"={len(at) // 4}I", at)


def lines_of_python(data: bytes, at: bytes) -> list[str]:
    """The header lines of ``data`` where ``at`` (as ``split_head`` gives it) says they are,
    each decoded as latin-1."""
    # The lines of one block, each ended by the CRLF the next starts after, and none
    # holding a CR or LF of its own: one decode and one split.
    first = int.from_bytes(at[:4], sys.byteorder)
    after = int.from_bytes(at[-4:], sys.byteorder)
    return data[first : after - 2].decode("latin-1").split("\r\n")


def line_of_python(data: bytes, at: bytes, index: int) -> str:
    """Header line ``index`` of ``data``, where ``at`` says it is, decoded as latin-1."""
    start, stop = struct.unpack_from("=2I", at, 4 * index)
    return data[start : stop - 2].decode("latin-1")


def pop_first_python(
    wire: bytes, at: bytes, index: int, first: str, expected: str | None
) -> tuple[bytes, bytes] | None:
    """``wire`` and ``at`` less the first of the two values of header line ``index``, when
    that line is written as nearly every response brings its Vias back, ``Name: <first>,
    <other>``: nothing quoted, bracketed or folded, no space before the colon, one space
    after it, one comma, no whitespace at either end of ``other``, and ``other`` is
    ``expected`` unless that is None. The line is then written ``Name: <other>``, which is
    what ``Message.pop_first_value`` writes of it; None for any other line (the general
    path)."""
    starts = _starts(at)
    start = starts[index]
    line = wire[start : starts[index + 1] - 2].decode("latin-1")
    colon = line.find(":")
    if colon <= 0 or line[colon - 1] in " \t":
        return None
    head = colon + 2  # past "Name: "
    after = head + len(first)
    # Slices compared, not startswith(x, at): compiled, that is a generic call.
    if not (
        line[colon + 1 : head] == " "
        and line[head:after] == first
        and line[after : after + 2] == ", "
    ):
        return None
    other = line[after + 2 :]
    # What split_values would cut into exactly [first, other]: one comma, no quote or '<',
    # no fold, no whitespace at either end of the other value.
    if (
        not other
        or not first.strip()
        or "," in other
        or "," in first
        or '"' in line
        or "<" in line
        or "\n" in line
        or other.strip() != other
        or (expected is not None and other != expected)
    ):
        return None
    cut = len(first) + 2
    shifted = [s if i <= index else s - cut for i, s in enumerate(starts)]
    return wire[: start + head] + wire[start + after + 2 :], _pack(shifted)


def copy_lines_python(
    data: bytes,
    at: bytes,
    keys: list[str],
    wanted: frozenset[str],
    head: bytes,
    last: bytes,
    last_key: str,
) -> tuple[bytes, bytes, list[str]]:
    """A new message head: ``head`` (a start line and its CRLF), the header lines of ``data``
    (where ``at`` says they are) whose key in ``keys`` is in ``wanted``, in order, and
    ``last`` as the last line, then the blank line; with the offsets of its lines as
    ``split_head`` gives them, and their keys. What a response made from a request copies
    of it (RFC 3261 §8.2.6.2), written without making those lines into strings."""
    starts = _starts(at)
    if len(keys) != len(starts) - 1:
        raise ValueError("copy_lines() takes one key per line")
    parts = [head]
    offsets: list[int] = []
    taken: list[str] = []
    size = len(head)
    for i, key in enumerate(keys):
        if key in wanted:
            line = data[starts[i] : starts[i + 1]]  # the line and its CRLF
            offsets.append(size)
            parts.append(line)
            taken.append(key)
            size += len(line)
    offsets.append(size)
    offsets.append(size + len(last) + 2)
    parts.append(last + b"\r\n\r\n")
    taken.append(last_key)
    return b"".join(parts), _pack(offsets), taken


def names_match_python(lines: list[str], spellings: list[str]) -> bool:
    """True when the lists are as long as each other and each line starts with the
    spelling at its index."""
    if len(lines) != len(spellings):
        return False
    for i, line in enumerate(lines):
        if not line.startswith(spellings[i]):
            return False
    return True


def tag_in_place(value: str) -> str | None:
    """The tag of a name-addr value written ``...<uri>;tag=x[;...]`` with no quote (every To
    and From of a dialog, in practice), read in place; None for any other spelling, which
    takes the full parse of the name-addr."""
    if '"' not in value:
        lt = value.find("<")
        if lt >= 0:
            gt = value.find(">", lt)
            if gt > lt and value[lt + 1 : gt].strip():
                rest = value[gt + 1 :]
                if rest.startswith(";tag="):
                    end = rest.find(";", 5)
                    return (rest[5:] if end < 0 else rest[5:end]).strip()
    return None


def read_plain_python(
    data: bytes,
    end: int,
    first: str,
    at: bytes,
    template: Template,
    max_headers: int,
    datagram: bool,
) -> Plain | Literal[False] | None:
    """The values the plain parse reads from a message whose lines ``split_head`` found, when
    their names are those of ``template`` and each is written the plain way. False when the
    names are not the template's (the parser then makes the template of these lines); None
    when a value is not plain, or ``data`` is not bytes (a subclass included), and the
    careful parse decides."""
    if type(data) is not bytes:
        return None
    last_at, lines = _last_split
    if last_at is not at:
        lines = lines_of_python(data, at)
    spellings, keys, slot_at, lengths, cut = template
    count = len(lines)
    if not names_match_python(lines, spellings):
        return False
    if count > max_headers or lengths != 1:
        return None
    if slot_at[1] < 0 or slot_at[2] < 0 or slot_at[3] < 0 or slot_at[4] < 0 or slot_at[5] < 0:
        return None  # a mandatory header missing: the careful path names it
    value = lines[slot_at[6]][cut[6] :].strip()
    length = _short_uint(value) if len(value) <= 5 else -1
    if length < 0:
        return None
    body = data[end + 4 :]
    wire = data
    if length != len(body):
        if length > len(body):
            return None
        if datagram:
            body = body[:length]
            wire = data[: end + 4 + length]
    # "number SP METHOD" with a method we know: what the careful parse's expression
    # accepts, without running it (anything else, extra spaces included, goes to it).
    value = lines[slot_at[5]][cut[5] :].strip()
    space = value.find(" ")
    if space < 0:
        return None
    number = _short_uint(value[:space])  # at most nine digits: below 2**31
    cseq_method = value[space + 1 :]
    if cseq_method not in _METHODS or number < 0:
        return None
    call_id = lines[slot_at[4]][cut[4] :].strip()
    if not call_id:
        return None
    # From and To written "<uri>..." with no quotes pass the name-addr check; anything else
    # is left to it.
    value = lines[slot_at[2]][cut[2] :]
    lt = value.find("<")
    from_check = None
    if lt < 0 or '"' in value or value.find(">", lt) < 0:
        from_check = value.strip()
    value = lines[slot_at[3]][cut[3] :]
    lt = value.find("<")
    to_check = lt < 0 or '"' in value or value.find(">", lt) < 0
    to_value = value.strip()
    # The top Via is the text before the first comma when there is no quote or '<' before
    # it (that comma is where split_values would cut too).
    value = lines[slot_at[1]][cut[1] :]
    comma = value.find(",")
    via = (value if comma < 0 else value[:comma]).strip()
    via_plain = bool(via) and '"' not in via and "<" not in via
    if not via_plain:
        via = value.strip()
    mf: int | str | None = None
    to_tag: str | Literal[False] | None = False
    if first.startswith("SIP/2.0 "):
        space = first.find(" ", 8)
        code = first[8:] if space < 0 else first[8:space]
        text = "" if space < 0 else first[space + 1 :]
        status = _short_uint(code) if len(code) == 3 else -1
        if status < 100:  # not three digits, or a first digit of 0
            return None
    else:
        parts = first.split(" ")
        if len(parts) != 3:
            return None
        method, text, version = parts
        if method not in _METHODS or version != "SIP/2.0" or method != cseq_method or not text:
            return None
        status = 0
        # Every request's To tag is read (it tells an initial request from one in a dialog).
        if "tag" not in to_value.lower():
            to_tag = None
        else:
            tag = tag_in_place(to_value)
            to_tag = False if tag is None else tag
        if slot_at[7] >= 0:
            value = lines[slot_at[7]][cut[7] :].strip()
            read = _short_uint(value) if len(value) < 4 else -1
            mf = read if read >= 0 else value
    return (
        keys,
        body,
        wire,
        (number, cseq_method),
        call_id,
        from_check,
        to_value,
        to_check,
        via,
        via_plain,
        status,
        text,
        mf,
        to_tag,
    )


split_head: Callable[[bytes], tuple[int, str, bytes] | None] = split_head_python
read_plain: Callable[
    [bytes, int, str, bytes, Template, int, bool], Plain | Literal[False] | None
] = read_plain_python
lines_of: Callable[[bytes, bytes], list[str]] = lines_of_python
line_of: Callable[[bytes, bytes, int], str] = line_of_python
pop_first: Callable[[bytes, bytes, int, str, str | None], tuple[bytes, bytes] | None] = (
    pop_first_python
)
copy_lines: Callable[
    [bytes, bytes, list[str], frozenset[str], bytes, bytes, str], tuple[bytes, bytes, list[str]]
] = copy_lines_python
uri_parts: Callable[[str], UriParts | None] | None = None
"""The native reading of a sip or sips URI written the common way (what ``uri.read_uri``
reads of one that is all ASCII, with no whitespace and no IPv6 reference; None for any
other); None itself in the pure build, where uri reads every URI."""
via_parts: Callable[[str], ViaParts | None] | None = None
"""The native reading of a Via written the common way (``uri._via_parts`` for text that is
all ASCII, None for any other); None itself in the pure build, where uri reads every Via."""
NATIVE = False
"""Whether ``split_head``, ``read_plain``, ``lines_of``, ``line_of``, ``pop_first`` and
``copy_lines`` are the extension module's, and ``via_parts`` is set."""

try:
    from e911_sip.sip._headscan import (
        copy_lines,
        line_of,
        lines_of,
        pop_first,
        read_plain,
        split_head,
        uri_parts,
        via_parts,
    )

    NATIVE = True
except ImportError:  # a pure-Python install: the definitions above serve
    pass
