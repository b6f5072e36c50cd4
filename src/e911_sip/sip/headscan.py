"""The passes of the plain parse that touch every byte of a header block: cutting it into
lines, and confirming the lines' names against those of a message of the same shape.

These are the Python definitions. The built package replaces them with the functions of
the extension module ``e911_sip.sip._headscan`` (``_headscan.c`` beside this file), which
have the same contract: compiled by mypyc, each string operation these make is a call of a
few hundred instructions, and a message makes about thirty of them; the native versions
make a memchr or a memcmp per line. docs/decisions.md records what it gains. A pure-Python
install, or one where the extension cannot load, runs the definitions below with the same
results (tests/unit/sip/test_headscan.py holds the two equal on arbitrary input).
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["NATIVE", "names_match", "names_match_python", "split_head", "split_head_python"]


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


split_head: Callable[[bytes], tuple[int, str, list[str]] | None] = split_head_python
names_match: Callable[[list[str], list[str]], bool] = names_match_python
NATIVE = False
"""Whether ``split_head`` and ``names_match`` are the extension module's."""

try:
    from e911_sip.sip._headscan import names_match, split_head

    NATIVE = True
except ImportError:  # a pure-Python install: the definitions above serve
    pass
