"""URIs, name-addr values and Via values, parsed only as far as routing needs.

Written here rather than taken from a library: the SIP parsers on PyPI either reject
``urn:service:sos`` Request-URIs or rebuild every value they read, and the proxy must forward
what it did not change exactly as it came. These helpers read a value and never re-encode it;
the few values the proxy does change (its own Via, Record-Route, a rewritten Request-URI) are
written out whole.

Two short cuts keep the common case cheap without changing any answer: a Via written as
nearly all are (``SIP/2.0/UDP host:port;params``, no LWS) is cut with string methods before
the full expression is tried, and parsed URIs and Vias are kept in small bounded caches,
since Request-URIs, trunk URIs and Route values repeat from call to call, and a request's
Vias come back in each of its responses.
"""

from __future__ import annotations

import re
from typing import Final, NamedTuple

from e911_sip.sip import headscan
from e911_sip.sip.errors import MalformedMessage, UnsupportedUriScheme
from e911_sip.sip.numbers import MAX_PORT, bounded_uint, short_uint

# The native readers as statics (None in the pure build): compiled, a name imported from
# headscan is a lookup in this module's globals at each call.
_URI_PARTS: Final = headscan.uri_parts
_VIA_PARTS: Final = headscan.via_parts

ROUTABLE_SCHEMES = frozenset({"sip", "sips", "tel", "urn"})

Params = tuple[tuple[str, str | None], ...]

_TUPLE_NEW: Final = tuple.__new__
"""Taken from ``tuple`` once: compiled, ``tuple.__new__(...)`` looks the method up on the
type at each call, and calling this is a plain call."""


def param_of(params: Params, name: str) -> str | None:
    """Parameter ``name`` (lower-case) of ``params``: '' for a flag, None when absent. What
    the ``param`` method of a Uri, NameAddr or Via returns; compiled code calling this
    function directly is spared a method call on a class that is not native."""
    for key, value in params:
        if key == name:
            return "" if value is None else value
    return None


class Uri(NamedTuple):
    """A parsed URI. ``raw`` is the text it was parsed from, kept for pass-through."""

    scheme: str
    """Lower-case scheme: ``sip``, ``sips``, ``tel`` or ``urn``."""
    user: str | None
    """The userinfo user part of a SIP URI, the number of a tel URI; None for urn."""
    host: str
    """Host of a SIP URI (IPv6 without brackets); empty for tel; the NSS for urn."""
    port: int | None
    """Explicit port of a SIP URI, else None."""
    params: Params
    """URI parameters in order, names lower-cased, values as written (None for a flag)."""
    raw: str
    """The URI exactly as received."""

    def param(self, name: str) -> str | None:
        """Value of parameter ``name`` (lower-case), '' for a flag, None when absent."""
        return param_of(self.params, name)

    @property
    def transport(self) -> str:
        """Transport the URI asks for (``udp`` by default, ``tls`` for sips)."""
        value = self.param("transport")
        if value:
            return value.lower()
        return "tls" if self.scheme == "sips" else "udp"

    @property
    def hostport(self) -> str:
        """``host[:port]`` with IPv6 brackets restored."""
        return uri_hostport(self)


def uri_hostport(uri: Uri) -> str:
    """``uri.hostport``, as a native call: compiled, a NamedTuple's property is a generic
    attribute lookup and a call."""
    host = uri.host
    if ":" in host:
        host = f"[{host}]"
    port = uri.port
    return host if port is None else f"{host}:{port}"


def _split_params(text: str) -> Params:
    if not text:
        return ()
    if ";" not in text:
        # One parameter, as a request's Via often has (its branch): what the loop below
        # gives for one part, without the list it splits into and builds.
        eq = text.find("=")
        if eq < 0:
            return ((text.strip().lower(), None),)
        return ((text[:eq].strip().lower(), text[eq + 1 :].strip()),)
    # find and slices rather than partition: compiled, they are native string operations.
    out: list[tuple[str, str | None]] = []
    for part in text.split(";"):
        eq = part.find("=")
        if eq < 0:
            if part:
                out.append((part.strip().lower(), None))
        else:
            out.append((part[:eq].strip().lower(), part[eq + 1 :].strip()))
    return tuple(out)


def _split_hostport(text: str, raw: str) -> tuple[str, int | None]:
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise MalformedMessage(f"unterminated IPv6 reference in URI {raw[:80]!r}")
        host = text[1:end]
        rest = text[end + 1 :]
        if not rest:
            return host, None
        if not rest.startswith(":"):
            raise MalformedMessage(f"bad host in URI {raw[:80]!r}")
        port_text = rest[1:]
    else:
        host, sep, port_text = text.partition(":")
        if not sep:
            port_text = ""
    if not host:
        raise MalformedMessage(f"URI has no host: {raw[:80]!r}")
    if not port_text:
        return host, None
    port = bounded_uint(port_text, MAX_PORT)
    if port is None:
        raise MalformedMessage(f"bad port in URI {raw[:80]!r}")
    return host, port


_URI_CACHE: Final[dict[str, Uri]] = {}
"""Recently parsed URIs by their text. Request-URIs, trunk URIs and Route values repeat from
call to call; a URI is an immutable value, so the parse of one can serve them all."""
_URI_CACHE_SIZE: Final = 1024
_URI_CACHE_LENGTH: Final = 256
"""Longer URIs (and Via values) are not kept, so each cache holds at most about 1 MiB of
text."""


def cached_uri(text: str) -> Uri | None:
    """The URI parsed from a text before and still kept, or None: what ``parse_uri`` would
    return, without the parse, for a caller on the hot path that tries the cache first."""
    return _URI_CACHE.get(text)


def parse_uri(text: str) -> Uri:
    """Parse a sip, sips, tel or urn URI.

    Raises:
        UnsupportedUriScheme: any other scheme (the caller answers 416).
        MalformedMessage: the URI is not well formed.
    """
    uri = _URI_CACHE.get(text)
    if uri is None:
        uri = read_uri(text)
        if len(text) <= _URI_CACHE_LENGTH:
            if len(_URI_CACHE) >= _URI_CACHE_SIZE:
                # Bounded: a peer sending ever new URIs only ever costs a clear now and then.
                _URI_CACHE.clear()
            _URI_CACHE[text] = uri
    return uri


def read_uri(text: str) -> Uri:
    """``parse_uri(text)`` without its cache: for a caller's own URI, which its call reads
    once (and its caller keeps), so that a new caller's URIs do not push out the ones many
    calls share (a trunk's, the softswitch's).

    Raises:
        UnsupportedUriScheme, MalformedMessage: as :func:`parse_uri`.
    """
    if _URI_PARTS is not None:
        # A sip URI written the common way (a new caller's From and P-Asserted-Identity),
        # read natively: the same answer as below, for the text the native reader takes.
        parts = _URI_PARTS(text)
        if parts is not None:
            return _uri(parts[0], parts[1], parts[2], parts[3], parts[4], text)
    return _read_uri(text)


def _read_uri(text: str) -> Uri:
    """The Python reading of any URI (``read_uri`` without the native one)."""
    raw = text
    scheme, sep, rest = text.partition(":")
    if not sep or not scheme:
        raise MalformedMessage(f"not a URI: {raw[:80]!r}")
    scheme = scheme.lower()
    if scheme not in ROUTABLE_SCHEMES:
        if not scheme.replace("+", "").replace("-", "").replace(".", "").isalnum():
            raise MalformedMessage(f"not a URI: {raw[:80]!r}")
        raise UnsupportedUriScheme(f"unsupported URI scheme {scheme[:40]!r}")
    if scheme == "tel":
        number, _, ptext = rest.partition(";")
        if not number:
            raise MalformedMessage(f"tel URI without a number: {raw[:80]!r}")
        return _uri(scheme, number, "", None, _split_params(ptext), raw)
    if scheme == "urn":
        if not rest or " " in rest:
            raise MalformedMessage(f"bad urn: {raw[:80]!r}")
        return _uri(scheme, None, rest.lower(), None, (), raw)
    # sip / sips: [user[:password]@]hostport[;params][?headers]. A user part may hold ';',
    # '?' and '/' (RFC 3261 §25.1 user-unreserved) but never a bare '@', which the header
    # part may not hold either, so the first '@' ends the userinfo.
    at = rest.find("@")
    if at >= 0:
        userinfo = rest[:at]
        rest = rest[at + 1 :]
        user = userinfo.partition(":")[0]
        if not user:
            raise MalformedMessage(f"empty user in URI {raw[:80]!r}")
    else:
        user = None
    rest = rest.partition("?")[0]
    hostport, _, ptext = rest.partition(";")
    if " " in hostport or "\t" in hostport:
        raise MalformedMessage(f"whitespace inside URI {raw[:80]!r}")
    host, port = _split_hostport(hostport, raw)
    return _uri(scheme, user, host.lower(), port, _split_params(ptext), raw)


_URI: Final = Uri
"""As ``_VIA`` (below): the class as a C static once compiled."""


def _uri(
    scheme: str, user: str | None, host: str, port: int | None, params: Params, raw: str
) -> Uri:
    # As _name_addr: without the NamedTuple's Python-level __new__, which cost a third of
    # the parse of a caller's URI (a new caller's, read from no cache).
    return _TUPLE_NEW(_URI, (scheme, user, host, port, params, raw))


class NameAddr(NamedTuple):
    """A From/To/Contact/Route/PAI value: optional display name, URI and header parameters."""

    display: str
    uri: str
    params: Params
    raw: str

    def param(self, name: str) -> str | None:
        """Header parameter ``name`` (lower-case): '' for a flag, None when absent."""
        return param_of(self.params, name)


def parse_name_addr(text: str) -> NameAddr:
    """Parse ``["display"] <uri>;params`` or a bare ``uri;params`` (RFC 3261 §20.10)."""
    display, uri, ptext = _cut_name_addr(text)
    return _name_addr(display, uri, _split_params(ptext), text)


def name_addr_uri_text(text: str) -> str:
    """``parse_name_addr(text).uri``, raising what it raises, without splitting the header
    parameters nobody reads (the caller's URI read for its line or its host)."""
    return _cut_name_addr(text)[1]


def _cut_name_addr(text: str) -> tuple[str, str, str]:
    """(display name, URI, header parameters after their ';') of a name-addr or addr-spec."""
    raw = text
    text = text.strip()
    lt = text.find("<")
    if lt >= 0 and '"' in text[:lt]:
        lt = _find_outside_quotes(text, "<")
    if lt >= 0:
        gt = text.find(">", lt)
        if gt < 0:
            raise MalformedMessage(f"unterminated '<' in {raw[:80]!r}")
        display = text[:lt].strip()
        uri = text[lt + 1 : gt].strip()
        ptext = text[gt + 1 :].strip()
        if ptext and not ptext.startswith(";"):
            raise MalformedMessage(f"unexpected text after URI in {raw[:80]!r}")
        ptext = ptext[1:]
    else:
        # addr-spec form: parameters after the URI belong to the header, not the URI.
        uri, _, ptext = text.partition(";")
        uri = uri.strip()
        display = ""
    if not uri:
        raise MalformedMessage(f"empty URI in {raw[:80]!r}")
    return display, uri, ptext


_NAME_ADDR: Final = NameAddr
"""As ``_VIA`` (below): the class as a C static once compiled."""


def _name_addr(display: str, uri: str, params: Params, raw: str) -> NameAddr:
    # tuple.__new__ skips the Python-level __new__ a NamedTuple is given: half the cost.
    return _TUPLE_NEW(_NAME_ADDR, (display, uri, params, raw))


def _find_outside_quotes(text: str, char: str) -> int:
    quoted = False
    i = 0
    while i < len(text):
        c = text[i]
        if quoted:
            if c == "\\":
                i += 1
            elif c == '"':
                quoted = False
        elif c == '"':
            quoted = True
        elif c == char:
            return i
        i += 1
    return -1


def split_values(text: str) -> list[str]:
    """Split a comma-separated header value, honouring quotes and ``<...>``.

    Empty elements are skipped, but the list is never empty: a value of nothing but commas
    gives one empty string, so the first value always exists (and fails to parse as a Via
    or a Route) instead of an IndexError escaping whoever reads it.
    """
    if "," not in text:
        return [text.strip()]
    if '"' not in text and "<" not in text:
        # Via and most list headers: no quoting, so a plain split is exact.
        parts: list[str] = []
        for part in text.split(","):
            part = part.strip()
            if part:
                parts.append(part)
        return parts or [""]
    out: list[str] = []
    depth = 0
    quoted = False
    start = 0
    i = 0
    n = len(text)
    while i < n:
        c = text[i]
        if quoted:
            if c == "\\":
                i += 1
            elif c == '"':
                quoted = False
        elif c == '"':
            quoted = True
        elif c == "<":
            depth += 1
        elif c == ">":
            depth = max(0, depth - 1)
        elif c == "," and depth == 0:
            part = text[start:i].strip()
            if part:
                out.append(part)
            start = i + 1
        i += 1
    part = text[start:].strip()
    if part:
        out.append(part)
    return out or [""]


class Via(NamedTuple):
    """One Via value (RFC 3261 §20.42)."""

    transport: str
    """Upper-case transport token (UDP, TCP, TLS, ...)."""
    host: str
    port: int | None
    params: Params
    raw: str

    def param(self, name: str) -> str | None:
        """Parameter ``name`` (lower-case): '' for a flag, None when absent."""
        return param_of(self.params, name)

    @property
    def branch(self) -> str | None:
        """The branch parameter, or None."""
        return self.param("branch")

    @property
    def sent_by(self) -> str:
        """``host:port`` as a transaction-matching key (default port 5060)."""
        return f"{self.host}:{self.port or 5060}"


_VIA_RE = re.compile(
    r"\s*SIP\s*/\s*2\.0\s*/\s*([A-Za-z0-9.!%*_+`'~-]+)\s+"
    r"(\[[^\]]*\]|[^\s:;\[\]]+)(?:\s*:\s*(\d+))?\s*(;.*)?\s*$",
    re.S | re.I | re.ASCII,
)


_VIA_PROTOCOLS: Final = {
    f"SIP/2.0/{t}": t for t in ("UDP", "TCP", "TLS", "SCTP", "TLS-SCTP", "WS", "WSS")
}
"""The sent-protocol as nearly every Via spells it: no LWS, upper case."""


_VIA_CACHE: Final[dict[str, Via]] = {}
"""Recently parsed Via values by their text. A call's Vias come back in every response to
each of its requests (and the proxy reads the one below its own), so most parses are of a
text seen moments before."""
_VIA_CACHE_SIZE: Final = 4096


_VIA_BASES: Final[dict[str, tuple[str, str, int | None]]] = {}
"""The sent-protocol and sent-by (transport, host, port) the short cut of ``_parse_via`` read
from the text before a Via's first ';', by that text. A caller's requests each carry a new
branch, so their whole Via is never seen twice, but what comes before the parameters repeats
in every request from that caller: only the parameters are read again."""
_VIA_BASES_SIZE: Final = 1024


def parse_via(text: str) -> Via:
    """Parse one Via value: ``SIP/2.0/UDP host[:port];params`` (LWS allowed, RFC 3261 §25).

    Raises:
        MalformedMessage: not a Via, or a port out of range.
    """
    via = _VIA_CACHE.get(text)
    if via is None:
        via = _parse_via(text)
        if len(text) <= _URI_CACHE_LENGTH:
            if len(_VIA_CACHE) >= _VIA_CACHE_SIZE:
                _VIA_CACHE.clear()  # bounded, as the URI cache is
            _VIA_CACHE[text] = via
    return via


_VIA: Final = Via
"""The class, as a final name: compiled, that is a C static, where the class's own name is
looked up in the module's dictionary at each call."""


def new_via(transport: str, host: str, port: int | None, params: Params, raw: str) -> Via:
    """What ``Via(transport, host, port, params, raw)`` builds, without the Python-level
    ``__new__`` a NamedTuple is given (as ``_name_addr``): half the cost."""
    return _TUPLE_NEW(_VIA, (transport, host, port, params, raw))


def remember_via(via: Via) -> None:
    """Put a Via this element wrote itself into the cache, as ``parse_via(via.raw)`` would
    have found it: every response to the request it tops brings it back, and is then read
    with a dictionary lookup rather than a parse. The caller builds ``via`` to be exactly
    what the parse gives (tests/unit/sip/test_message.py checks that it is)."""
    text = via.raw
    if len(text) <= _URI_CACHE_LENGTH:
        if len(_VIA_CACHE) >= _VIA_CACHE_SIZE:
            _VIA_CACHE.clear()
        _VIA_CACHE[text] = via


def _parse_via(text: str) -> Via:
    """A Via written as nearly all are (``SIP/2.0/UDP``, one space, no LWS after it, no IPv6
    reference) is cut with string methods; anything else, and anything the short cut cannot
    vouch for, goes through the full expression, so both give the same answer.
    """
    parts = None
    if _VIA_PARTS is not None:
        parts = _VIA_PARTS(text)  # the short cut below, native: the same answer for ASCII text
        if parts is None and text.isascii():
            return _parse_via_fully(text)
    if parts is None:
        parts = _via_parts(text)
    if parts is not None:
        return new_via(parts[0], parts[1], parts[2], parts[3], text)
    return _parse_via_fully(text)


def _via_parts(text: str) -> tuple[str, str, int | None, Params] | None:
    """(transport, host, port, params) of a Via written the common way, by the short cut;
    None for anything else."""
    # Cut with find() and slices, native operations once compiled (partition builds tuples).
    first_semi = text.find(";")
    if first_semi > 0:
        base = _VIA_BASES.get(text[:first_semi])
        if base is not None:
            # The text before the ';' passed the short cut below before, so only what the
            # short cut checks of the rest is left to check here: no whitespace.
            tail = text[first_semi + 1 :]
            words = tail.split()
            if len(words) == 1 and len(words[0]) == len(tail):
                return base[0], base[1], base[2], _split_params(tail)
    space = text.find(" ")
    transport = _VIA_PROTOCOLS.get(text[:space]) if space > 0 else None
    if transport is None:
        return None
    rest = text[space + 1 :]
    # No whitespace of any kind left: split() finds none when its one part is all of
    # ``rest`` (compiled, split() is a native call where isprintable() is a generic one). It
    # counts more characters as whitespace than the expression's ASCII \s does, so it sends
    # more to the expression, never fewer; a control character, which neither counts, reads
    # the same either way.
    words = rest.split()
    if len(words) != 1 or len(words[0]) != len(rest):
        return None
    semi = rest.find(";")
    hostport = rest if semi < 0 else rest[:semi]
    ptext = "" if semi < 0 else rest[semi + 1 :]
    colon = hostport.find(":")
    host = hostport if colon < 0 else hostport[:colon]
    if not host or "[" in hostport or "]" in hostport:
        return None
    sent_port: int | None = None
    if colon >= 0:
        port_text = hostport[colon + 1 :]
        if len(port_text) < 5:
            number = short_uint(port_text)
            sent_port = number if number >= 0 else None
        else:
            sent_port = bounded_uint(port_text, MAX_PORT)
        if sent_port is None:
            return None
    host = host.lower()
    if semi >= 0:
        if len(_VIA_BASES) >= _VIA_BASES_SIZE:
            _VIA_BASES.clear()  # bounded, as the Via cache is
        _VIA_BASES[text[: space + 1 + semi]] = (transport, host, sent_port)
    return transport, host, sent_port, _split_params(ptext)


def _parse_via_fully(text: str) -> Via:
    m = _VIA_RE.match(text)
    if m is None:
        raise MalformedMessage(f"bad Via {text[:80]!r}")
    # The optional groups are None when absent: names of their own, typed so, since the
    # short cut's names above are plain strings.
    sent_transport: str = m.group(1)
    sent_host: str = m.group(2)
    port_group: str | None = m.group(3)
    params_group: str | None = m.group(4)
    if sent_host.startswith("["):
        sent_host = sent_host[1:-1]
    port = bounded_uint(port_group, MAX_PORT) if port_group else None
    if port_group and port is None:
        raise MalformedMessage(f"bad port in Via {text[:80]!r}")
    params = _split_params(params_group[1:] if params_group else "")
    return new_via(sent_transport.upper(), sent_host.lower(), port, params, text)
