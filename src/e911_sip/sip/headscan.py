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

from collections.abc import Callable
from typing import Final, Literal

from e911_sip.sip.numbers import short_uint as _short_uint

__all__ = [
    "METHODS",
    "NATIVE",
    "Plain",
    "Template",
    "ViaParts",
    "names_match_python",
    "read_plain",
    "read_plain_python",
    "split_head",
    "split_head_python",
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

Template = tuple[list[str], list[str], list[int], int, list[int]]
"""The header names of a message shape, as the parser keeps them: each line's name as spelt
(colon included), the lines' keys, ``at`` (the index of the first header of each slot, -1
for none: Via, From, To, Call-ID, CSeq, Content-Length, Max-Forwards at 1 to 7), the number
of Content-Length headers, and ``cut`` (where that first header's value starts in its
line)."""

ViaParts = tuple[str, str, int | None, tuple[tuple[str, str | None], ...]]
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
]
"""What ``read_plain`` reads of a message: (keys, body, wire, cseq, Call-ID, the From value
when it must be checked as a name-addr else None, the To value, whether it must be,
the top Via's text, whether that is the first of the values as it stands, the status code
(0 for a request), the reason phrase or the Request-URI, Max-Forwards: its value, None when
there is none, the text when it is not one to three digits)."""


def split_head_python(data: bytes) -> tuple[int, str, list[str]] | None:
    """(index of the first CRLFCRLF, start line, header lines) of a message, each line
    decoded as latin-1; None when the block is not written plainly: no CRLFCRLF past the
    first byte, a CR or LF that is not part of a CRLF, no header line, or an empty start
    line (a CRLF before it)."""
    whole = data.decode("latin-1")
    end = whole.find("\r\n\r\n")
    if end <= 0:
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
    return end, first, lines


def names_match_python(lines: list[str], spellings: list[str]) -> bool:
    """True when the lists are as long as each other and each line starts with the
    spelling at its index."""
    if len(lines) != len(spellings):
        return False
    for i, line in enumerate(lines):
        if not line.startswith(spellings[i]):
            return False
    return True


def read_plain_python(
    data: bytes,
    end: int,
    first: str,
    lines: list[str],
    template: Template,
    max_headers: int,
    datagram: bool,
) -> Plain | Literal[False] | None:
    """The values the plain parse reads from a message whose lines ``split_head`` cut, when
    their names are those of ``template`` and each is written the plain way. False when the
    names are not the template's (the parser then makes the template of these lines); None
    when a value is not plain, or ``data`` is not bytes (a subclass included), and the
    careful parse decides."""
    spellings, keys, at, lengths, cut = template
    count = len(lines)
    if type(data) is not bytes:
        return None
    if not names_match_python(lines, spellings):
        return False
    if count > max_headers or lengths != 1:
        return None
    if at[1] < 0 or at[2] < 0 or at[3] < 0 or at[4] < 0 or at[5] < 0:
        return None  # a mandatory header missing: the careful path names it
    value = lines[at[6]][cut[6] :].strip()
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
    value = lines[at[5]][cut[5] :].strip()
    space = value.find(" ")
    if space < 0:
        return None
    number = _short_uint(value[:space])  # at most nine digits: below 2**31
    cseq_method = value[space + 1 :]
    if cseq_method not in _METHODS or number < 0:
        return None
    call_id = lines[at[4]][cut[4] :].strip()
    if not call_id:
        return None
    # From and To written "<uri>..." with no quotes pass the name-addr check; anything else
    # is left to it.
    value = lines[at[2]][cut[2] :]
    lt = value.find("<")
    from_check = None
    if lt < 0 or '"' in value or value.find(">", lt) < 0:
        from_check = value.strip()
    value = lines[at[3]][cut[3] :]
    lt = value.find("<")
    to_check = lt < 0 or '"' in value or value.find(">", lt) < 0
    to_value = value.strip()
    # The top Via is the text before the first comma when there is no quote or '<' before
    # it (that comma is where split_values would cut too).
    value = lines[at[1]][cut[1] :]
    comma = value.find(",")
    via = (value if comma < 0 else value[:comma]).strip()
    via_plain = bool(via) and '"' not in via and "<" not in via
    if not via_plain:
        via = value.strip()
    mf: int | str | None = None
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
        if at[7] >= 0:
            value = lines[at[7]][cut[7] :].strip()
            read = _short_uint(value) if len(value) < 4 else -1
            mf = read if read >= 0 else value
    return (
        keys.copy(),
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
    )


split_head: Callable[[bytes], tuple[int, str, list[str]] | None] = split_head_python
read_plain: Callable[
    [bytes, int, str, list[str], Template, int, bool], Plain | Literal[False] | None
] = read_plain_python
via_parts: Callable[[str], ViaParts | None] | None = None
"""The native reading of a Via written the common way (``uri._via_parts`` for text that is
all ASCII, None for any other); None itself in the pure build, where uri reads every Via."""
NATIVE = False
"""Whether ``split_head`` and ``read_plain`` are the extension module's, and ``via_parts``
is set."""

try:
    from e911_sip.sip._headscan import read_plain, split_head, via_parts

    NATIVE = True
except ImportError:  # a pure-Python install: the definitions above serve
    pass
