"""The header changes RFC 3261 §16 obliges a proxy to make, and nothing else.

Each function takes a request and returns a new one: Max-Forwards (§16.6 step 3), the
received/rport parameters of the top Via (§18.2.1, RFC 3581), our own Via with a fresh
``z9hG4bK`` branch (§16.6 step 8), Record-Route (§16.6 step 4) and loose routing (§16.4).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Final, overload

from e911_sip.sip.errors import SipError, TooManyHops
from e911_sip.sip.message import Edit, Request
from e911_sip.sip.peer import DEFAULT_PORTS, Peer
from e911_sip.sip.uri import (
    Uri,
    new_via,
    param_of,
    parse_name_addr,
    parse_uri,
    remember_via,
    split_values,
)

MAGIC_COOKIE: Final = "z9hG4bK"
DEFAULT_MAX_FORWARDS: Final = 70
DIALOG_CREATING: Final = frozenset({"INVITE", "SUBSCRIBE", "REFER"})
DIALOG_STAMP_PARAM: Final = "dlg"
"""The Record-Route URI parameter that carries a dialog's stamp."""
STAMP_MARK: Final = f";{DIALOG_STAMP_PARAM}="
"""Where a dialog stamp starts in a Record-Route or Route value."""


@dataclass(frozen=True, slots=True)
class LocalAddress:
    """An address the proxy listens on and advertises in Via and Record-Route."""

    transport: str
    """``udp``, ``tcp`` or ``tls``."""
    host: str
    """Advertised host (an IP address peers can reach)."""
    port: int
    # Derived once, when the address is made (it is immutable): every Via and Record-Route
    # of ours is written for one of a few addresses, many times a second.
    via_transport: str = field(init=False, repr=False, compare=False)
    """The transport as our Via's sent-protocol spells it (upper case)."""
    via_host: str = field(init=False, repr=False, compare=False)
    """The host as a parse of our Via reads it (lower case, without IPv6 brackets)."""
    via_prefix: str = field(init=False, repr=False, compare=False)
    """Our Via's value up to its branch: ``SIP/2.0/UDP host:port;branch=``."""
    route_prefix: str = field(init=False, repr=False, compare=False)
    """Our Record-Route value up to its stamp: ``<sip:host:port;lr`` (no ``>``)."""

    def __post_init__(self) -> None:
        transport = self.transport.upper()
        hostport = self.hostport
        suffix = "" if self.transport == "udp" else f";transport={self.transport}"
        # object.__setattr__: the dataclass is frozen.
        object.__setattr__(self, "via_transport", transport)
        object.__setattr__(self, "via_host", self.host.lower())
        object.__setattr__(self, "via_prefix", f"SIP/2.0/{transport} {hostport};branch=")
        object.__setattr__(self, "route_prefix", f"<sip:{hostport}{suffix};lr")

    @property
    def hostport(self) -> str:
        """``host:port`` with IPv6 brackets."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def record_route(self, stamp: str | None = None) -> str:
        """Our Record-Route value for this transport, always loose (``;lr``), with the
        dialog's stamp (:meth:`BranchFactory.dialog_stamp`) when given."""
        if stamp is None:
            return f"{self.route_prefix}>"
        return f"{self.route_prefix}{STAMP_MARK}{stamp}>"


_URLSAFE: Final = bytes.maketrans(b"+/", b"-_")


_B2A: Final = binascii.b2a_base64
"""Taken from its module once: compiled, ``binascii.b2a_base64`` is an attribute lookup."""


def _b64(data: bytes) -> str:
    """``base64.urlsafe_b64encode(data)`` as text, without its two Python-level calls."""
    return _B2A(data, newline=False).translate(_URLSAFE).decode("ascii")


class Tokens:
    """Unpredictable tokens for branches and tags (RFC 3261 §8.1.1.7, §19.3).

    Each token is 96 bits from an injected entropy function (``os.urandom`` in the product, a
    seeded generator in tests), read in blocks so the message path makes one system call per
    few hundred tokens. Nothing in a token reveals process state: a peer that sees every
    branch and tag we write can neither guess the next one nor tell two processes apart,
    so it cannot forge a response to a transaction it did not see.
    """

    __slots__ = ("_entropy", "_block", "_offset")

    _SIZE = 12
    _BLOCK = 4092  # a multiple of _SIZE

    def __init__(self, entropy: Callable[[int], bytes]) -> None:
        self._entropy = entropy
        self._block = b""
        self._offset = 0

    def raw(self, size: int) -> bytes:
        """``size`` fresh random bytes."""
        if size > self._BLOCK:
            return self._entropy(size)
        if self._offset + size > len(self._block):
            self._block = self._entropy(self._BLOCK)
            self._offset = 0
        start = self._offset
        self._offset = start + size
        return self._block[start : self._offset]

    def token(self) -> str:
        """16 URL-safe characters (all of them SIP ``token`` characters)."""
        return _b64(self.raw(self._SIZE))


# The blake2s methods taken from the type once: compiled, ``keyed.copy()`` is a method call
# that looks the name up on the object's type each time, and calling these is a plain call.
_COPY: Final = hashlib.blake2s.copy
_UPDATE: Final = hashlib.blake2s.update
_DIGEST: Final = hashlib.blake2s.digest


class BranchFactory:
    """``z9hG4bK`` branches (RFC 3261 §8.1.1.7): random per client transaction, and keyed
    digests of the incoming branch for requests forwarded without a transaction; the To
    tags of the responses the proxy makes itself; and the stamps in our Record-Route.

    Everything it makes carries a digest keyed with ``key``, so the maker is recognised later
    without any state: a response to a branch of ours (:meth:`is_local_branch`), an ACK to a
    response of ours (:meth:`is_local_tag`), a trunk's request in a dialog we routed
    (:meth:`dialog_stamp`). Processes given the same key recognise each other's: the workers
    of one edge (a dead worker's calls are finished by the others), or an edge restarted
    with its key from a file. Nobody without the key can make one.
    """

    __slots__ = ("_tokens", "_keyed")

    def __init__(self, tokens: Tokens, key: bytes | None = None) -> None:
        self._tokens = tokens
        secret = tokens.raw(32) if key is None else hashlib.blake2s(key).digest()
        # Keyed once per digest size and copied per use: setting a key up costs a block
        # compression, about half of a short digest's time.
        self._keyed = {size: hashlib.blake2s(digest_size=size, key=secret) for size in (6, 9, 12)}

    def _digest(self, data: bytes, size: int) -> bytes:
        keyed = _COPY(self._keyed[size])
        _UPDATE(keyed, data)
        return _DIGEST(keyed)

    def new(self) -> str:
        """A branch never handed out before, that no peer can predict: 96 random bits and a
        48-bit keyed digest of them."""
        nonce = self._tokens.raw(12)
        token = _b64(nonce + self._digest(nonce, 6))
        return f"{MAGIC_COOKIE}{token}"

    def is_local_branch(self, branch: str | None) -> bool:
        """True when ``branch`` came from :meth:`new` of a factory with our key."""
        if branch is None or len(branch) != 31 or not branch.startswith(MAGIC_COOKIE):
            return False
        return self._verify(branch[7:], 12)

    def tag(self) -> str:
        """A To tag for a response made here (RFC 3261 §19.3): 48 random bits and a 48-bit
        keyed digest of them, so :meth:`is_local_tag` recognises it later without keeping any
        state, and nobody without the key can make one.

        In lowercase hex, as the dialog stamp is: base64's mixed case can spell a header
        name, and a parser that finds the CSeq by searching the text for ``CSeq`` (SIPp's
        method check does) takes a tag that spells it for the header and fails the call.
        """
        nonce = self._tokens.raw(6)
        return (nonce + self._digest(nonce, 6)).hex()

    def is_local_tag(self, tag: str | None) -> bool:
        """True when ``tag`` came from :meth:`tag` of a factory with our key (an ACK for a
        final response we made with no transaction to absorb it, a 503 when shedding load).
        The base64 tags of earlier releases are still recognised, for the ACKs that reach
        an upgraded process."""
        if tag is None:
            return False
        if len(tag) == 24:
            try:
                raw = bytes.fromhex(tag)
            except ValueError:
                return False
            if raw.hex() != tag:
                return False  # only the form tag() writes: lowercase, no spaces
            return self._signed(raw, 6)
        if len(tag) != 16:
            return False
        return self._verify(tag, 6)

    def _verify(self, token: str, size: int) -> bool:
        try:
            raw = base64.urlsafe_b64decode(token.encode("ascii"))
        except (ValueError, UnicodeEncodeError):
            return False
        return self._signed(raw, size)

    def _signed(self, raw: bytes, size: int) -> bool:
        """True when ``raw`` is ``size`` bytes and their 6-byte keyed digest."""
        if len(raw) != size + 6:
            return False
        return hmac.compare_digest(raw[size:], self._digest(raw[:size], 6))

    def stateless(self, request: Request) -> str:
        """The branch for a request forwarded without a transaction (ACK for 2xx, stray CANCEL).

        It is derived from the incoming top Via branch (RFC 3261 §16.11), so a retransmission
        gets the same branch again; the digest is keyed, so the branch tells a peer nothing it
        could use to match or forge anything.
        """
        # param_of, not the property: compiled, a NamedTuple's property is a generic lookup.
        top = param_of(request.top_via.params, "branch") or request.call_id
        digest = self._digest(f"{top}|{request.method}".encode(), 12)
        return f"{MAGIC_COOKIE}{_b64(digest)}"

    def dialog_stamp(self, call_id: str, *, emergency: bool) -> str:
        """The value of our Record-Route's ``dlg`` parameter for the dialog ``call_id``.

        The trunk's requests in the dialog carry it back in their Route: with it any process
        holding the key knows the dialog went through us to a trunk, and whether it is an
        emergency call, when the table of trunk dialogs does not (another worker's dialog, or
        one from before a restart). 72 bits: a trunk cannot make one for a Call-ID it was
        never sent.
        """
        kind = "e" if emergency else "o"
        return kind + self._stamp_digest(kind, call_id).hex()

    def _stamp_digest(self, kind: str, call_id: str) -> bytes:
        return self._digest(f"{kind}|{call_id}".encode(), 9)

    def check_dialog_stamp(self, call_id: str, stamp: str) -> bool | None:
        """Whether ``stamp`` marks an emergency dialog (True) or another one (False), or None
        when it is not :meth:`dialog_stamp` of ``call_id`` under our key.

        The stamp was base64 before it was hex (``Record-Route`` goes back to the caller in
        every response, and base64 can spell ``CSeq``: see :meth:`tag`); that form is still
        recognised, so the calls an earlier release set up end through an upgraded one.
        """
        size = len(stamp)
        if (size != 19 and size != 13) or stamp[0] not in "eo":
            return None
        kind = stamp[0]
        emergency = kind == "e"
        digest = self._stamp_digest(kind, call_id)
        expected = kind + (digest.hex() if size == 19 else _b64(digest))
        if not hmac.compare_digest(stamp.encode("ascii", "replace"), expected.encode("ascii")):
            return None
        return emergency


@overload
def decrement_max_forwards(request: Request) -> Request: ...
@overload
def decrement_max_forwards(request: Edit[Request]) -> Edit[Request]: ...
def decrement_max_forwards(request: Request | Edit[Request]) -> Request | Edit[Request]:
    """Max-Forwards minus one, or 70 when absent (§16.6 step 3).

    Raises:
        TooManyHops: it was already 0 (the caller answers 483, §16.3 step 3).
        MalformedMessage: it is not a number.
    """
    hops = request.max_forwards if isinstance(request, Request) else request.message.max_forwards
    if hops is None:
        return request.append("Max-Forwards", str(DEFAULT_MAX_FORWARDS))
    if hops <= 0:
        raise TooManyHops("Max-Forwards reached 0")
    return request.replace_at("max-forwards", str(min(hops - 1, 255)))


def stamp_received(request: Request, source: Peer) -> Request:
    """Add ``received`` / fill ``rport`` on the top Via (§18.2.1, RFC 3581 §4)."""
    via = request.top_via
    rport = param_of(via.params, "rport")  # not via.param(): a generic call compiled
    needs_received = via.host != source.host
    needs_rport = rport == ""
    if not needs_received and not needs_rport:
        return request
    params: list[str] = []
    for name, value in via.params:
        if name == "received":
            continue
        if name == "rport":
            params.append(f"rport={source.port}" if needs_rport else f"rport={value}")
        else:
            params.append(name if value is None else f"{name}={value}")
    if needs_received or needs_rport:
        params.append(f"received={source.host}")
    host = f"[{via.host}]" if ":" in via.host else via.host
    sent_by = host if via.port is None else f"{host}:{via.port}"
    new_top = f"SIP/2.0/{via.transport} {sent_by};{';'.join(params)}"
    first = request.get("via") or ""
    rest = split_values(first)[1:]
    value = ", ".join([new_top, *rest])
    stamped = request.replace_at("via", value)
    return stamped


@overload
def add_via(
    request: Request, local: LocalAddress, branch: str, *, answered: bool = True
) -> Request: ...
@overload
def add_via(
    request: Edit[Request], local: LocalAddress, branch: str, *, answered: bool = True
) -> Edit[Request]: ...
def add_via(
    request: Request | Edit[Request], local: LocalAddress, branch: str, *, answered: bool = True
) -> Request | Edit[Request]:
    """Our Via on top, asking for rport so replies find us through NAT (RFC 3581).

    ``answered``: responses will come back with it (not so for an ACK).
    """
    value = own_via(local, branch, answered=answered)
    # One branch per concrete class: compiled, a call through a union (or a Protocol) is
    # a generic method call, and on a known class a native one.
    if isinstance(request, Request):
        return request.prepend("Via", value)
    return request.prepend("Via", value)


def own_via(local: LocalAddress, branch: str, *, answered: bool = True) -> str:
    """The value of our Via for ``branch``. When ``answered`` it is also put, parsed, into
    the Via cache: the responses to the request come back with it on top, and their parse
    then finds it there."""
    text = f"{local.via_prefix}{branch};rport"
    host = local.via_host
    if answered and ":" not in host:
        # An IPv6 host is left to the parser, which takes its brackets off.
        remember_via(
            new_via(
                local.via_transport, host, local.port, (("branch", branch), ("rport", None)), text
            )
        )
    return text


@overload
def add_record_route(
    request: Request, inbound: LocalAddress, outbound: LocalAddress, stamp: str | None = None
) -> Request: ...
@overload
def add_record_route(
    request: Edit[Request],
    inbound: LocalAddress,
    outbound: LocalAddress,
    stamp: str | None = None,
) -> Edit[Request]: ...
def add_record_route(
    request: Request | Edit[Request],
    inbound: LocalAddress,
    outbound: LocalAddress,
    stamp: str | None = None,
) -> Request | Edit[Request]:
    """Record-Route so in-dialog requests come back through us (§16.6 step 4).

    When the two sides use different transports, two entries are written (RFC 5658 §3.2):
    each side of the dialog then reaches us on its own transport. Both carry ``stamp``.
    """
    first = inbound.record_route(stamp)
    # identity first: == is a generic call
    second = None if outbound is inbound or outbound == inbound else outbound.record_route(stamp)
    # One branch per concrete class, as in add_via.
    if isinstance(request, Request):
        out = request.prepend("Record-Route", first)
        return out if second is None else out.prepend("Record-Route", second)
    edit = request.prepend("Record-Route", first)
    return edit if second is None else edit.prepend("Record-Route", second)


def route_stamp(route: str) -> str | None:
    """The dialog stamp in one Route value written from our Record-Route, if any."""
    start = route.find(STAMP_MARK)
    if start < 0:
        return None
    start += len(STAMP_MARK)
    end = start
    while end < len(route) and route[end] not in ";>":
        end += 1
    return route[start:end]


def is_local_uri(uri: Uri, locals_: Iterable[LocalAddress]) -> bool:
    """True when ``uri`` names one of our listening addresses (§16.4)."""
    if uri.scheme not in ("sip", "sips"):
        return False
    for local in locals_:
        if uri.host != local.host:
            continue
        port = uri.port or DEFAULT_PORTS.get(uri.transport, 5060)
        if port == local.port:
            return True
    return False


def own_routes(locals_: tuple[LocalAddress, ...]) -> frozenset[str]:
    """Our Record-Route values exactly as written (unstamped), each one that
    :func:`is_local_uri` finds ours: :func:`pop_own_routes` recognises a top Route spelled
    so without parsing it. Computed once per proxy, not per request."""
    return frozenset(
        value
        for value in [local.record_route() for local in locals_]
        if is_local_uri(parse_uri(parse_name_addr(value).uri), locals_)
    )


def pop_own_routes(
    edit: Edit[Request],
    locals_: tuple[LocalAddress, ...],
    own: frozenset[str] | None = None,
) -> str | None:
    """Remove, in place, the Route values at the top that name us (§16.4; both of a double
    RR). Returns the value of the first Route header left, None when none is: callers then
    ask :func:`next_hop` with it rather than reading the header again.

    ``own``: :func:`own_routes` of ``locals_``; a top Route spelled exactly as one of them
    (stamped or not) is popped without parsing it.
    """
    routes = edit.get("route")
    if routes is None:
        return None
    if own is not None:
        first = routes.split(",", 1)[0].strip()
        stamp = first.find(STAMP_MARK)
        if stamp > 0:
            first = first[:stamp] + ">"
        if first in own:
            edit.pop_first_value("route")
            routes = edit.get("route")
    while routes is not None:
        try:
            uri = parse_uri(parse_name_addr(split_values(routes)[0]).uri)
        except SipError:
            break
        if not is_local_uri(uri, locals_):
            break
        edit.pop_first_value("route")
        routes = edit.get("route")
    return routes


def next_hop(edit: Edit[Request], routes: str | None) -> Uri:
    """The URI the request goes to: the top Route if any, else the Request-URI (§16.6 step 6).

    ``routes``: what :func:`pop_own_routes` returned for ``edit``.

    Raises:
        MalformedMessage / UnsupportedUriScheme: the chosen URI is not routable.
    """
    if routes is not None:
        return parse_uri(parse_name_addr(split_values(routes)[0]).uri)
    return edit.message.request_uri
