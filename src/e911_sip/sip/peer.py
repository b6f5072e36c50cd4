"""Where a message came from or goes to, as plain values (no sockets)."""

from __future__ import annotations

from typing import Final, NamedTuple

from e911_sip.sip.errors import UnsupportedUriScheme
from e911_sip.sip.numbers import MAX_PORT, bounded_uint
from e911_sip.sip.uri import Uri, Via, param_of

DEFAULT_PORTS: Final = {"udp": 5060, "tcp": 5060, "tls": 5061}

_TUPLE_NEW: Final = tuple.__new__
"""As in :mod:`e911_sip.sip.uri`: a plain call, where ``tuple.__new__(...)`` compiled looks
the method up on the type each time."""


class Peer(NamedTuple):
    """A transport address, plus the stream connection a message arrived on, if any."""

    transport: str
    """Lower-case transport: ``udp``, ``tcp`` or ``tls``."""
    host: str
    """IP address or host name (IPv6 without brackets)."""
    port: int
    connection: int | None = None
    """Identifier of an existing stream connection to reply on (RFC 3261 §18.2.2); None for
    datagrams and for new outbound connections."""

    @property
    def reliable(self) -> bool:
        """True for stream transports: no retransmission timers (RFC 3261 §17)."""
        return self.transport != "udp"

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.transport}:{host}:{self.port}"


def peer_for_uri(uri: Uri) -> Peer:
    """The next-hop address of a SIP URI (RFC 3263 without DNS: host, port, transport).

    Raises:
        UnsupportedUriScheme: a tel or urn URI, which names no host to send to.
    """
    if uri.scheme not in ("sip", "sips"):
        raise UnsupportedUriScheme(f"no host to send to in a {uri.scheme} URI")
    transport = uri.transport
    if transport not in DEFAULT_PORTS:
        transport = "udp"
    port = uri.port or DEFAULT_PORTS[transport]
    return Peer(transport, uri.host, port)


def response_peer(via: Via, source: Peer) -> Peer:
    """Where a response to a request with top Via ``via`` goes (RFC 3261 §18.2.2, RFC 3581).

    Stream requests are answered on their own connection; datagrams go to ``received`` /
    ``rport`` when present, else to the sent-by address.
    """
    if source.connection is not None:
        return source
    # param_of and _peer, not via.param() and Peer(): compiled, a NamedTuple's method is a
    # generic call, and its constructor a Python-level __new__.
    params = via.params
    rport = param_of(params, "rport")
    if rport == "":
        # RFC 3581 §4: a request asking for rport is answered to where it came from, even
        # when nothing stamped its Via (a reply built straight from a message that failed
        # to parse).
        return _peer(source.transport, source.host, source.port)
    host = param_of(params, "received") or via.host
    # A port outside 1-65535 cannot be sent to: such an rport is ignored (RFC 3581 §4).
    port = bounded_uint(rport, MAX_PORT) if rport else None
    if port:
        return _peer(source.transport, host, port)
    return _peer(source.transport, host, via.port or DEFAULT_PORTS.get(source.transport, 5060))


_PEER: Final = Peer
"""The class as a final name: compiled, a C static, where ``Peer`` is looked up in the
module's dictionary at each call (as ``uri._VIA``)."""


def _peer(transport: str, host: str, port: int) -> Peer:
    """``Peer(transport, host, port)`` without the Python-level ``__new__`` a NamedTuple is
    given (as ``uri.new_via``)."""
    return _TUPLE_NEW(_PEER, (transport, host, port, None))
