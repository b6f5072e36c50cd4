"""SIP messages as values: parse, inspect, change a header, serialize.

Written here rather than taken from a library (see docs/decisions.md): a proxy must forward
every header it did not change byte-for-byte, in its order, and must do so thousands of times
a second. The libraries on PyPI build an object per header and per parameter and write the
message out again from those objects; that both costs most of a relay's CPU and risks
changing bytes nobody meant to change.

What a parse does, and what it leaves:

- Eagerly, for every message: the start line, where each header line starts and its name
  (the lookup key, compact forms expanded), and the checks a decision depends on or that
  decide how a broken request is answered: every line ended by CRLF, Content-Length, the
  mandatory headers, CSeq (and its method against the request's), Max-Forwards, the
  Request-URI, From and To readable as name-addrs, a non-empty Call-ID, the top Via. Those
  values are kept on the message, so reading them again costs an attribute load.
- Lazily, on first access and cached: the To and From tags, the whole Via list. Any other
  header's value is cut from its line only when asked for; nobody splits, decodes or
  rebuilds a line that no decision reads.

The header lines are read as latin-1, a one-to-one map of bytes to code points, so any
octet (UTF-8 display names included) survives the round trip. A plainly written message
keeps its bytes and where each line starts; a line becomes a string when a value is read
from it, and the whole list of them only when a change is made on lines (a relayed
response never needs it: its top Via is cut out of the bytes). Each header is kept as
the exact text it arrived as, folds and all. A parsed message keeps the bytes it came in:
written out unchanged it is those bytes; a changed copy writes every line it did not change
as the received text and only the changed ones anew.

Most messages are written plainly (no folds, header names already seen, one short
Content-Length, valid values), and ``_parse_plain`` takes those in a few C-level passes
(``headscan``'s, native in the built package). It decides nothing on its own: anything it
cannot vouch for goes to ``_parse_careful``, which makes every check in the order that
decides the status of the reply, so the two agree on every message
(tests/unit/sip/test_lazy.py compares them on mutated input).

Messages are immutable. Every change returns a new message that shares the untouched headers
and keeps what was read from them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Final, Generic, NamedTuple, Self, TypeVar, cast, final

from e911_sip.sip import headscan
from e911_sip.sip.errors import (
    MalformedMessage,
    MessageTooLarge,
    RemoteSipError,
    VersionNotSupported,
)
from e911_sip.sip.headscan import Plain, Template
from e911_sip.sip.numbers import (
    MAX_CONTENT_LENGTH,
    MAX_CSEQ,
    bounded_uint,
    is_digits,
    wire_uint,
)
from e911_sip.sip.uri import (
    NameAddr,
    Uri,
    Via,
    cached_uri,
    param_of,
    parse_name_addr,
    parse_uri,
    parse_via,
    split_values,
)

# The scan's functions as statics: compiled, a name imported from headscan (which binds the
# native ones over its own when they load) is a lookup in this module's globals at each call.
_COPY_LINES: Final = headscan.copy_lines
_LINE_OF: Final = headscan.line_of
_LINES_OF: Final = headscan.lines_of
_POP_FIRST: Final = headscan.pop_first
_READ_PLAIN: Final = headscan.read_plain
_SPLIT_HEAD: Final = headscan.split_head
_TAG_IN_PLACE: Final = headscan.tag_in_place

SIP_VERSION: Final = "SIP/2.0"
DEFAULT_MAX_SIZE = 65535
DEFAULT_MAX_HEADERS = 256
MAX_FORWARDS_READ: Final = 2**32 - 1
"""The largest Max-Forwards read; the proxy lowers anything above 255 to 254 anyway."""

# RFC 3261 §7.3.3 and the registry of compact forms; "y" is Identity (RFC 8224).
COMPACT_FORMS: Final = {
    "a": "accept-contact",
    "b": "referred-by",
    "c": "content-type",
    "d": "request-disposition",
    "e": "content-encoding",
    "f": "from",
    "i": "call-id",
    "j": "reject-contact",
    "k": "supported",
    "l": "content-length",
    "m": "contact",
    "o": "event",
    "r": "refer-to",
    "s": "subject",
    "t": "to",
    "u": "allow-events",
    "v": "via",
    "x": "session-expires",
    "y": "identity",
}

# Names we see on nearly every message: known, so their spelling needs no token check.
_KNOWN = {
    name: name
    for name in (
        "via",
        "from",
        "to",
        "call-id",
        "cseq",
        "contact",
        "max-forwards",
        "content-length",
        "content-type",
        "route",
        "record-route",
        "user-agent",
        "allow",
        "supported",
        "accept",
        "expires",
        "p-asserted-identity",
        "p-preferred-identity",
        "priority",
        "geolocation",
        "geolocation-routing",
        "identity",
        "privacy",
        "server",
        "require",
        "proxy-require",
        "session-expires",
        "min-se",
        "date",
        "subject",
        "organization",
        "reason",
        "warning",
        "content-disposition",
        "mime-version",
        "allow-events",
        "event",
        "authorization",
        "www-authenticate",
        "proxy-authenticate",
        "proxy-authorization",
        "rseq",
        "rack",
    )
}
_KNOWN.update(COMPACT_FORMS)

_TOKEN_RE = re.compile(r"[A-Za-z0-9.!%*_+`'~-]+")
_CSEQ_RE: Final = re.compile(r"(\d+)\s+([A-Za-z0-9.!%*_+`'~-]+)", re.ASCII)
_REQUIRED = ("via", "from", "to", "call-id", "cseq")


class Header(NamedTuple):
    """One header field as it stood on the wire."""

    key: str
    """Canonical lower-case long name (compact forms expanded): the lookup key."""
    raw: str
    """The field's exact text, from its name to the end of its last fold, without CRLF."""
    value: str
    """The value with folds joined by one space and outer whitespace removed."""


def make_header(name: str, value: str) -> Header:
    """A new header written as ``Name: value``."""
    return Header(_key_of(name), f"{name}: {value}", value)


_UNREAD: Final = "\x00unread"
"""Marks a cached tag not read yet (compared by identity: no parsed string is this object)."""


def _index(keys: list[str], key: str) -> int:
    """Where ``key`` first is in ``keys``, -1 when it is not there.

    A loop of native string compares: compiled, ``list.index``, ``list.count`` and ``in`` on
    a list are each a generic call, which costs more than the scan of a header list."""
    for i in range(len(keys)):
        if keys[i] == key:
            return i
    return -1


def _index_from(keys: list[str], key: str, start: int) -> int:
    """Where ``key`` is in ``keys`` at or after ``start``, -1 when it is not there."""
    for i in range(start, len(keys)):
        if keys[i] == key:
            return i
    return -1


def _must_index(keys: list[str], key: str) -> int:
    """``keys.index(key)``: where ``key`` first is, ValueError when it is not there."""
    i = _index(keys, key)
    if i < 0:
        raise ValueError(f"{key!r} is not in the list")
    return i


class Message:
    """Headers and body common to requests and responses. Immutable.

    Header fields are held as two parallel lists: the raw text of each field and its
    canonical key. Values are read from the raw text on demand, so a message that is only
    relayed never pays for unfolding or stripping headers nobody looks at. What is read is
    cached on the message (top Via, Via list, CSeq, Call-ID, To and From tags,
    Max-Forwards), and a changed copy keeps every cached value its change did not touch.
    A parsed message keeps the bytes it arrived as: serialised unchanged, it writes them.

    Those bytes (``_wire``, set by a parse, by ``to_bytes`` and by a splice of them) are the
    start line, each of ``_lines`` with its CRLF (then the Content-Length ``to_bytes`` adds
    when there is none), a blank line and the body: the parsers cut the lines at CRLFs and
    keep a fold inside its line, ``to_bytes`` and a splice write the lines themselves. Only
    the start line may be spelt otherwise than :meth:`start_line` writes it (a status line
    without a reason phrase, kept as it came).

    A plain parse, and the in-place cut of a response's top Via, leave ``_lines`` None and
    ``_at`` set: where each header line starts in ``_wire`` (``headscan.split_head``). The
    lines are then made from the bytes when a change is made on them (``_text``), and a
    value read cuts its one line (``_line``). ``_at`` is empty for a message whose bytes
    were written from its lines, or that has none yet.
    """

    __slots__ = (
        "_lines",
        "_keys",
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

    body: bytes

    def __init__(self, headers: Iterable[Header], body: bytes = b"") -> None:
        lines: list[str] = []
        self._keys: list[str] = []
        for h in headers:
            self._keys.append(h.key)
            lines.append(h.raw)
        self._lines: list[str] | None = lines
        self.body = body
        self._wire: bytes | None = None
        self._at = b""
        self._vias: list[Via] | None = None
        self._top_via: Via | None = None
        self._cseq: tuple[int, str] | None = None
        self._call_id: str | None = None
        self._to_tag: str | None = _UNREAD
        self._from_tag: str | None = _UNREAD
        self._mf: int | None = -1

    # -- reading -------------------------------------------------------------------------
    def _text(self) -> list[str]:
        """The header lines, made from the received bytes when first needed."""
        lines = self._lines
        if lines is None:
            lines = self._lines = self._text_made()
        return lines

    def _text_made(self) -> list[str]:
        """A new list of the header lines of a message whose lines are not made, made from
        its received bytes and not kept."""
        return _LINES_OF(cast(bytes, self._wire), self._at)

    def _line(self, index: int) -> str:
        """Header line ``index``, read from the received bytes when the lines are not made."""
        lines = self._lines
        if lines is not None:
            return lines[index]
        return _LINE_OF(cast(bytes, self._wire), self._at, index)

    @property
    def headers(self) -> tuple[Header, ...]:
        """Every header field in order."""
        lines = self._text()
        return tuple(Header(key, lines[i], _value_of(lines[i])) for i, key in enumerate(self._keys))

    def get(self, key: str) -> str | None:
        """The value of the first header named ``key`` (lower-case long name), or None."""
        # -1, not index() in a try: an absent header is common, and a caught exception
        # costs far more than the scan of a short list.
        i = _index(self._keys, key)
        return None if i < 0 else _value_of(self._line(i))

    def get_all(self, key: str) -> list[str]:
        """The values of every header named ``key``, one entry per header line."""
        keys = self._keys
        first = _index(keys, key)
        if first < 0:
            return []
        out = [_value_of(self._line(first))]
        i = _index_from(keys, key, first + 1)
        while i >= 0:
            out.append(_value_of(self._line(i)))
            i = _index_from(keys, key, i + 1)
        return out

    def values(self, key: str) -> list[str]:
        """Every comma-separated value of headers named ``key`` (Via, Route, ...), in order."""
        keys = self._keys
        first = _index(keys, key)
        if first >= 0 and _index_from(keys, key, first + 1) < 0:
            # One header line, as a response's Vias usually are: no list to gather.
            return split_values(_value_of(self._line(first)))
        out: list[str] = []
        for value in self.get_all(key):
            out.extend(split_values(value))
        return out

    def has(self, key: str) -> bool:
        """True when a header named ``key`` is present."""
        return _index(self._keys, key) >= 0

    def count(self, key: str) -> int:
        """How many header lines are named ``key``."""
        n = 0
        for k in self._keys:
            if k == key:
                n += 1
        return n

    @property
    def vias(self) -> list[Via]:
        """Parsed Via values, topmost first."""
        if self._vias is None:
            self._vias = [parse_via(v) for v in self.values("via")]
        return self._vias

    @property
    def top_via(self) -> Via:
        """The topmost Via value (only the first Via header line is read)."""
        top = self._top_via
        if top is not None:
            return top
        if self._vias is not None:
            if not self._vias:
                raise MalformedMessage("message has no Via")
            top = self._vias[0]
        else:
            top = _top_via_of(self.get("via"))
        self._top_via = top
        return top

    @property
    def top_via_branch(self) -> str | None:
        """The topmost Via's branch parameter (the transaction key, RFC 3261 §17.2.3)."""
        return self.top_via.branch

    @property
    def call_id(self) -> str:
        """The Call-ID."""
        value = self._call_id
        if value is None:
            value = self.get("call-id")
            if not value:
                raise MalformedMessage("message has no Call-ID")
            self._call_id = value
        return value

    @property
    def cseq(self) -> tuple[int, str]:
        """CSeq as (number, METHOD)."""
        if self._cseq is None:
            self._cseq = _parse_cseq(self.get("cseq"))
        return self._cseq

    @property
    def cseq_method(self) -> str:
        """The method of CSeq (the transaction's method for a response)."""
        return self.cseq[1]

    @property
    def max_forwards(self) -> int | None:
        """Max-Forwards, None when absent (RFC 3261 §20.22).

        Raises:
            MalformedMessage: not a number, or one of more than ten digits.
        """
        value = self._mf
        if value is None or value >= 0:
            return value
        value = _max_forwards_of(self.get("max-forwards"))
        self._mf = value
        return value

    def from_addr(self) -> NameAddr:
        """The From value, parsed."""
        return parse_name_addr(self.get("from") or "")

    @property
    def to_tag(self) -> str | None:
        """The To tag, None when absent."""
        tag = self._to_tag
        if tag is _UNREAD:
            value = self.get("to")
            tag = None if value is None else _to_tag_of(value)
            self._to_tag = tag
        return tag

    @property
    def from_tag(self) -> str | None:
        """The From tag, None when absent."""
        tag = self._from_tag
        if tag is _UNREAD:
            tag = self._from_tag = _tag_of(self.get("from") or "")
        return tag

    # -- changing (each returns a new message) -------------------------------------------
    def _copy(self, lines: list[str] | None, keys: list[str], changed: str = "*") -> Self:
        # What was read from headers the change did not touch stays valid in the copy: a
        # relayed request is copied several times and its Via need not be parsed each time.
        clone = self._bare_copy()
        clone._lines = lines
        clone._keys = keys
        clone.body = self.body
        clone._wire = None
        clone._at = b""
        if changed not in _CACHED:
            clone._vias = self._vias
            clone._top_via = self._top_via
            clone._cseq = self._cseq
            clone._call_id = self._call_id
            clone._to_tag = self._to_tag
            clone._from_tag = self._from_tag
            clone._mf = self._mf
        elif changed == "*":
            # Only a change made on the lines changes anything: never one of offsets.
            _set_unread(clone, cast(list[str], lines), keys, self.body)
        else:
            via = changed == "via"
            clone._vias = None if via else self._vias
            clone._top_via = None if via else self._top_via
            clone._cseq = None if changed == "cseq" else self._cseq
            clone._call_id = None if changed == "call-id" else self._call_id
            clone._to_tag = _UNREAD if changed == "to" else self._to_tag
            clone._from_tag = _UNREAD if changed == "from" else self._from_tag
            clone._mf = -1 if changed == "max-forwards" else self._mf
        return clone

    def _bare_copy(self) -> Self:
        """A new message of this one's class with only its start line set (``_copy`` sets
        the rest)."""
        raise NotImplementedError

    def prepend(self, name: str, value: str) -> Self:
        """A new header placed before every other header of that name (or first, if none)."""
        key = _key_of(name)
        keys = self._keys
        # -1, not index() in a try: the first Record-Route is prepended to a request with
        # none, and a caught exception costs far more than the scan.
        index = _index(keys, key)
        if index < 0:
            index = 0 if key == "via" else _after_vias(keys)
        lines = self._text().copy()
        keys = keys.copy()
        lines.insert(index, f"{name}: {value}")
        keys.insert(index, key)
        return self._copy(lines, keys, key)

    def append(self, name: str, value: str) -> Self:
        """A new header after the others; Content-Length stays last when it was last."""
        lines = self._text().copy()
        keys = self._keys.copy()
        index = len(keys) - 1 if keys and keys[-1] == "content-length" else len(keys)
        key = _key_of(name)
        lines.insert(index, f"{name}: {value}")
        keys.insert(index, key)
        return self._copy(lines, keys, key)

    def replace(self, name: str, value: str) -> Self:
        """Set header ``name`` to one value: the first one is rewritten in place, others go."""
        key = _key_of(name)
        if _index(self._keys, key) < 0:
            return self.append(name, value)
        lines: list[str] = []
        keys: list[str] = []
        placed = False
        for line, k in zip(self._text(), self._keys, strict=True):
            if k == key:
                if placed:
                    continue
                line = f"{name}: {value}"
                placed = True
            lines.append(line)
            keys.append(k)
        return self._copy(lines, keys, key)

    def replace_at(self, key: str, value: str) -> Self:
        """Rewrite the first ``key`` header's value, keeping the name as it was spelt."""
        index = _must_index(self._keys, key)
        lines = self._text().copy()
        name = lines[index].partition(":")[0].rstrip(" \t")
        lines[index] = f"{name}: {value}"
        return self._copy(lines, self._keys.copy(), key)

    def remove(self, key: str) -> Self:
        """Without any header named ``key``."""
        if _index(self._keys, key) < 0:
            return self
        pairs = [(ln, k) for ln, k in zip(self._text(), self._keys, strict=True) if k != key]
        return self._copy([ln for ln, _ in pairs], [k for _, k in pairs], key)

    def pop_first_value(self, key: str) -> Self:
        """Without the first comma-separated value of header ``key`` (top Via, top Route)."""
        index = _index(self._keys, key)
        if index < 0:
            return self
        lines = self._text().copy()
        keys = self._keys.copy()
        rest = split_values(_value_of(lines[index]))[1:]
        if rest:
            name = lines[index].partition(":")[0].rstrip(" \t")
            lines[index] = f"{name}: {', '.join(rest)}"
        else:
            del lines[index]
            del keys[index]
        clone = self._copy(lines, keys, key)
        if key == "via" and self._vias:
            # The Vias read before stay parsed: the popped one was the first of them.
            clone._vias = self._vias[1:]
        return clone

    def pop_top_via(self) -> Self:
        """Without the topmost Via value (RFC 3261 §16.7 step 3).

        A response relayed upstream is the one received less our Via: its bytes are the
        received ones with that one line cut or shortened, not the whole message written
        out again (``_splice``).
        """
        wire = self._wire
        top = self._top_via
        if wire is not None and top is not None:
            spliced = self._pop_top_via_in_place(wire, top.raw, None)
            if spliced is not None:
                return spliced
        clone = self.pop_first_value("via")
        if wire is not None and clone is not self:
            clone._wire = self._splice(wire, clone._text(), _must_index(self._keys, "via"))
        return clone

    def pop_top_via_before(self, expected: str) -> Self | None:
        """``pop_top_via()`` when the received bytes hold the Vias as
        ``Via: <top>, <expected>`` (the in-place cut of :meth:`pop_top_via`, with the value
        left checked to be ``expected``); None when that is not known without reading the
        Vias. A response to a branch of ours is checked and relayed with the one native cut:
        its second Via must be the one the request came with."""
        wire = self._wire
        top = self._top_via
        if wire is None or top is None:
            return None
        return self._pop_top_via_in_place(wire, top.raw, expected)

    def _pop_top_via_in_place(self, wire: bytes, top: str, expected: str | None) -> Self | None:
        """``pop_top_via`` of a received Via line written as nearly every response brings it
        back, ``Via: <top>, <one more value>`` with nothing quoted, bracketed or folded (and
        that value ``expected``, unless None): what the general path gives (that line written
        ``Via: <the other value>``), cut out of the received bytes where the parse found the
        line (``headscan.pop_first``), with no header line made. None for anything else (the
        general path)."""
        at = self._at
        if not at or self._start_end(wire) < 0:
            # Not the received bytes' lines (no offsets to cut at), or a start line the
            # general path writes otherwise ("SIP/2.0 200" gains its space).
            return None
        index = _index(self._keys, "via")
        if index < 0:
            return None
        cut = _POP_FIRST(wire, at, index, top, expected)
        if cut is None:
            return None
        clone = self._copy(None, self._keys, "via")
        if self._vias:
            clone._vias = self._vias[1:]
        clone._wire, clone._at = cut
        return clone

    def _splice(self, wire: bytes, lines: list[str], index: int) -> bytes | None:
        """The bytes of a copy whose header ``index`` is ``lines[index]`` instead (or is gone,
        when ``lines`` is one shorter), cut from ``wire``, the bytes of this message; None
        when ``wire`` is not exactly how this message writes itself (a start line written
        otherwise, say "SIP/2.0 200" without a reason), and the copy is written whole."""
        at = self._start_end(wire)
        if at < 0:
            return None
        old_lines = self._text()
        for line in old_lines[:index]:
            at += len(line) + 2
        end = at + len(old_lines[index]) + 2
        new = f"{lines[index]}\r\n".encode("latin-1") if len(lines) == len(old_lines) else b""
        return b"".join((wire[:at], new, wire[end:]))

    def _start_end(self, wire: bytes) -> int:
        """Where the start line and its CRLF end in ``wire``, this message's ``_wire``; -1
        when ``wire`` spells the start line otherwise than :meth:`start_line` writes it."""
        start = f"{self.start_line()}\r\n".encode("latin-1")
        at = len(start)
        # A slice compared: compiled, startswith is a generic call.
        return at if wire[:at] == start else -1

    def edit(self) -> Edit[Self]:
        """Several changes made as one copy: ``m.edit().append(...).remove(...).done()`` is
        ``m.append(...).remove(...)`` without the copies in between."""
        return Edit(self)

    # -- writing -------------------------------------------------------------------------
    def start_line(self) -> str:
        """The first line, without CRLF."""
        raise NotImplementedError

    def to_bytes(self) -> bytes:
        """The message on the wire. Adds Content-Length when it is missing (RFC 3261 §18.3)."""
        if self._wire is None:
            head = "\r\n".join(self._text())
            keys = self._keys
            # Content-Length is nearly always the last header: looked at first, no scan.
            if (not keys or keys[-1] != "content-length") and _index(keys, "content-length") < 0:
                head = f"{head}\r\nContent-Length: {len(self.body)}"
            text = (
                f"{self.start_line()}\r\n{head}\r\n\r\n" if head else f"{self.start_line()}\r\n\r\n"
            )
            self._wire = text.encode("latin-1") + self.body
        return self._wire


_CACHED: Final = frozenset(("*", "via", "cseq", "call-id", "to", "from", "max-forwards"))
"""Changes that invalidate something cached on a message (``*``: anything may have)."""


M = TypeVar("M", bound=Message)


class Edit(Generic[M]):
    """Changes to a message collected on one copy of its header lists (``Message.edit``).

    Each method does what the message's method of that name does, in the order called, and
    ``done()`` makes the one new message: what a chain of changes gives, with one copy and
    one pass over the cached values instead of one per change.
    """

    __slots__ = ("_message", "_lines", "_keys", "_changed")

    def __init__(self, message: M) -> None:
        self._message = message
        lines = message._lines
        # Lines not made yet are made for this edit alone: the message keeps its bytes.
        self._lines = lines.copy() if lines is not None else message._text_made()
        self._keys = message._keys.copy()
        self._changed: str | None = None
        """None while nothing changed; then the one key changed so far that a message caches
        a value of, ``*`` when several such were, ``""`` when none was."""

    def _touch(self, key: str) -> None:
        changed = self._changed
        if key not in _CACHED:
            if changed is None:
                self._changed = ""
        elif key != changed:
            self._changed = key if not changed else "*"

    @property
    def message(self) -> M:
        """The message as it was before any of these changes."""
        return self._message

    def has(self, key: str) -> bool:
        """True when a header named ``key`` is present, as changed so far."""
        return _index(self._keys, key) >= 0

    def get(self, key: str) -> str | None:
        """The value of the first header named ``key``, as changed so far, or None."""
        i = _index(self._keys, key)  # as Message.get
        return None if i < 0 else _value_of(self._lines[i])

    def get_all(self, key: str) -> list[str]:
        """The values of every header named ``key``, as changed so far."""
        lines = self._lines
        return [_value_of(lines[i]) for i, k in enumerate(self._keys) if k == key]

    def append(self, name: str, value: str) -> Self:
        """As :meth:`Message.append`."""
        keys = self._keys
        index = len(keys) - 1 if keys and keys[-1] == "content-length" else len(keys)
        key = _key_of(name)
        self._lines.insert(index, f"{name}: {value}")
        keys.insert(index, key)
        self._touch(key)
        return self

    def replace(self, name: str, value: str) -> Self:
        """As :meth:`Message.replace`."""
        key = _key_of(name)
        keys = self._keys
        first = _index(keys, key)
        if first < 0:
            return self.append(name, value)
        lines = self._lines
        lines[first] = f"{name}: {value}"
        for i in range(len(keys) - 1, first, -1):
            if keys[i] == key:
                del lines[i]
                del keys[i]
        self._touch(key)
        return self

    def remove(self, key: str) -> Self:
        """As :meth:`Message.remove`."""
        keys = self._keys
        first = _index(keys, key)
        if first >= 0:
            lines = self._lines
            for i in range(len(keys) - 1, first - 1, -1):
                if keys[i] == key:
                    del lines[i]
                    del keys[i]
            self._touch(key)
        return self

    def prepend(self, name: str, value: str) -> Self:
        """As :meth:`Message.prepend`."""
        key = _key_of(name)
        keys = self._keys
        index = _index(keys, key)  # as Message.prepend
        if index < 0:
            index = 0 if key == "via" else _after_vias(keys)
        self._lines.insert(index, f"{name}: {value}")
        keys.insert(index, key)
        self._touch(key)
        return self

    def replace_at(self, key: str, value: str) -> Self:
        """As :meth:`Message.replace_at`."""
        index = _must_index(self._keys, key)
        lines = self._lines
        name = lines[index].partition(":")[0].rstrip(" \t")
        lines[index] = f"{name}: {value}"
        self._touch(key)
        return self

    def pop_first_value(self, key: str) -> Self:
        """As :meth:`Message.pop_first_value`."""
        keys = self._keys
        index = _index(keys, key)
        if index < 0:
            return self
        lines = self._lines
        rest = split_values(_value_of(lines[index]))[1:]
        if rest:
            name = lines[index].partition(":")[0].rstrip(" \t")
            lines[index] = f"{name}: {', '.join(rest)}"
        else:
            del lines[index]
            del keys[index]
        self._touch(key)
        return self

    def done(self, *, uri: str | None = None) -> M:
        """The changed message, sent to ``uri`` when given (a request's, as
        :meth:`Request.with_uri`); the message itself when nothing changed."""
        message = self._message
        changed = self._changed
        if uri is None:
            if changed is None:
                return message
            # "": no key a message caches a value of changed: every cached value carries over.
            return message._copy(self._lines, self._keys, changed)
        if not isinstance(message, Request):
            raise TypeError("only a request has a Request-URI")
        clone = message._copy(self._lines, self._keys, changed or "")
        clone.uri = uri
        clone._ruri = None
        return clone


def _to_tag_of(value: str) -> str | None:
    """The tag of a To value (as ``_value_of`` gives it), None when it has none: most are
    an initial request's, with no "tag" anywhere, and need no parse.

    Raises:
        MalformedMessage: as :func:`_tag_of`.
    """
    return None if "tag" not in value.lower() else _tag_of(value)


def _tag_of(value: str) -> str | None:
    """``param_of(parse_name_addr(value).params, "tag")``, read in place when the value is
    written ``...<uri>;tag=x[;...]`` with no quote (``headscan.tag_in_place``); any other
    spelling, and anything ``parse_name_addr`` refuses, takes the full parse. A NameAddr and
    its parameters built per ACK and BYE were the largest single cost of an in-dialog
    request.

    Raises:
        MalformedMessage: as parse_name_addr.
    """
    tag = _TAG_IN_PLACE(value)
    if tag is not None:
        return tag
    return param_of(parse_name_addr(value).params, "tag")


def _top_via_of(value: str | None) -> Via:
    if not value:
        raise MalformedMessage("message has no Via")
    if "," not in value:
        return parse_via(value.strip())
    return parse_via(split_values(value)[0])


def _max_forwards_of(value: str | None) -> int | None:
    if value is None:
        return None
    if len(value) < 4 and value.isdigit() and value.isascii():
        return int(value)  # the common case: what wire_uint would return, sooner
    return wire_uint(value, "Max-Forwards", MAX_FORWARDS_READ)


def _value_of(line: str) -> str:
    colon = line.find(":")  # a slice, not partition(): no tuple to build and throw away
    value = line[colon + 1 :] if colon >= 0 else ""
    if "\n" in value:
        value = " ".join(part.strip() for part in value.split("\r\n"))
    return value.strip()


def _key_of(name: str) -> str:
    key = name.lower()
    return COMPACT_FORMS.get(key, key)


@final
class Request(Message):
    """A SIP request."""

    __slots__ = ("method", "uri", "_ruri")

    def __new__(
        cls, method: str = "", uri: str = "", headers: Iterable[Header] = (), body: bytes = b""
    ) -> Self:
        # So that ``Request.__new__(Request)`` makes a bare request, whose every attribute the
        # parser and ``Message._copy`` then set, without running ``__init__``, compiled as
        # well as not: compiled, a class without a ``__new__`` of its own runs ``__init__``
        # there, and ``object.__new__(Request)`` is refused. The parameters are
        # ``__init__``'s, which every ``Request(...)`` passes here first; their defaults
        # only serve the bare request (``__init__`` has none for method and uri).
        return object.__new__(cls)

    def __init__(
        self, method: str, uri: str, headers: Iterable[Header] = (), body: bytes = b""
    ) -> None:
        super().__init__(headers, body)
        self.method = method
        self.uri = uri
        self._ruri: Uri | None = None

    @property
    def request_uri(self) -> Uri:
        """The parsed Request-URI."""
        if self._ruri is None:
            self._ruri = parse_uri(self.uri)
        return self._ruri

    def _bare_copy(self) -> Self:
        # The class named, not type(self): compiled, Request.__new__(Request) is a direct
        # call where cls.__new__(cls) is a generic one (the class is final, so they agree).
        clone = Request.__new__(Request)
        clone.method = self.method
        clone.uri = self.uri
        clone._ruri = self._ruri
        return clone

    def with_uri(self, uri: str) -> Request:
        """The same request sent to another Request-URI."""
        clone = self._copy(self._text().copy(), self._keys.copy(), "")
        clone.uri = uri
        clone._ruri = None
        return clone

    def start_line(self) -> str:
        return f"{self.method} {self.uri} {SIP_VERSION}"

    def __repr__(self) -> str:
        return f"<Request {self.method} {self.uri}>"


@final
class Response(Message):
    """A SIP response."""

    __slots__ = ("status", "reason")

    def __new__(
        cls, status: int = 0, reason: str = "", headers: Iterable[Header] = (), body: bytes = b""
    ) -> Self:
        # As ``Request.__new__``.
        return object.__new__(cls)

    def __init__(
        self, status: int, reason: str, headers: Iterable[Header] = (), body: bytes = b""
    ) -> None:
        super().__init__(headers, body)
        self.status = status
        self.reason = reason

    def _bare_copy(self) -> Self:
        clone = Response.__new__(Response)  # as Request._bare_copy
        clone.status = self.status
        clone.reason = self.reason
        return clone

    def start_line(self) -> str:
        return f"{SIP_VERSION} {self.status} {self.reason}"

    def _start_end(self, wire: bytes) -> int:
        # Read, not written out and compared. Both parsers take a status line only as
        # "SIP/2.0 ", three ASCII digits not starting with 0 (str(status) gives them back),
        # then either its end or a space and the reason (kept as it was); to_bytes and a
        # splice write start_line() itself. So the wire's status line is start_line() unless
        # it ends at the digits ("SIP/2.0 200"), where start_line() adds a space: the byte
        # after the digits tells the two apart.
        if 99 < self.status < 1000 and len(wire) > 11 and wire[11] == 32:
            return 14 + len(self.reason)
        return -1

    def __repr__(self) -> str:
        return f"<Response {self.status} {self.reason}>"


def _after_vias(keys: list[str]) -> int:
    # From the end, where keys[::-1].index() would copy the list and scan it twice.
    i = len(keys)
    while i > 0:
        i -= 1
        if keys[i] == "via":
            return i + 1
    return 0


def _check_name_addr(value: str) -> None:
    """Enough of RFC 3261 §20.10 to refuse what cannot be a From or To; the full parse waits
    until a value is actually read."""
    if '"' in value:
        parse_name_addr(value)
        return
    lt = value.find("<")
    if lt >= 0:
        if value.find(">", lt) < 0:
            raise MalformedMessage(f"unterminated '<' in {value[:80]!r}")
    elif ":" not in value:
        raise MalformedMessage(f"not a name-addr: {value[:80]!r}")


def _content_length(lines: list[str], keys: list[str]) -> int:
    first = _must_index(keys, "content-length")
    text = _value_of(lines[first])
    if _index_from(keys, "content-length", first + 1) >= 0:
        others = {
            bounded_uint(_value_of(lines[i]), MAX_CONTENT_LENGTH)
            for i, k in enumerate(keys)
            if k == "content-length"
        }
        if len(others) > 1:
            raise MalformedMessage("conflicting Content-Length headers")
    if len(text) < 6 and text.isdigit() and text.isascii():
        return int(text)  # what bounded_uint would return, sooner
    length = bounded_uint(text, MAX_CONTENT_LENGTH)
    if length is None:
        raise MalformedMessage(f"bad Content-Length {text[:40]!r}")
    return length


def _parse_cseq(value: str | None) -> tuple[int, str]:
    if value is None:
        raise MalformedMessage("message has no CSeq")
    m = _CSEQ_RE.fullmatch(value)
    if m is None:
        raise MalformedMessage(f"bad CSeq {value[:80]!r}")
    number = bounded_uint(m.group(1), MAX_CSEQ)
    if number is None:
        raise MalformedMessage(f"CSeq number out of range in {value[:80]!r}")
    return number, m.group(2)


class ParseFailure(RemoteSipError):
    """A message that failed validation after its header block was read.

    It keeps what was read, so the boundary can answer a broken request with the status the
    error implies (RFC 3261 §8.2.6: the response copies Via, From, To, Call-ID and CSeq).
    """

    def __init__(
        self,
        cause: RemoteSipError,
        *,
        method: str | None,
        headers: tuple[Header, ...],
    ) -> None:
        super().__init__(str(cause), status_hint=cause.status_code)
        self.reason = cause.reason
        self.cause = cause
        self.method = method
        self.headers = headers


def _split_head(head: str) -> tuple[list[str], list[str]]:
    """Header field texts and their keys; the common case runs as two C-level passes."""
    lines = head.split("\r\n")
    if "\r\n " in head or "\r\n\t" in head or "" in lines:
        lines = _unfold(lines)
    keys: list[str | None] = _cached_keys(lines)
    if None in keys:
        bad: MalformedMessage | None = None
        for i, key in enumerate(keys):
            if key is None:
                try:
                    keys[i] = _slow_key(lines[i])
                except MalformedMessage as exc:
                    bad = bad or exc
                    keys[i] = _BAD
        if bad is not None:
            # Keep the readable fields so the request can still be answered 400.
            good = [(ln, k) for ln, k in zip(lines, keys, strict=True) if k and k != _BAD]
            raise _BadHeaders(bad, [ln for ln, _ in good], [k for _, k in good])
    return lines, cast(list[str], keys)


_SPELLINGS: Final[dict[str, tuple[str, int]]] = {}
"""Header name exactly as received, with its colon -> (key, slot); filled as names are seen,
up to a bound. The colon is part of the key so that a line without one (a bare "Call-ID")
never matches: its slice is empty. The slot is the key's place in ``_SLOTS`` (0 for the
others): the plain parse notes where each header it reads is as it meets it, where
``list.index`` would scan the keys once per header."""
_MAX_SPELLINGS: Final = 4096

_SLOTS: Final = {
    "via": 1,
    "from": 2,
    "to": 3,
    "call-id": 4,
    "cseq": 5,
    "content-length": 6,
    "max-forwards": 7,
}


_TEMPLATES: Final[dict[int, Template]] = {}
"""The header names of the last message of each shape, a shape being its number of header
lines and the first letter of its start line: (each line's name as spelt, with its colon;
their keys; the ``at``, Content-Length count and ``cut`` ``_parse_plain`` derives from them). A peer
writes its messages of one kind with the same headers in the same order, so a message is
nearly always of the shape of one before it, and a ``startswith`` per line confirms its names
where slicing each name out and looking it up in ``_SPELLINGS`` cost four times as much. A
name spelt as in the template is the same name: no spelling holds a colon but its last
character."""
_MAX_TEMPLATES: Final = 256
_TEMPLATE_LINES: Final = 256
"""Messages of more header lines than this leave no template (a shape is a count of them)."""


def _cached_keys(lines: list[str]) -> list[str | None]:
    """Each line's key through the spelling cache; None for a line whose name (and colon) is
    not in it. Slicing up to the colon copies only the name, where ``partition`` would copy
    every value too: this is the parser's largest single step."""
    out: list[str | None] = []
    for line in lines:
        entry = _SPELLINGS.get(line[: line.find(":") + 1])
        out.append(None if entry is None else entry[0])
    return out


_BAD: Final = "\x00bad"


class _BadHeaders(MalformedMessage):
    def __init__(self, cause: MalformedMessage, lines: list[str], keys: list[str]) -> None:
        super().__init__(str(cause))
        self.lines = lines
        self.keys = keys


def _unfold(lines: list[str]) -> list[str]:
    out: list[str] = []
    for line in lines:
        if not line:
            raise MalformedMessage("empty line inside the header block")
        if line[0] in " \t":
            if not out:
                raise MalformedMessage("continuation line before the first header")
            out[-1] = f"{out[-1]}\r\n{line}"
        else:
            out.append(line)
    return out


def _slow_key(line: str) -> str:
    colon = line.find(":")
    if colon <= 0:
        raise MalformedMessage(f"header line without a name and colon: {line[:60]!r}")
    spelt = line[:colon]
    name = spelt.rstrip(" \t").lower()
    key = _KNOWN.get(name)
    if key is None:
        if _TOKEN_RE.fullmatch(name) is None:
            raise MalformedMessage(f"bad header name {spelt[:40]!r}")
        key = name
    if len(_SPELLINGS) < _MAX_SPELLINGS:
        # Bounded: a peer inventing names cannot grow it without limit.
        _SPELLINGS[spelt + ":"] = (key, _SLOTS.get(key, 0))
    return key


def parse(
    data: bytes,
    *,
    max_size: int = DEFAULT_MAX_SIZE,
    max_headers: int = DEFAULT_MAX_HEADERS,
    datagram: bool = True,
) -> Request | Response:
    """Parse one whole SIP message.

    With ``datagram`` the body is what follows the header block, cut to Content-Length
    (RFC 3261 §18.3); a stream framer has already cut the message to its exact length.

    Raises:
        MessageTooLarge: over ``max_size`` bytes with no header block within the limit.
        MalformedMessage: the start line cannot be read (nothing to answer with).
        ParseFailure: the header block was read but the message is invalid (over
            ``max_size`` bytes or ``max_headers`` fields included); it carries the headers so
            that a request can still be answered.
    """
    if len(data) <= max_size:
        message = _parse_plain(data, max_headers, datagram)
        if message is not None:
            return message
    return _parse_careful(data, max_size, max_headers, datagram)


def _parse_plain(data: bytes, max_headers: int, datagram: bool) -> Request | Response | None:
    """The message as ``_parse_careful`` would return it, when it is written plainly; else
    None, and ``_parse_careful`` reads it again and says what is wrong.

    Plainly means: no CRLF before the start line, every line ended by CRLF, no folded
    header, every header name spelt as one seen before, one Content-Length of at most five
    digits that the body does not fall short of, a known method, and the values read here
    (CSeq, Max-Forwards, From, To, Call-ID, top Via, Request-URI) all valid. Nothing is
    judged here that ``_parse_careful`` does not judge the same way, so a message takes
    this path only when the careful one would have accepted it as the same value.
    """
    # The passes over the bytes (cutting the block into lines, checking their names, reading
    # the values of fixed form) are headscan's, native in the built package; what is left
    # here builds and checks the values that are objects (the top Via, the Request-URI, a
    # name-addr written otherwise than "<uri>..."). A line's index in the text is its index
    # in the bytes: latin-1 maps each byte to one character.
    scanned = _SPLIT_HEAD(data)
    if scanned is None:
        return None
    end, first, at = scanned
    count = len(at) // 4 - 1
    shape = count * 128 + (ord(first[0]) & 127)
    template = _TEMPLATES.get(shape)
    plain: Plain | bool | None = False
    if template is not None:
        plain = _READ_PLAIN(data, end, first, at, template, max_headers, datagram)
    if plain is False:
        # No message of this shape yet, or one of other names: the template of these lines.
        template = _new_template(_LINES_OF(data, at))
        if template is None:
            return None
        if count <= _TEMPLATE_LINES:
            if len(_TEMPLATES) >= _MAX_TEMPLATES:
                _TEMPLATES.clear()  # bounded, as the spelling cache is
            _TEMPLATES[shape] = template
        plain = _READ_PLAIN(data, end, first, at, template, max_headers, datagram)
    if not isinstance(plain, tuple):
        return None  # a value not written plainly: the careful path reads it
    (
        known,
        body,
        wire,
        cseq,
        call_id,
        from_check,
        to_value,
        to_check,
        via,
        via_plain,
        status,
        text,
        mf,
        tag,
    ) = plain
    message: Request | Response
    try:
        if from_check is not None:
            _check_name_addr(from_check)
        if to_check:
            _check_name_addr(to_value)
        # A response to one of our branches finds its Via (ours) in the cache.
        top_via = parse_via(via) if via_plain else _top_via_of(via)
        if status:
            response = Response.__new__(Response)
            response.status = status
            response.reason = text
            response._mf = -1
            message = response
        else:
            request = Request.__new__(Request)
            request.method = cseq[1]
            request.uri = text
            request._ruri = cached_uri(text) or parse_uri(text)
            # The common case of _max_forwards_of is read already.
            request._mf = _max_forwards_of(mf) if isinstance(mf, str) else mf
            message = request
    except (ValueError, RemoteSipError):
        return None  # a value the careful path will name
    to_tag: str | None = _UNREAD
    if tag is not False:
        to_tag = tag  # a request's, absent or written the common way
    elif not status:
        # Every request's To tag is read (it tells an initial request from one in a
        # dialog). read_plain found "tag" in the value but not written in place: only the
        # full parse of the name-addr is left of what the property would do.
        try:
            to_tag = param_of(parse_name_addr(to_value).params, "tag")
        except MalformedMessage:
            pass  # left unread: the property raises it when the tag is asked for
    # Typed as the one native class, compiled the attributes are set directly (on the
    # union each would be a generic setattr).
    base = cast(Message, message)
    # The header lines are made only if something asks for them: a relayed response is
    # sent as its received bytes less our Via, cut where ``at`` says that line is.
    base._lines = None
    base._keys = known
    base.body = body
    base._wire = wire
    base._at = at
    base._vias = None
    base._top_via = top_via
    base._cseq = cseq
    base._call_id = call_id
    base._to_tag = to_tag
    base._from_tag = _UNREAD
    return message


def _new_template(lines: list[str]) -> Template | None:
    """The template of the shape of ``lines`` when every name in them is spelt as one seen
    before; else None (a folded line, an empty one or a new name has no spelling in the
    cache)."""
    spellings = []
    known = []
    # at[slot]: the index of the first header of each key in _SLOTS, -1 when there is none
    # (what known.index would give, without a scan per key).
    at = [-1, -1, -1, -1, -1, -1, -1, -1]
    # cut[slot]: where the value of that header starts in its line (past the colon), so that
    # reading it is one slice with no find(); a template's names are those of the lines
    # that match it, colon included, so its cuts hold for them too.
    cut = [0, 0, 0, 0, 0, 0, 0, 0]
    lengths = 0
    for i, line in enumerate(lines):
        spelt = line[: line.find(":") + 1]
        entry = _SPELLINGS.get(spelt)
        if entry is None:
            return None
        key, slot = entry
        known.append(key)
        spellings.append(spelt)
        if slot:
            if at[slot] < 0:
                at[slot] = i
                cut[slot] = len(spelt)
            if slot == 6:
                lengths += 1
    return (spellings, known, at, lengths, cut)


def _parse_careful(
    data: bytes, max_size: int, max_headers: int, datagram: bool
) -> Request | Response:
    """Every check, in the order that decides which fault a message is answered with."""
    size_error: MessageTooLarge | None = None
    if len(data) > max_size:
        # Only the first max_size bytes are read: when they hold the whole header block
        # the request can still be answered 513 (RFC 3261 §21.5.14).
        size_error = MessageTooLarge(
            f"message of {len(data)} bytes exceeds the limit of {max_size}"
        )
        data = data[:max_size]
    start = 0
    # RFC 3261 §7.5: ignore CRLFs before the start line.
    while data.startswith(b"\r\n", start):
        start += 2
    end = data.find(b"\r\n\r\n", start)
    if end < 0:
        if size_error is not None:
            raise size_error
        raise MalformedMessage("no blank line after the header block")
    text = data[start:end].decode("latin-1")
    first, sep, head = text.partition("\r\n")
    start_error: MalformedMessage | None = None
    crlfs = text.count("\r\n")
    if text.count("\r") != crlfs or text.count("\n") != crlfs:
        # A CR or LF on its own ends a line for some parsers and not for others; relayed,
        # it could smuggle a header past them (RFC 3261 §7: lines end with CRLF).
        start_error = MalformedMessage("bare CR or LF in the header block")
    method: str | None = None
    status = 0
    reason = ""
    uri = ""
    version = SIP_VERSION
    if first.startswith("SIP/"):
        version, _, rest = first.partition(" ")
        code, _, reason = rest.partition(" ")
        if version != SIP_VERSION:
            raise VersionNotSupported(f"unsupported version {version[:40]!r}")
        if len(code) != 3 or not is_digits(code) or code[0] == "0":
            raise MalformedMessage(f"bad status line {first[:80]!r}")
        status = int(code)
    else:
        parts = first.split(" ")
        if len(parts) == 3 and parts[0] and parts[1]:
            method, uri, version = parts
            if _TOKEN_RE.fullmatch(method) is None:
                raise MalformedMessage(f"bad method {method[:40]!r}")
        elif len(parts) > 3 and parts[-1] == SIP_VERSION and _TOKEN_RE.fullmatch(parts[0]):
            # Whitespace inside the Request-URI (RFC 4475 §3.1.2.11): clearly a request, so
            # it is answered 400 rather than dropped.
            method = parts[0]
            start_error = MalformedMessage(f"whitespace in Request-URI {first[:80]!r}")
        else:
            raise MalformedMessage(f"bad request line {first[:80]!r}")
    lines: list[str] = []
    keys: list[str] = []
    try:
        if sep:
            try:
                lines, keys = _split_head(head)
            except _BadHeaders as bad:
                # Not "exc", the name the RemoteSipError below is bound to: compiled, one
                # name holds one type, and a MalformedMessage is no _BadHeaders.
                lines, keys = bad.lines, bad.keys
                raise
        if start_error is not None:
            raise start_error
        if size_error is not None:
            raise size_error
        if len(keys) > max_headers:
            raise MessageTooLarge(f"{len(keys)} header fields exceed the limit of {max_headers}")
        body = data[end + 4 :]
        wire: bytes | None = None
        if "content-length" in keys:
            length = _content_length(lines, keys)
            received = len(body)
            if length > received:
                raise MalformedMessage(
                    f"Content-Length {length} exceeds the {received} bytes received"
                )
            if datagram and length < received:
                body = body[:length]
            # Unchanged, the message serialises as the very bytes it came in (leading CRLFs
            # and a datagram's bytes past Content-Length left out, as a rebuild would).
            wire = (
                data if start == 0 and len(body) == received else data[start : end + 4 + len(body)]
            )
        try:
            via_at = keys.index("via")
            from_at = keys.index("from")
            to_at = keys.index("to")
            call_id_at = keys.index("call-id")
            cseq_at = keys.index("cseq")
        except ValueError:
            for key in _REQUIRED:
                if key not in keys:
                    raise MalformedMessage(f"missing mandatory header {key}") from None
            raise
        message: Request | Response
        if method is not None:
            if version != SIP_VERSION:
                raise VersionNotSupported(f"unsupported version {version[:40]!r}")
            ruri = parse_uri(uri)
            cseq = _parse_cseq(_value_of(lines[cseq_at]))
            if cseq[1] != method:
                raise MalformedMessage(f"CSeq method {cseq[1][:40]} does not match {method[:40]}")
            # Read now, not when the request is forwarded: a request is refused before the
            # proxy keeps any state for it.
            mf = (
                _max_forwards_of(_value_of(lines[keys.index("max-forwards")]))
                if "max-forwards" in keys
                else None
            )
            request = Request.__new__(Request)
            request.method = method
            request.uri = uri
            request._ruri = ruri
            message = request
        else:
            cseq = _parse_cseq(_value_of(lines[cseq_at]))
            mf = -1
            response = Response.__new__(Response)
            response.status = status
            response.reason = reason
            message = response
        # Responses too: a response is relayed, and an ACK or CANCEL is built from its From,
        # To and Call-ID, which must therefore be readable.
        _check_name_addr(_value_of(lines[from_at]))
        _check_name_addr(_value_of(lines[to_at]))
        call_id = _value_of(lines[call_id_at])
        if not call_id:
            raise MalformedMessage("message has no Call-ID")
        message._top_via = _top_via_of(_value_of(lines[via_at]))
        message._lines = lines
        message._keys = keys
        message.body = body
        message._wire = wire
        message._at = b""
        message._vias = None
        message._cseq = cseq
        message._call_id = call_id
        message._to_tag = _UNREAD
        message._from_tag = _UNREAD
        message._mf = mf
        return message
    except RemoteSipError as exc:
        headers = tuple(Header(k, lines[i], _value_of(lines[i])) for i, k in enumerate(keys))
        raise ParseFailure(exc, method=method, headers=headers) from exc


REASONS: Final = {
    100: "Trying",
    180: "Ringing",
    183: "Session Progress",
    200: "OK",
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    408: "Request Timeout",
    416: "Unsupported URI Scheme",
    481: "Call/Transaction Does Not Exist",
    482: "Loop Detected",
    483: "Too Many Hops",
    487: "Request Terminated",
    500: "Server Internal Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Server Time-out",
    505: "Version Not Supported",
    513: "Message Too Large",
}

_STATUS_LINES: Final = {
    status: f"{SIP_VERSION} {status} {reason}\r\n".encode("latin-1")
    for status, reason in REASONS.items()
}
"""Each status line ``make_response`` writes with the usual reason, and its CRLF, as bytes."""


def make_response(
    request: Request,
    status: int,
    reason: str | None = None,
    *,
    to_tag: str | None = None,
    extra: Iterable[tuple[str, str]] = (),
) -> Response:
    """A response built by this element (RFC 3261 §8.2.6.2).

    Via, From, Call-ID and CSeq are copied as received; To gains ``to_tag`` when it has none
    and the status is above 100.
    """
    if request._lines is None and not extra and not (to_tag and status > 100):
        # Nothing to change in the lines copied, and the request's lines still in its
        # bytes: the response's bytes are made from those, none made into a string.
        return _response_of_lines(request, status, reason)
    lines: list[str] = []
    keys: list[str] = []
    # enumerate, not zip: compiled, a loop over enumerate is native and one over zip is not.
    for i, key in enumerate(request._keys):
        if key in _COPIED:
            line = request._line(i)
            if key == "to" and to_tag and status > 100 and not _has_tag(_value_of(line)):
                line = f"{line.rstrip()};tag={to_tag}"
            lines.append(line)
            keys.append(key)
    for name, value in extra:
        lines.append(f"{name}: {value}")
        keys.append(_key_of(name))
    lines.append("Content-Length: 0")
    keys.append("content-length")
    # Every attribute set here, as Response(...) with no headers would leave it: compiled,
    # that call runs __init__ and its loop over the empty headers through generic calls.
    response = Response.__new__(Response)
    response.status = status
    response.reason = reason or REASONS.get(status, "Unknown")
    _set_unread(response, lines, keys, b"")
    return response


def _response_of_lines(request: Request, status: int, reason: str | None) -> Response:
    """``make_response`` of a request whose lines are not made, with no line to change and
    nothing to add: the copied lines cut from its bytes (``headscan.copy_lines``), so the
    response is as a parsed one, its bytes and the offsets of its lines."""
    response = Response.__new__(Response)
    response.status = status
    response.reason = reason or REASONS.get(status, "Unknown")
    head = _STATUS_LINES.get(status) if reason is None else None
    if head is None:
        head = f"{response.start_line()}\r\n".encode("latin-1")
    wire, at, keys = _COPY_LINES(
        cast(bytes, request._wire),
        request._at,
        request._keys,
        _COPIED,
        head,
        b"Content-Length: 0",
        "content-length",
    )
    _set_unread(response, None, keys, b"")
    response._wire = wire
    response._at = at
    return response


def _set_unread(message: Message, lines: list[str] | None, keys: list[str], body: bytes) -> None:
    """Give a bare message (``__new__`` only) its headers and body, with nothing read from
    them yet: what ``Message.__init__`` leaves, set directly (compiled, each a native store,
    where ``__init__`` loops over Header values through generic calls)."""
    message._lines = lines
    message._keys = keys
    message.body = body
    message._wire = None
    message._at = b""
    message._vias = None
    message._top_via = None
    message._cseq = None
    message._call_id = None
    message._to_tag = _UNREAD
    message._from_tag = _UNREAD
    message._mf = -1


_COPIED: Final = frozenset({"via", "from", "to", "call-id", "cseq"})


def _has_tag(value: str) -> bool:
    return ";tag=" in value.replace(" ", "").replace("\t", "").lower()


def response_from_headers(
    headers: Iterable[Header],
    status: int,
    reason: str | None = None,
    *,
    to_tag: str | None = None,
    extra: Iterable[tuple[str, str]] = (),
) -> Response:
    """A response from a request's header list; used where the request failed to parse."""
    out: list[Header] = []
    for h in headers:
        if h.key in ("via", "from", "call-id", "cseq"):
            out.append(h)
        elif h.key == "to":
            if to_tag and status > 100 and not _has_tag(h.value):
                out.append(make_header("To", f"{h.value};tag={to_tag}"))
            else:
                out.append(h)
    out.extend(make_header(name, value) for name, value in extra)
    out.append(make_header("Content-Length", "0"))
    return Response(status, reason or REASONS.get(status, "Unknown"), out)


def error_response(error: ParseFailure, *, to_tag: str | None = None) -> Response | None:
    """The reply to a request that failed to parse, or None when it cannot be answered.

    A response needs the request's Via, From, To, Call-ID and CSeq; without them, or for a
    broken response or ACK, the message is dropped.
    """
    if error.method is None or error.method == "ACK":
        return None
    present = {h.key for h in error.headers}
    if not all(key in present for key in _REQUIRED):
        return None
    try:
        vias = [
            parse_via(v) for h in error.headers if h.key == "via" for v in split_values(h.value)
        ]
    except RemoteSipError:
        return None
    if not vias:
        return None
    for h in error.headers:
        if h.key in _COPIED and ("\r" in h.raw or "\n" in h.raw):
            if "\r" in h.raw.replace("\r\n", "") or "\n" in h.raw.replace("\r\n", ""):
                return None  # never echo a bare CR or LF
    reply = response_from_headers(error.headers, error.status_code, error.reason, to_tag=to_tag)
    try:
        parse(reply.to_bytes())
    except ParseFailure as again:
        # The reply echoes the fields it must copy, so it may carry the very fault it
        # answers (RFC 4475 §3.1.2.7 answers a CSeq above 2**31 with 400 all the same);
        # any other fault would make it a reply nothing upstream can match.
        if str(again) != str(error):
            return None
    except RemoteSipError:
        return None
    return reply
