"""Emergency enrichment: request + provisioned location → the INVITE Bandwidth expects.

A pure function: it returns a new request and says what it changed; it never raises for
content it does not like (the caller forwards the original request if it ever does).

What is added (use scenario 1.6b; RFC 6442, RFC 3325, RFC 7090):
- ``Priority: emergency``, replacing any other Priority value (a ``psap-callback`` marking from a
  caller is not ours to honour, RFC 7090 §6).
- ``Geolocation: <{base}{provider_endpoint}>`` (location by reference: a proxy may not add a
  body, RFC 6881 §6.5). A Geolocation that came with the call is removed by default, with its
  Geolocation-Routing, whether or not the line has a record: a location the edge did not
  write is not vouched for, and Bandwidth reads one reference. Deployments whose devices send
  their own location (RFC 6442 UA-provided location) choose to have it replaced by ours, kept,
  or kept with ours appended last (RFC 6442 §3.2 prefers not touching it).
- ``Geolocation-Routing: no`` when we add a location and none is present; an existing one is
  never changed or duplicated (RFC 6442 §3.4).
- Exactly one ``P-Asserted-Identity`` whose sip URI carries the 10-digit callback number, and
  no ``P-Preferred-Identity`` (RFC 3325 §9.1). Bandwidth accepts a sip PAI only, never tel.

Everything else, the body, From, To and STIR/SHAKEN ``Identity`` included, is left as it came.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from e911_sip.policy.emergency import name_addr_uri
from e911_sip.sip.errors import SipError
from e911_sip.sip.message import Request


class ExistingGeolocation(StrEnum):
    """What to do with a Geolocation header the request already carries."""

    REMOVE = "remove"
    """Never pass on a location we did not write: the proxy core removes it (and its
    Geolocation-Routing) before enrichment, on every emergency call, located or not."""
    REPLACE = "replace"
    """Send only ours when we have one (the old value is reported so the edge can log it);
    without a record of ours, the caller's goes on."""
    KEEP = "keep"
    """Send theirs and do not add ours (RFC 6442 §3.2's "SHOULD NOT add")."""
    APPEND = "append"
    """Keep theirs and add ours after it (RFC 6442 §3.2: a new locationValue goes last)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class EnrichOptions:
    """How emergency INVITEs are enriched."""

    geolocation_base_url: str = "https://emergency.bandwidth.com/locations/"
    """Prefix of the location reference; ``provider_endpoint`` is appended to it."""
    existing_geolocation: ExistingGeolocation = ExistingGeolocation.REMOVE
    """Policy for a Geolocation that arrives with the call."""
    pai_domain: str | None = None
    """Host part of the P-Asserted-Identity we write; None takes the From URI's host."""
    fallback_domain: str = "localhost"
    """Host used when ``pai_domain`` is unset and From has no SIP host (a tel URI)."""


# Not frozen: one is made per emergency call, and a frozen dataclass sets each field through
# object.__setattr__ (a generic call per field in compiled code). Its __init__ is written out
# (dataclass keeps one the class defines): compiled, that one is native, where the one
# dataclass generates runs as Python.
@dataclass(slots=True)
class Enrichment:
    """The enriched request and what was done to it."""

    request: Request
    geolocation: str | None
    """The Geolocation value we added, None when none was added."""
    removed_geolocation: tuple[str, ...]
    """Geolocation values that arrived and were removed (REMOVE or REPLACE policy)."""
    callback: str | None
    """The 10-digit callback number written into P-Asserted-Identity, if any."""

    def __init__(
        self,
        request: Request,
        geolocation: str | None,
        removed_geolocation: tuple[str, ...],
        callback: str | None,
    ) -> None:
        self.request = request
        self.geolocation = geolocation
        self.removed_geolocation = removed_geolocation
        self.callback = callback


def _pai_host(request: Request, options: EnrichOptions) -> str:
    if options.pai_domain:
        return options.pai_domain
    try:
        uri = name_addr_uri(request.get("from") or "")
    except SipError:
        return options.fallback_domain
    if uri.scheme in ("sip", "sips") and uri.host:
        return f"[{uri.host}]" if ":" in uri.host else uri.host
    return options.fallback_domain


def enrich(
    request: Request,
    *,
    line: str | None,
    provider_endpoint: str | None,
    callback: str | None = None,
    options: EnrichOptions,
) -> Enrichment:
    """Add the emergency headers to ``request``.

    Args:
        line: the caller's 10-digit line, None when it could not be read.
        provider_endpoint: ``{bw_account_id}/{endpoint_id}`` from the location store, None
            when the line has no record (the call still goes out, without Geolocation).
        callback: the record's callback number when it differs from the line.
    """
    # One copy of the request for every change below (Message.edit), not one per change.
    out = request.edit().replace("Priority", "emergency")

    added: str | None = None
    removed: tuple[str, ...] = ()
    existing = out.get_all("geolocation")
    if existing and options.existing_geolocation is ExistingGeolocation.REMOVE:
        removed = tuple(existing)
        existing = []
        out.remove("geolocation").remove("geolocation-routing")
    if provider_endpoint:
        ours = f"<{options.geolocation_base_url}{provider_endpoint}>"
        if not existing:
            out.append("Geolocation", ours)
            added = ours
        elif options.existing_geolocation is ExistingGeolocation.REPLACE:
            removed = tuple(existing)
            out.replace("Geolocation", ours)
            added = ours
        elif options.existing_geolocation is ExistingGeolocation.APPEND:
            out.append("Geolocation", ours)
            added = ours
        if added is not None and not out.has("geolocation-routing"):
            out.append("Geolocation-Routing", "no")

    number = callback or line
    if number:
        out.replace("P-Asserted-Identity", f"<sip:{number}@{_pai_host(request, options)}>")
        out.remove("p-preferred-identity")
    return Enrichment(out.done(), added, removed, number)
