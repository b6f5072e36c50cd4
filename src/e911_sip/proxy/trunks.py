"""Trunk health from OPTIONS probes, as a sans-IO record (Kamailio's dispatcher probing).

Theory of operation
-------------------
Without it, trunks are tried in configured order on every call, so a dead primary costs every
911 call the provisional timeout before the next trunk is tried. Here every probed trunk has
a state: *up* (the initial assumption) or *down*. The proxy core sends each probed trunk an
OPTIONS every ``interval`` seconds (RFC 3261 §11: any final response shows the trunk is
alive and reachable) and reports the outcome with :meth:`TrunkHealth.record`:

- a final response whose status is not in ``failure_statuses`` (408, 503: RFC 3261 §21.5.4
  says 503 means the server is temporarily unable to serve) is a success;
- no final response within ``timeout``, a transport error, or a status in
  ``failure_statuses`` is a failure.

``failures`` consecutive failures take an up trunk down; ``successes`` consecutive successes
bring a down trunk back up. :meth:`TrunkHealth.order` then lists the trunks that are up first,
then the ones that are down, each group in configured order. A down trunk is moved to the
end, never dropped: when every trunk is down, every one is still tried, in configured order,
because a probe can be wrong and a 911 call must be attempted wherever it might go through.

Calls feed the same counts (the core reports them): a call branch that ends in a transport
error, a transaction timeout or no provisional response in time is a failure; any response to
a call is a success. A trunk with probing off (``interval`` 0) is never marked down, by probes
or by calls: nothing would bring it back, so it keeps its configured place.

One probe per trunk is outstanding at a time: the next is due ``interval`` seconds after the
previous was sent, or as soon as its result is in if that took longer. Time is always passed
in (``now``); nothing here reads a clock or sends anything.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from e911_sip.proxy.routing import DEFAULT_MAX_FORWARDS, LocalAddress, add_via
from e911_sip.sip.message import Request, make_header
from e911_sip.sip.uri import Uri

__all__ = [
    "DEFAULT_FAILURE_STATUSES",
    "ProbeOptions",
    "TrunkChange",
    "TrunkHealth",
    "TrunkStatus",
    "build_probe",
]

DEFAULT_FAILURE_STATUSES = frozenset({408, 503})


@dataclass(frozen=True, slots=True, kw_only=True)
class ProbeOptions:
    """How one route's trunks are probed."""

    interval: float = 0.0
    """Seconds between OPTIONS probes to each trunk; 0 turns probing (and marking down) off."""
    timeout: float = 2.0
    """Seconds a probe has to get a final response before it counts as a failure."""
    failures: int = 2
    """Consecutive failures (probes or calls) that take an up trunk down."""
    successes: int = 1
    """Consecutive successes that bring a down trunk back up."""
    failure_statuses: frozenset[int] = DEFAULT_FAILURE_STATUSES
    """Final responses to a probe that count as a failure; any other final is a success."""

    def __post_init__(self) -> None:
        if self.interval < 0:
            raise ValueError(f"probe interval must not be negative, got {self.interval}")
        if not self.timeout > 0:
            raise ValueError(f"probe timeout must be positive, got {self.timeout}")
        if self.failures < 1 or self.successes < 1:
            raise ValueError("probe failures and successes must be at least 1")

    @property
    def enabled(self) -> bool:
        """True when the trunk is probed (and may be marked down)."""
        return self.interval > 0


@dataclass(frozen=True, slots=True)
class TrunkChange:
    """A trunk went up or down."""

    trunk: str
    up: bool
    reason: str
    """What decided it: ``ok`` (or a status) for up; ``timeout``, ``transport``,
    ``no_provisional`` or a status for down."""


@dataclass(frozen=True, slots=True)
class TrunkStatus:
    """A snapshot of one trunk's health, for readiness and logs."""

    trunk: str
    probed: bool
    up: bool
    since: float | None
    """When the trunk last changed state (the ``now`` of that report); None if it never did."""
    failures: int
    """Consecutive failures so far."""
    last_reason: str | None
    """The outcome of the last probe or call reported."""


class _Trunk:
    __slots__ = (
        "options",
        "up",
        "failures",
        "successes",
        "since",
        "last_reason",
        "next_probe",
        "probing",
        "sent_at",
    )

    def __init__(self, options: ProbeOptions) -> None:
        self.options = options
        self.up = True
        self.failures = 0
        self.successes = 0
        self.since: float | None = None
        self.last_reason: str | None = None
        # 0.0: the first probe is due at once, whatever the clock reads.
        self.next_probe: float | None = 0.0 if options.enabled else None
        self.probing = False
        self.sent_at = 0.0


@dataclass(slots=True)
class TrunkHealth:
    """The health of every configured trunk; one record per trunk URI."""

    trunks: Mapping[str, ProbeOptions]
    """Each trunk URI with the probe options of its route."""
    _state: dict[str, _Trunk] = field(init=False)

    def __post_init__(self) -> None:
        self._state = {trunk: _Trunk(options) for trunk, options in self.trunks.items()}

    # -- ordering ------------------------------------------------------------------------
    def order(self, trunks: Iterable[str]) -> list[str]:
        """``trunks`` with those that are up first, then those that are down, each group in
        the given order. Nothing is ever left out."""
        state = self._state
        ordered = list(trunks)
        down = [t for t in ordered if (s := state.get(t)) is not None and not s.up]
        if not down:
            return ordered
        return [t for t in ordered if t not in down] + down

    def is_up(self, trunk: str) -> bool:
        """False only for a trunk that probes or calls have marked down."""
        state = self._state.get(trunk)
        return state is None or state.up

    def status(self, trunk: str) -> TrunkStatus:
        """A snapshot of ``trunk``.

        Raises:
            KeyError: ``trunk`` is not configured.
        """
        s = self._state[trunk]
        return TrunkStatus(trunk, s.options.enabled, s.up, s.since, s.failures, s.last_reason)

    # -- probing -------------------------------------------------------------------------
    def next_probe(self) -> float | None:
        """The earliest time a probe is due, or None when none is (off, or all in flight)."""
        due = [s.next_probe for s in self._state.values() if s.next_probe is not None]
        return min(due) if due else None

    def due(self, now: float) -> list[str]:
        """The trunks to probe now, in configured order; each is then in flight until
        :meth:`record` is called for it."""
        out = []
        for trunk, s in self._state.items():
            if s.next_probe is not None and s.next_probe <= now:
                s.next_probe = None
                s.probing = True
                s.sent_at = now
                out.append(trunk)
        return out

    def probe_timeout(self, trunk: str) -> float:
        """Seconds a probe of ``trunk`` may take."""
        return self._state[trunk].options.timeout

    def is_failure_status(self, trunk: str, status: int) -> bool:
        """True when a probe's final ``status`` counts as a failure."""
        return status in self._state[trunk].options.failure_statuses

    def record(
        self, trunk: str, ok: bool, reason: str, now: float, *, probe: bool
    ) -> TrunkChange | None:
        """Count one outcome for ``trunk``: a probe's (``probe``) or a call's.

        Returns the change of state it caused, if any. Outcomes for trunks that are not
        configured or not probed change nothing.
        """
        s = self._state.get(trunk)
        if s is None or not s.options.enabled:
            return None
        if probe and s.probing:
            s.probing = False
            s.next_probe = max(s.sent_at + s.options.interval, now)
        s.last_reason = reason
        if ok:
            s.failures = 0
            s.successes += 1
            if not s.up and s.successes >= s.options.successes:
                s.up = True
                s.since = now
                return TrunkChange(trunk, True, reason)
            return None
        s.successes = 0
        s.failures += 1
        if s.up and s.failures >= s.options.failures:
            s.up = False
            s.since = now
            return TrunkChange(trunk, False, reason)
        return None


def build_probe(
    target: Uri,
    local: LocalAddress,
    *,
    branch: str,
    tag: str,
    user_agent: str | None,
) -> Request:
    """The OPTIONS that probes ``target`` (RFC 3261 §11.1), sent from ``local``.

    The Request-URI is the trunk's ``sip:host:port`` (with its transport parameter); the
    Call-ID and the From tag are fresh for each probe, derived from the unique ``branch``.
    """
    transport = target.param("transport")
    suffix = f";transport={transport}" if transport else ""
    ruri = f"sip:{target.hostport}{suffix}"
    headers = [
        make_header("Max-Forwards", str(DEFAULT_MAX_FORWARDS)),
        make_header("From", f"<sip:{local.hostport}>;tag={tag}"),
        make_header("To", f"<{ruri}>"),
        make_header("Call-ID", f"{branch}@{local.host}"),
        make_header("CSeq", "1 OPTIONS"),
    ]
    if user_agent:
        headers.append(make_header("User-Agent", user_agent))
    headers.append(make_header("Content-Length", "0"))
    return add_via(Request("OPTIONS", ruri, headers), local, branch)
