"""Who may ask the edge for what: the trust domain (RFC 3325 §2.3) as pure code.

Every message has a source address, and the address decides its trust level:

- ``SOFTSWITCH``: a network in ``[security] trusted_sources``. It is the trust domain: its
  initial requests are routed, and its P-Asserted-Identity, Privacy and Geolocation are
  believed (RFC 3325 §5, RFC 6442 §4).
- ``TRUNK``: the host of a configured trunk. Its responses are matched to the transactions
  sent to it, and its in-dialog requests are routed for dialogs that went through it; it may
  not start anything, and the identity and location headers it sends are removed.
- ``OUTSIDER``: anyone else. Nothing it sends is relayed, a 911 call included: Bandwidth's
  emergency trunk trusts the edge's address, so a path through the edge would be a free,
  unauthenticated path to a PSAP.

An address in both a trusted network and a trunk's host counts as the softswitch (the quick
start runs everything on 127.0.0.1).

The dialogs a trunk may send requests in are kept in :class:`TrunkDialogs`, a bounded
table: its size is a number an outsider cannot raise (only dialogs the softswitch started
and a trunk answered enter it), and emergency dialogs are evicted last.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from collections.abc import Iterable
from enum import IntEnum

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

LOOPBACK_SOURCES: tuple[IPNetwork, ...] = (
    ipaddress.ip_network("127.0.0.1/32"),
    ipaddress.ip_network("::1/128"),
)
"""The default trust domain: the quick start's softswitch runs on the same host."""

IDENTITY_HEADERS = (
    "p-asserted-identity",
    "p-preferred-identity",
    "privacy",
    "geolocation",
    "geolocation-routing",
    "geolocation-error",
)
"""Headers believed only from the trust domain, and removed from anything else we relay."""


def is_ip_address(host: str) -> bool:
    """True when ``host`` is an IP address literal (IPv6 with or without brackets)."""
    return _address(host) is not None


class Trust(IntEnum):
    """Trust level of a source address; higher is more trusted."""

    OUTSIDER = 0
    TRUNK = 1
    SOFTSWITCH = 2


def _address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        # A dual-stack socket reports IPv4 peers as ::ffff:a.b.c.d.
        return address.ipv4_mapped
    return address


class TrustPolicy:
    """Classifies source addresses; results are cached per address (bounded)."""

    __slots__ = ("_networks", "_trunks", "_cache", "_cache_size")

    def __init__(
        self,
        *,
        trusted_sources: Iterable[IPNetwork] = LOOPBACK_SOURCES,
        trunk_hosts: Iterable[str] = (),
        cache_size: int = 4096,
    ) -> None:
        self._networks = tuple(trusted_sources)
        self._trunks = frozenset(a for a in [_address(h) for h in trunk_hosts] if a is not None)
        self._cache: dict[str, Trust] = {}
        self._cache_size = cache_size

    def classify(self, host: str) -> Trust:
        """The trust level of a message from ``host`` (an IP address; a name is an outsider)."""
        level = self._cache.get(host)
        if level is not None:
            return level
        address = _address(host)
        if address is None:
            level = Trust.OUTSIDER
        elif any(address in network for network in self._networks):
            level = Trust.SOFTSWITCH
        elif address in self._trunks:
            level = Trust.TRUNK
        else:
            level = Trust.OUTSIDER
        if len(self._cache) >= self._cache_size:
            # Outsiders choose their addresses; a full cache is simply started again.
            self._cache.clear()
        self._cache[host] = level
        return level

    def is_trusted(self, host: str) -> bool:
        """True for the softswitch (the trust domain)."""
        return self.classify(host) is Trust.SOFTSWITCH

    def may_receive(self, host: str) -> bool:
        """True when a request may be relayed to ``host``: the softswitch or a trunk."""
        return self.classify(host) is not Trust.OUTSIDER


class TrunkDialogs:
    """Dialogs a trunk answered, by Call-ID: the in-dialog requests it may send.

    Bounded in count; the least recently used non-emergency dialog goes first when full,
    then the least recently used emergency one. Entries also age out after ``max_age``
    seconds without a message, so a dialog whose BYE was never seen does not stay forever.
    """

    __slots__ = ("_emergency", "_other", "_max_entries", "_max_age", "evicted")

    def __init__(self, *, max_entries: int = 100_000, max_age: float = 14_400.0) -> None:
        self._emergency: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self._other: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self._max_entries = max_entries
        self._max_age = max_age
        self.evicted = 0
        """Dialogs dropped to stay within ``max_entries`` (a metric)."""

    def __len__(self) -> int:
        return len(self._emergency) + len(self._other)

    def add(self, call_id: str, trunk_host: str, now: float, *, emergency: bool) -> None:
        """Remember that ``trunk_host`` answered the dialog ``call_id``."""
        table = self._emergency if emergency else self._other
        table[call_id] = (trunk_host, now)
        table.move_to_end(call_id)
        self._expire(now)
        while len(self) > self._max_entries:
            victim = self._other if self._other else self._emergency
            victim.popitem(last=False)
            self.evicted += 1

    def allows(self, call_id: str, host: str, now: float) -> bool:
        """True when ``host`` answered the dialog ``call_id``; refreshes its age."""
        for table in (self._emergency, self._other):
            entry = table.get(call_id)
            if entry is not None:
                if entry[0] != host or now - entry[1] > self._max_age:
                    return False
                table[call_id] = (host, now)
                table.move_to_end(call_id)
                return True
        return False

    def end(self, call_id: str) -> None:
        """The dialog ended (its BYE was answered)."""
        self._emergency.pop(call_id, None)
        self._other.pop(call_id, None)

    def _expire(self, now: float) -> None:
        limit = now - self._max_age
        for table in (self._emergency, self._other):
            while table:
                _, (_, seen) = next(iter(table.items()))
                if seen >= limit:
                    break
                table.popitem(last=False)
