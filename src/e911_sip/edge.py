"""The edge: the asyncio orchestrator around the sans-IO proxy core.

Theory of operation
-------------------
Transports hand every message to :meth:`Edge.message_received`, which feeds the core with
the loop's time and then *pumps*: it writes what the core queued (``data_to_send``), acts on
the core's events (``next_event``) and arms a single ``loop.call_at`` for ``get_timer()``.
That is the whole adapter; every SIP rule lives in the core (RFC 3261 §16, §17).

Emergency INVITEs are the one place the edge adds behaviour. The core reports each as an
:class:`~e911_sip.proxy.core.EmergencyCall` and waits. The edge reads the caller's line (PAI,
else From), looks the line up (:mod:`e911_sip.store.resilient`: a timeout, a cache and a
cool-down in front of the store), enriches the request (:mod:`e911_sip.policy.enrich`) and
hands it back with ``forward_emergency``. An in-memory store answers at once, so the INVITE
leaves in the same turn of the loop that received it; a Redis lookup runs in a task while the
loop serves other messages. The INVITE is with the transport before anything else is done
about the call (its record, counters, log lines, notification), and the core sends the
caller's 100 Trying after it. Any exception on that path sends the original
request instead, and the core itself forwards the original if no answer comes within its
fail-open deadline (RFC 6881 §6: the call must go through). Every outcome is counted, and
the ones that lose location are logged at WARNING or above with the Call-ID and the caller.

Trunk health is the core's (OPTIONS probes, :mod:`e911_sip.proxy.trunks`); the edge reports
it: a log line when a trunk goes down (WARNING) or comes back (INFO), the
``e911_sip_trunk_up`` gauge, probe counters, and each trunk's state in ``/readyz``. A down
trunk does not make the edge unready: it is still tried, last.
Overload (``docs/operations.md``): the UDP adapter serves emergency INVITEs first and
publishes its queue depth on a :class:`~e911_sip.proxy.admission.LoadSignal`;
:meth:`Edge.monitor_load` adds the event loop's lag, and the core reads the signal to refuse
new non-emergency requests with a stateless 503. What a peer can trigger once per message
(discarded, refused, delivery failures) is logged through a rate limiter: a flood writes a
counted summary every ten seconds, not a line per datagram.

Every log line about an emergency call carries the same fields (call_id, caller, number,
outcome, enriched, trunk, attempt) from one record per call (``_Call``), kept from the
core's ``EmergencyCall`` to the final response's ``CallCompleted``: one per emergency
context the core holds (only the softswitch can start one), and an age bound forgets one
whose final response was never reported.

Shutdown drains: readiness turns false and OPTIONS addressed to us is answered 503, so the
softswitch moves new calls to another host; traffic keeps flowing (a call that still comes is
served) while a call needs this process: an emergency lookup running, an emergency INVITE
with no final response, an answered dialog (emergency or not) whose BYE must still be routed
through our Record-Route. Each kind is bounded by its own grace period; other transactions
are not waited for.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from e911_sip import logline
from e911_sip.batching import Pauses
from e911_sip.callrecords.recorder import CallRecorder
from e911_sip.logs import RateLimitedLog
from e911_sip.metrics import EMERGENCY_OUTCOMES, Children, Metrics
from e911_sip.notify.event import CallEvent
from e911_sip.policy.emergency import caller_line
from e911_sip.policy.enrich import Enrichment, EnrichOptions, enrich
from e911_sip.proxy.admission import LoadSignal, Priority
from e911_sip.proxy.core import (
    CallCompleted,
    Discarded,
    EmergencyCall,
    EmergencyForwarded,
    Event,
    Evicted,
    FailOpen,
    Failover,
    ProxyCore,
    Recovered,
    RequestRouted,
    Shed,
    TrunkProbed,
    TrunkStateChanged,
)
from e911_sip.sip.message import Request
from e911_sip.sip.peer import Peer
from e911_sip.store.base import LocationStore, MirroredLocationStore
from e911_sip.store.resilient import LookupResult, LookupSource, ResilientLookup
from e911_sip.transport.udp import UdpTransport, send_datagram

log = logging.getLogger("e911_sip.edge")

_KNOWN_METHODS = frozenset(
    {
        "INVITE", "ACK", "BYE", "CANCEL", "OPTIONS", "REGISTER", "PRACK", "UPDATE", "INFO",
        "SUBSCRIBE", "NOTIFY", "REFER", "MESSAGE", "PUBLISH",
    }
)  # fmt: skip

_OUTCOME_BY_SOURCE = {
    LookupSource.CACHE: "cached",
    LookupSource.NONE: "store_error",
    LookupSource.INVALID: "invalid_record",
}

_LOCATED = frozenset({"enriched", "cached"})
"""Outcomes with which the call carries a location the edge added."""

_CALL_MAX_AGE = 900.0
"""Seconds after which an emergency call with no final response seen is forgotten: Timer C
(three minutes, RFC 3261 §16.6 step 11) per trunk tried, with room to spare. Only a lost
event leaves one that long."""


class _Call:
    """One emergency call from its INVITE to its final response: the fields every log line
    about it carries (:meth:`fields`), and when it arrived."""

    __slots__ = (
        "call_id",
        "number",
        "caller",
        "outcome",
        "enriched",
        "trunk",
        "attempt",
        "received_at",
        "started",
    )

    def __init__(
        self, call_id: str, number: str | None, received_at: float, started: float
    ) -> None:
        self.call_id = call_id
        self.number = number
        self.caller: str | None = None
        self.outcome: str | None = None
        """The enrichment outcome once known (``enriched``, ``no_location``, ...)."""
        self.enriched = False
        """True when the INVITE carries a location the edge added (outcome enriched or
        cached and the edge's request went, not the original at the fail-open deadline)."""
        self.trunk: str | None = None
        self.attempt = 0
        self.received_at: float | None = received_at
        """Clock time the INVITE was received, until the first one leaves (enrich latency)."""
        self.started = started
        """Loop time the INVITE arrived (drain and the age bound)."""

    def fields(self, **more: object) -> dict[str, object]:
        """The call's log fields, the same keys on every line, plus ``more``."""
        out: dict[str, object] = {
            "call_id": self.call_id,
            "caller": self.caller,
            "number": self.number,
            "outcome": self.outcome,
            "enriched": self.enriched,
            "trunk": self.trunk,
            "attempt": self.attempt,
        }
        if more:
            out.update(more)
        return out


class Sender(Protocol):
    """A transport as the edge sees it."""

    def send(self, data: bytes, peer: Peer, branch: str | None) -> None:
        """Send ``data`` to ``peer``; failures come back through ``delivery_failed``."""
        ...

    @property
    def bound(self) -> bool:
        """True while the transport's socket is open."""
        ...


class Enricher(Protocol):
    """What enriches an emergency INVITE: :func:`e911_sip.policy.enrich.enrich`, or a
    replacement with its signature (a test's failing one exercises the fail-safe path)."""

    def __call__(
        self,
        request: Request,
        *,
        line: str | None,
        provider_endpoint: str | None,
        callback: str | None = None,
        options: EnrichOptions,
    ) -> Enrichment: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class EdgeOptions:
    """Behaviour of the edge around the core."""

    enrich: EnrichOptions = field(default_factory=EnrichOptions)
    """How emergency INVITEs are enriched."""
    store_check_interval: float = 1.0
    """Seconds between location store health checks."""
    drain_timeout: float = 30.0
    """Seconds a shutdown waits for transactions in flight."""
    emergency_drain_timeout: float = 7200.0
    """Seconds a shutdown waits for emergency dialogs that are still up."""
    emergency_dialog_max_age: float = 14400.0
    """Seconds after which an emergency dialog with no BYE seen is no longer waited for."""
    min_drain_time: float = 0.0
    """Seconds a shutdown keeps serving (and answering OPTIONS 503) even with nothing to
    wait for, so the softswitch's keepalive sees the 503 before the listener goes."""
    dialog_drain_timeout: float = 600.0
    """Seconds a shutdown waits for other (non-emergency) answered dialogs; 0: not waited
    for."""
    dialog_max_age: float = 14400.0
    """Seconds after which a non-emergency dialog with no BYE seen is no longer waited for."""
    max_dialogs: int = 200_000
    """Non-emergency dialogs remembered for a drain; past it the oldest is forgotten."""
    lag_interval: float = 0.05
    """Seconds between the event-loop lag measurements that feed overload control."""
    log_interval: float = 10.0
    """Seconds over which per-message log lines (discarded, shed) are summarised."""
    drain_log_interval: float = 5.0
    """Seconds between the log lines a drain writes about what it still waits for."""


_ENDED_MEMORY = 4096
"""Call-IDs of ended calls remembered, so a late hand-over does not bring one back."""


class Edge:
    """Feeds transports into the proxy core and carries out what it asks for."""

    def __init__(
        self,
        *,
        core: ProxyCore,
        store: LocationStore,
        lookup: ResilientLookup,
        metrics: Metrics,
        options: EdgeOptions,
        clock: Callable[[], float] = time.perf_counter,
        load: LoadSignal | None = None,
        recorder: CallRecorder | None = None,
        notify: Callable[[CallEvent], None] | None = None,
        enrich: Enricher | None = None,
    ) -> None:
        """``enrich`` replaces the enrichment policy (:func:`e911_sip.policy.enrich.enrich`
        by default); whatever it raises sends the original INVITE (``enrich_error``)."""
        self._core = core
        self._enrich = enrich
        """A replacement enrichment; None: the policy's own, called natively (compiled, a
        call through the ``Enricher`` protocol is generic, its keywords packed for Python)."""
        self._recorder = recorder
        self._notify = notify
        self._store = store
        self._lookup = lookup
        self._metrics = metrics
        self._options = options
        self._clock = clock
        self._loop = asyncio.get_running_loop()
        # Bound once: compiled, ``self._loop.time()`` looks the method up by name each time
        # (several times per message).
        self._loop_time: Callable[[], float] = self._loop.time
        self._transports: dict[str, Sender] = {}
        self._udp: UdpTransport | None = None
        """The ``udp`` transport when it is a :class:`UdpTransport` whose ``send`` is the
        class's own, sent on with :func:`send_datagram`. Compiled, a call through the
        ``Sender`` protocol is generic (a method looked up by name, a Python-level call);
        the function is a native one."""
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._calls: dict[str, _Call] = {}
        """Emergency calls whose final response has not gone upstream, by Call-ID."""
        self._request_counters: dict[tuple[str, str], Any] = {}
        self._outcomes = {name: metrics.emergency_calls.labels(name) for name in EMERGENCY_OUTCOMES}
        self._lookup_seconds = {
            source: metrics.store_lookup_seconds.labels(source.value) for source in LookupSource
        }
        # Labelled children bound once: ``.labels()`` per message costs a lock and a key.
        self._discarded = Children(metrics.discarded)
        self._delivery_failures = Children(metrics.delivery_failures)
        self._failovers = Children(metrics.failovers)
        self._probes = Children(metrics.trunk_probes)
        self._trunk_up = Children(metrics.trunk_up)
        self._results: dict[int, Any] = {}
        """Children of ``emergency_results`` by status class (``status // 100``)."""
        self._evicted = {
            kind: metrics.evicted.labels(kind) for kind in ("transactions", "contexts")
        }
        self._emergency_dialogs: dict[str, float] = {}
        self._dialogs: OrderedDict[str, float] = OrderedDict()
        """Answered non-emergency calls whose BYE has not been seen, by Call-ID, oldest
        first (loop time answered): a drain keeps routing their BYE. Ordered, not a dict:
        BYEs take calls out roughly oldest first, and a dict's ``next(iter())`` then scans
        every slot emptied at its front, so taking the oldest (pruning, or evicting with
        the table full) cost in proportion to the table's size, and pruning many at once
        in proportion to its square."""
        self._ended: dict[str, None] = {}
        """Call-IDs whose BYE was answered lately (a bounded memory, oldest first)."""
        self._dialogs_forgotten = {
            reason: metrics.dialogs_forgotten.labels(reason) for reason in ("max_age", "capacity")
        }
        metrics.dialogs.labels("emergency").set_function(lambda: len(self._emergency_dialogs))
        metrics.dialogs.labels("other").set_function(lambda: len(self._dialogs))
        self._now_received = 0.0
        self._pump_follows = False
        """A pump runs after the current code: a delivery failure reported while it sends
        leaves the core's new work to that pump instead of pumping in the middle of it."""
        self.draining = False
        self.store_ok = True
        if isinstance(store, MirroredLocationStore):
            mirrored = store
            metrics.location_records.set_function(lambda: mirrored.state().records)
            metrics.location_sync_age.set_function(lambda: mirrored.state().age)
            metrics.location_updates.set_function(lambda: mirrored.state().updates)
        metrics.transactions.set_function(lambda: core.transactions_in_flight)
        metrics.transactions_working.set_function(lambda: core.transactions_working)
        metrics.contexts.set_function(lambda: core.contexts_in_flight)
        self._trunk_routes: dict[str, list[str]] = {}
        for route, trunks in core.trunks_by_route.items():
            for trunk in trunks:
                self._trunk_routes.setdefault(trunk, []).append(route)
                self._trunk_up(trunk, route).set(1)
        self.load = load or LoadSignal(max_lag=float("inf"), max_queue=2**62)
        metrics.loop_lag.set_function(lambda: self.load.lag)
        metrics.queue_depth.set_function(lambda: self.load.queue_depth)
        self._shed_counters: dict[str, Any] = {}
        self._dropped = {p: metrics.queue_dropped.labels(p.name.lower()) for p in Priority}
        self._queue_full = metrics.shed.labels("queue_full")
        # A peer can make each of these happen once per message: a flood gets a counted
        # summary, not a line per datagram.
        interval = options.log_interval
        self._discard_log = RateLimitedLog(
            log, "message discarded", noun="messages discarded", interval=interval
        )
        self._recovered = {
            kind: metrics.recovered.labels(kind) for kind in ("trunk_dialog", "late_2xx")
        }
        self._recover_log = RateLimitedLog(
            log,
            "routed a call this process did not set up (another worker's, or from before a "
            "restart)",
            noun="messages routed without state",
            interval=interval,
            level=logging.WARNING,
        )
        self._shed_log = RateLimitedLog(
            log,
            "overloaded: request refused with 503",
            noun="requests refused with 503",
            interval=interval,
            level=logging.WARNING,
        )
        self._evict_log = RateLimitedLog(
            log,
            "evicted state at a table bound (finished transactions, or non-emergency state "
            "for an emergency call or a BYE)",
            noun="evictions",
            interval=interval,
            level=logging.WARNING,
        )
        self._delivery_log = RateLimitedLog(
            log,
            "delivery failed",
            noun="deliveries failed",
            interval=interval,
            level=logging.WARNING,
        )

    # -- wiring --------------------------------------------------------------------------
    def add_transport(self, name: str, transport: Sender) -> None:
        """Register the transport that sends messages for ``name`` (udp, tcp)."""
        self._transports[name] = transport
        if name == "udp":
            self._udp = None
            # A subclass that replaces ``send`` is called through it, as any transport.
            if isinstance(transport, UdpTransport) and type(transport).send is UdpTransport.send:
                self._udp = transport

    def start(self) -> None:
        """Begin the core's own work (the first trunk probes are due at once); call it once
        every transport is added, so that nothing goes out before a transport can carry it."""
        self._pump()

    @property
    def listeners_bound(self) -> bool:
        """True when every registered transport is open."""
        return bool(self._transports) and all(t.bound for t in self._transports.values())

    @property
    def emergency_dialogs(self) -> int:
        """Emergency calls answered through us whose BYE has not been seen."""
        return len(self._emergency_dialogs)

    # -- MessageSink ---------------------------------------------------------------------
    def message_received(self, data: bytes, source: Peer) -> None:
        """A transport delivered one message."""
        self._now_received = self._clock()
        try:
            self._core.receive(data, source, self._loop_time())
        except Exception:
            # The core answers or drops whatever a peer sends; reaching here is a bug. Keep
            # serving, and make it loud: the message is lost.
            self._discarded("internal_error").inc()
            log.exception("internal error handling a message", extra={"peer": str(source)})
        self._pump()

    def delivery_failed(self, branch: str | None, peer: Peer, reason: str) -> None:
        """A transport could not send; the core treats it as a transport error (§8.1.3.1)."""
        self._delivery_failures(peer.transport).inc()
        self._delivery_log.hit(peer.transport, lambda: {"peer": str(peer), "error": reason})
        if branch is not None:
            self._core.transport_error(branch, self._loop_time())
            if not self._pump_follows:
                self._pump()

    # -- the pump ------------------------------------------------------------------------
    def _pump(self) -> None:
        core = self._core
        follows = self._pump_follows
        # A transport that reports a failure while this loop sends only queues the core's
        # next attempt; the loop sends it on its next turn.
        self._pump_follows = True
        try:
            while True:
                # What the core has to send goes before the next event is handled: the
                # events are bookkeeping (metrics, logs, records, notifications) and must
                # not stand between a request and the wire.
                sent = self._send_pending()
                event = core.next_event()
                if event is None:
                    if not sent:
                        break
                    continue
                self._on_event(event)
        finally:
            self._pump_follows = follows
        self._arm_timer()

    def _send_pending(self) -> bool:
        """Hand the core's outgoing messages to the transports; whether there were any."""
        core = self._core
        if not core.has_data_to_send():
            # Most turns of the pump have nothing to send: no new list for them.
            return False
        outgoing = core.data_to_send()
        udp = self._udp
        for out in outgoing:
            peer = out.peer
            if udp is not None and peer.transport == "udp":
                send_datagram(udp, out.data, peer, out.branch)
                continue
            transport = self._transports.get(peer.transport)
            if transport is None:
                self.delivery_failed(out.branch, peer, "no transport for peer")
                continue
            transport.send(out.data, peer, out.branch)
        return bool(outgoing)

    def _arm_timer(self) -> None:
        deadline = self._core.get_timer()
        if deadline is None:
            return
        if self._timer is not None and self._timer_at is not None and self._timer_at <= deadline:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = deadline
        self._timer = self._loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        try:
            self._core.handle_timer(self._loop_time())
        except Exception:
            self._discarded("internal_error").inc()
            log.exception("internal error running timers")
        self._pump()

    # -- events --------------------------------------------------------------------------
    def _on_event(self, event: Event) -> None:
        if self._recorder is not None and type(event) is not EmergencyCall:
            # The per-call record (RAY BAUM's Act); memory only, never raises. An emergency
            # call's record is begun by ``_note_call``, once its INVITE has left.
            self._recorder.on_event(event)
        # Checked in order of frequency and called directly: compiled, a handler looked up
        # in a dict and called as a bound method is a generic Python call. No event class
        # derives from another, so each check matches its class only, as the type did.
        if isinstance(event, RequestRouted):
            self._on_routed(event)
        elif isinstance(event, CallCompleted):
            self._on_completed(event)
        elif isinstance(event, EmergencyForwarded):
            self._on_forwarded(event)
        elif isinstance(event, EmergencyCall):
            self._on_emergency_call(event)
        elif isinstance(event, Recovered):
            self._on_recovered(event)
        elif isinstance(event, Discarded):
            self._on_discarded(event)
        elif isinstance(event, Shed):
            self._on_shed(event)
        elif isinstance(event, TrunkProbed):
            self._on_probed(event)
        elif isinstance(event, Failover):
            self._on_failover(event)
        elif isinstance(event, FailOpen):
            self._on_fail_open(event)
        elif isinstance(event, Evicted):
            self._on_evicted(event)
        elif isinstance(event, TrunkStateChanged):
            self._on_trunk_state(event)

    def _on_routed(self, event: RequestRouted) -> None:
        # A Route is a str: the member keys the dict as its value does, without the enum's
        # ``value`` property (a Python call, three times a call).
        key = (event.method, event.route)
        counter = self._request_counters.get(key)
        if counter is None:
            method = event.method if event.method in _KNOWN_METHODS else "other"
            counter = self._metrics.requests.labels(method, event.route.value)
            if len(self._request_counters) < 256:
                self._request_counters[key] = counter
        counter.inc()

    def _on_emergency_call(self, event: EmergencyCall) -> None:
        call = _Call(event.call_id, event.number, self._now_received, self._loop_time())
        self._calls[event.call_id] = call
        self._begin_emergency(event, call)

    def _note_call(self, event: EmergencyCall, call: _Call) -> None:
        """Begin the call's record; called once its INVITE has left (a lookup that must be
        awaited: before it starts, since the core's events about the call may come first)."""
        if self._recorder is not None:
            self._recorder.on_event(event)
        if event.removed_geolocation and log.isEnabledFor(logging.INFO):
            log.info(
                "removed a Geolocation the edge did not write",
                extra=call.fields(removed=list(event.removed_geolocation)),
            )

    def _on_forwarded(self, event: EmergencyForwarded) -> None:
        call = self._calls.get(event.call_id)
        if call is None:
            # Forgotten by the age bound; the line still names the call.
            call = _Call(event.call_id, None, self._clock(), self._loop_time())
        elif call.received_at is not None:
            self._metrics.enrich_seconds.observe(self._clock() - call.received_at)
            call.received_at = None
        call.trunk = event.trunk
        call.attempt = event.attempt
        call.enriched = event.enriched and call.outcome in _LOCATED
        # One line per trunk attempt: where each emergency call was routed, and with
        # what, is part of the RAY BAUM's Act trail.
        if log.isEnabledFor(logging.INFO):
            logline.emit_info(log, "emergency call forwarded", call.fields())

    def _on_failover(self, event: Failover) -> None:
        route = "emergency" if event.emergency else "default"
        self._failovers(route, event.trunk, event.reason).inc()
        call = self._calls.get(event.call_id) if event.emergency else None
        if event.emergency:
            self._outcomes["failover"].inc()
        if not log.isEnabledFor(logging.WARNING):
            return
        if call is not None:
            extra = call.fields(route=route, trunk=event.trunk, reason=event.reason)
        else:
            extra = {
                "call_id": event.call_id,
                "route": route,
                "trunk": event.trunk,
                "reason": event.reason,
            }
        log.warning("trunk failed, trying the next one", extra=extra)

    def _on_fail_open(self, event: FailOpen) -> None:
        self._outcomes["fail_open"].inc()
        call = self._calls.get(event.call_id)
        if call is not None:
            # The original INVITE went: whatever the lookup finds later does not reach it.
            call.outcome = "fail_open"
        log.error(
            "emergency INVITE forwarded without enrichment: lookup did not finish in time",
            extra=call.fields() if call is not None else {"call_id": event.call_id},
        )

    def _on_probed(self, event: TrunkProbed) -> None:
        self._probes(event.trunk, event.result).inc()

    def _on_shed(self, event: Shed) -> None:
        counter = self._shed_counters.get(event.reason)
        if counter is None:
            counter = self._shed_counters[event.reason] = self._metrics.shed.labels(event.reason)
        counter.inc()
        self._shed_log.hit(
            event.reason,
            lambda: {"reason": event.reason, "method": event.method, "peer": str(event.source)},
        )

    def _on_evicted(self, event: Evicted) -> None:
        self._evicted["transactions"].inc(event.transactions)
        self._evicted["contexts"].inc(event.contexts)
        self._evict_log.hit(
            "evicted",
            lambda: {"transactions": event.transactions, "contexts": event.contexts},
        )

    def _on_discarded(self, event: Discarded) -> None:
        self._discarded(event.reason).inc()
        self._discard_log.hit(
            event.reason,
            lambda: {"reason": event.reason, "detail": event.detail, "peer": str(event.source)},
        )

    def _on_recovered(self, event: Recovered) -> None:
        self._recovered[event.kind].inc()
        if event.method != "BYE" and event.call_id not in self._ended:
            # A call up that this process did not set up: its BYE now comes here, so a
            # drain waits for it like for its own.
            if event.emergency:
                self._emergency_dialogs.setdefault(event.call_id, self._loop_time())
            elif event.call_id not in self._dialogs:
                self._add_dialog(event.call_id)
        self._recover_log.hit(
            event.kind,
            lambda: {"kind": event.kind, "emergency": event.emergency, "peer": str(event.source)},
        )

    def _on_trunk_state(self, event: TrunkStateChanged) -> None:
        routes = self._trunk_routes.get(event.trunk, [])
        for route in routes:
            self._trunk_up(event.trunk, route).set(1 if event.up else 0)
        extra = {"trunk": event.trunk, "routes": routes, "reason": event.reason}
        if event.up:
            log.info("trunk is up again; tried in its configured place", extra=extra)
        else:
            log.warning("trunk is down; tried last until it answers", extra=extra)

    def trunk_states(self) -> dict[str, dict[str, dict[str, object]]]:
        """Each route's trunks, in configured order, with their state for ``/readyz``."""
        health = self._core.trunk_health
        now = self._loop_time()
        out: dict[str, dict[str, dict[str, object]]] = {}
        for route, trunks in self._core.trunks_by_route.items():
            states: dict[str, dict[str, object]] = {}
            for trunk in trunks:
                status = health.status(trunk)
                state: dict[str, object] = {
                    "state": ("up" if status.up else "down") if status.probed else "not_probed"
                }
                if status.since is not None:
                    state["for_seconds"] = round(now - status.since, 1)
                if status.last_reason is not None:
                    state["last_result"] = status.last_reason
                states[trunk] = state
            out[route] = states
        return out

    def _on_completed(self, event: CallCompleted) -> None:
        if event.method == "BYE":
            self._emergency_dialogs.pop(event.call_id, None)
            self._dialogs.pop(event.call_id, None)
            # A hand-over of this call may still be on its way from the worker that had it.
            ended = self._ended
            ended[event.call_id] = None
            if len(ended) > _ENDED_MEMORY:
                del ended[next(iter(ended))]
            return
        if not event.emergency:
            if event.method == "INVITE" and 200 <= event.status < 300:
                self._add_dialog(event.call_id)
            return
        call = self._calls.pop(event.call_id, None)
        status_class = event.status // 100
        result = self._results.get(status_class)
        if result is None:
            # Made on first use, as ``labels`` would: a class never seen is not exported.
            result = self._metrics.emergency_results.labels(f"{status_class}xx")
            if len(self._results) < 16:
                self._results[status_class] = result
        result.inc()
        if 200 <= event.status < 300:
            self._emergency_dialogs[event.call_id] = self._loop_time()
        elif event.status != 487:
            # 487 is the caller hanging up; anything else means no trunk took the call.
            self._outcomes["failed"].inc()
            extra = (
                call.fields(status=event.status, trunk=event.trunk)
                if call is not None
                else {"call_id": event.call_id, "status": event.status, "trunk": event.trunk}
            )
            log.critical("emergency call failed on every trunk", extra=extra)

    def _begin_emergency(self, event: EmergencyCall, call: _Call) -> None:
        """Look the caller up and enrich: at once when the store answers without waiting
        (in memory), else in a task so that the loop keeps serving while Redis answers."""
        try:
            line = caller_line(event.request)
            call.caller = line
            result = self._lookup.lookup_now(line) if line is not None else None
        except Exception:
            log.exception("reading the caller failed", extra=call.fields())
            self._finish_emergency(event, call, None, failed=True)
            return
        if line is None or result is not None:
            self._finish_emergency(event, call, result)
            return
        # Before the lookup: a fail-open at its deadline reaches the recorder in the meantime.
        self._note_call(event, call)
        task = self._loop.create_task(self._lookup_then_finish(event, call, line))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _lookup_then_finish(self, event: EmergencyCall, call: _Call, line: str) -> None:
        try:
            result: LookupResult | None = await self._lookup.lookup(line)
            failed = False
        except Exception:
            log.exception("location lookup failed", extra=call.fields())
            result, failed = None, True
        self._finish_emergency(event, call, result, failed=failed, noted=True)
        self._pump()

    def _finish_emergency(
        self,
        event: EmergencyCall,
        call: _Call,
        result: LookupResult | None,
        *,
        failed: bool = False,
        noted: bool = False,
    ) -> None:
        """Enrich with what the lookup found and hand the request back to the core; it goes
        to the wire before any of the call's bookkeeping. ``noted``: ``_note_call`` has run
        (before a lookup that had to be awaited)."""
        request = event.request
        line = call.caller
        provider_endpoint: str | None = None
        callback: str | None = None
        store_error: str | None = None
        replaced: tuple[str, ...] = ()
        try:
            if failed:
                raise RuntimeError("the caller or the location could not be read")
            if line is None:
                outcome = "no_caller"
            elif result is None:
                raise RuntimeError("the lookup of a known caller gave no result")
            else:
                # Each attribute of the lookup's (Python) objects is a generic read: once.
                record = result.record
                source = result.source
                if record is not None:
                    provider_endpoint = record.provider_endpoint
                    callback = record.callback
                if source is LookupSource.STORE:
                    outcome = "enriched" if record is not None else "no_location"
                else:
                    outcome = _OUTCOME_BY_SOURCE[source]
                    store_error = result.error
            custom = self._enrich
            if custom is None:
                enrichment = enrich(
                    request,
                    line=line,
                    provider_endpoint=provider_endpoint,
                    callback=callback,
                    options=self._options.enrich,
                )
            else:
                enrichment = custom(
                    request,
                    line=line,
                    provider_endpoint=provider_endpoint,
                    callback=callback,
                    options=self._options.enrich,
                )
            replaced = enrichment.removed_geolocation
            to_send = enrichment.request
            enriched = True
        except Exception:
            # Whatever broke, the call goes out as it came (the first rule of the product).
            log.exception("enrichment failed; forwarding the original INVITE", extra=call.fields())
            outcome = "enrich_error"
            to_send = request
            enriched = False
        self._core.forward_emergency(event.call, to_send, self._loop_time(), enriched=enriched)
        # The INVITE leaves now; what is counted, recorded, logged and notified about the
        # call comes after it. A delivery failure in this send is left to the pump that
        # follows (the one running, or the one after the awaited lookup): a pump nested here
        # would hand on the core's events about the call before its record is begun.
        follows = self._pump_follows
        self._pump_follows = True
        try:
            self._send_pending()
        finally:
            self._pump_follows = follows
        if not noted:
            self._note_call(event, call)
        if not failed and line is not None and result is not None:
            self._lookup_seconds[result.source].observe(result.seconds)
        if replaced:
            log.info(
                "replaced the Geolocation that came with the call",
                extra=call.fields(removed=list(replaced)),
            )
        self._outcomes[outcome].inc()
        if call.outcome is None:
            # After a fail-open the original went: the call's outcome stays ``fail_open``.
            call.outcome = outcome
        if self._recorder is not None:
            self._recorder.on_enrichment(
                event.call_id,
                outcome=outcome,
                caller=line,
                callback=(callback or line) if enriched else None,
                provider_endpoint=provider_endpoint if enriched else None,
            )
        if outcome == "cached":
            log.warning(
                "location store unavailable; used a cached location",
                extra=call.fields(store_error=store_error),
            )
        elif outcome not in ("enriched", "enrich_error"):
            # "enriched" is logged once, with the trunk, when it is forwarded.
            log.warning(
                "emergency call without location; Bandwidth's call center will answer it",
                extra=call.fields(store_error=store_error) if store_error else call.fields(),
            )
        if self._notify is not None:
            self._notify_call(self._notify, event, call, result, outcome)

    # -- overload ------------------------------------------------------------------------
    def datagram_dropped(self, priority: Priority) -> None:
        """A transport dropped a datagram unread: its receive queue was full."""
        self._dropped[priority].inc()
        self._queue_full.inc()
        self._discard_log.hit(
            "queue_full", lambda: {"reason": "queue_full", "priority": priority.name}
        )

    async def monitor_load(self, stop: asyncio.Event) -> None:
        """Measure event-loop lag into the load signal every ``lag_interval`` (sustained
        over two measurements); write the summaries of rate-limited log lines."""
        loop = self._loop
        interval = self._options.lag_interval
        flush_every = max(1, int(1.0 / interval))
        ticks = 0
        previous = 0.0
        # One future per tick (batching.Pauses): asyncio.timeout around Event.wait() cost a
        # cancellation and two exceptions twenty times a second.
        with Pauses(stop) as pauses:
            while not stop.is_set():
                expected = loop.time() + interval
                await pauses.until(expected)
                lag = max(0.0, loop.time() - expected)
                # The lower of two measurements in a row: one stall (a collection, a
                # neighbour on the host taking the CPU) does not shed calls; a loop that
                # stays behind does.
                self.load.lag = min(lag, previous)
                previous = lag
                ticks += 1
                if ticks % flush_every == 0:
                    self._prune(loop.time())
                    self._discard_log.flush()
                    self._shed_log.flush()
                    self._delivery_log.flush()
                    self._evict_log.flush()

    def _notify_call(
        self,
        notify: Callable[[CallEvent], None],
        event: EmergencyCall,
        call: _Call,
        result: LookupResult | None,
        outcome: str,
    ) -> None:
        """Kari's Law: hand the call to the notifier (it only appends to a list in memory)."""
        record = result.record if result is not None else None
        started = call.received_at
        try:
            notify(
                CallEvent.now(
                    call_id=event.call_id,
                    caller=call.caller,
                    callback=record.callback if record is not None else None,
                    dialed=event.number,
                    provider_endpoint=record.provider_endpoint if record is not None else None,
                    outcome=outcome,
                    age=self._clock() - started if started is not None else 0.0,
                )
            )
        except Exception:
            log.exception("could not queue the notification", extra=call.fields())

    # -- health and lifecycle ------------------------------------------------------------
    async def watch_store(self, stop: asyncio.Event) -> None:
        """Ping the store every interval; keep ``store_ok`` and ``e911_sip_store_up`` true."""
        while not stop.is_set():
            ok = await self._store.ping()
            # A failed check opens the lookup's circuit breaker; a good one lets an open
            # breaker try the store at once.
            self._lookup.health(ok)
            if ok and not self.store_ok:
                log.info("location store reachable again")
            elif not ok and self.store_ok:
                log.error("location store unreachable; emergency calls use the cache or none")
            self.store_ok = ok
            self._metrics.store_up.set(1 if ok else 0)
            try:
                async with asyncio.timeout(self._options.store_check_interval):
                    await stop.wait()
            except TimeoutError:
                pass

    def readiness(self) -> tuple[bool, dict[str, object]]:
        """(ready, details) for ``/readyz``: listeners bound; the store ``ok``, or
        ``degraded`` while its health check fails or the lookup's circuit breaker is not
        closed (the edge stays ready: calls go out with cached or no location)."""
        store = "ok" if self.store_ok and not self._lookup.degraded else "degraded"
        ready = self.listeners_bound and not self.draining
        locations: dict[str, object] | None = None
        if isinstance(self._store, MirroredLocationStore):
            sync = self._store.state()
            # Not ready until the records are in memory: a load balancer should not send
            # calls that would each wait on a direct lookup. Calls that come anyway are
            # served, with that bounded lookup.
            ready = ready and sync.loaded
            locations = {
                "loaded": sync.loaded,
                "in_sync": sync.in_sync,
                "records": sync.records,
                "sync_age_seconds": round(sync.age, 3) if sync.loaded else None,
            }
        trunks = self.trunk_states()
        # Down trunks never make the edge unready: every trunk is still tried, and an edge
        # taken out of service would lose the calls a wrong probe result would not.
        emergency = [t["state"] for t in trunks.get("emergency", {}).values()]
        down = emergency.count("down")
        if emergency and down == len(emergency):
            emergency_state = "all_down"
        else:
            emergency_state = "degraded" if down else "ok"
        return ready, {
            "status": "ready" if ready else ("draining" if self.draining else "not_ready"),
            "listeners": "bound" if self.listeners_bound else "not_bound",
            "store": store,
            **({"locations": locations} if locations is not None else {}),
            "emergency_trunks": emergency_state,
            "trunks": trunks,
            "transactions": self._core.transactions_in_flight,
            "emergency_dialogs": self.emergency_dialogs,
        }

    def waiting_for(self) -> dict[str, int]:
        """What a drain waits for, by kind: emergency lookups running, emergency INVITEs
        with no final response yet, answered emergency dialogs with no BYE yet, other
        answered dialogs with no BYE yet."""
        return {
            "lookups": len(self._tasks),
            "emergency_calls": len(self._calls),
            "emergency_dialogs": len(self._emergency_dialogs),
            "dialogs": len(self._dialogs),
        }

    def hand_over(
        self, owner: Callable[[str], int], me: int
    ) -> dict[int, list[tuple[str, bool, float]]]:
        """Take out the answered calls whose messages now reach another worker (``owner`` of
        their Call-ID is not ``me``): by that worker, the (Call-ID, emergency, answered at)
        of each. Its drain, not this one, must wait for their BYE, which it now receives."""
        out: dict[int, list[tuple[str, bool, float]]] = {}
        for table, emergency in ((self._emergency_dialogs, True), (self._dialogs, False)):
            for call_id, since in list(table.items()):
                slot = owner(call_id)
                if slot != me:
                    del table[call_id]
                    out.setdefault(slot, []).append((call_id, emergency, since))
        return out

    def adopt(self, dialogs: Iterable[tuple[str, bool, float]]) -> None:
        """Take in answered calls another worker handed over (:meth:`hand_over`)."""
        others = dict(self._dialogs)
        for call_id, emergency, since in dialogs:
            if call_id in self._ended:
                continue  # its BYE reached this worker before the hand-over did
            if emergency:
                self._emergency_dialogs.setdefault(call_id, since)
            else:
                others.setdefault(call_id, since)
        # Oldest first again (pruning stops at the first young entry), then to the bound.
        ordered = sorted(others.items(), key=lambda item: item[1])
        excess = max(0, len(ordered) - self._options.max_dialogs)
        if excess:
            self._dialogs_forgotten["capacity"].inc(excess)
        self._dialogs = OrderedDict(ordered[excess:])

    def _add_dialog(self, call_id: str) -> None:
        dialogs = self._dialogs
        # Re-inserted at the end: the table stays ordered by age, so pruning stops at the
        # first young entry.
        dialogs.pop(call_id, None)
        if len(dialogs) >= self._options.max_dialogs:
            dialogs.popitem(last=False)
            self._dialogs_forgotten["capacity"].inc()
        dialogs[call_id] = self._loop_time()

    async def drain(self, force: asyncio.Event) -> None:
        """Serve until nothing needs this process, within the grace periods, or ``force``.

        From the start OPTIONS addressed to us is answered 503 (the core's ``draining``), so
        the softswitch sends new calls to another host; a call that still comes here is
        served as usual, a 911 call above all. A drain lasts at least ``min_drain_time``, for
        the softswitch to see that 503. What holds it, each kind within its own
        grace period counted from the start: emergency lookups running and emergency
        INVITEs with no final response yet (``drain_timeout``), answered emergency dialogs
        whose BYE must still be routed through our Record-Route (``emergency_drain_timeout``),
        other answered dialogs (``dialog_drain_timeout``). Other transactions are not
        waited for: a client transaction to a trunk that never answers lives 32 s (Timer B),
        and the caller's own timers and retransmissions cover a request cut short. What is
        still waited for is logged every ``drain_log_interval``.
        """
        self.draining = True
        self._core.draining = True
        loop = self._loop
        options = self._options
        bounds = {
            "drain_timeout": options.drain_timeout,
            "emergency_drain_timeout": options.emergency_drain_timeout,
            "dialog_drain_timeout": options.dialog_drain_timeout,
        }
        start = last_log = loop.time()
        reason = "forced"
        first = True
        while not force.is_set():
            now = loop.time()
            self._prune(now)
            waiting = self.waiting_for()
            elapsed = now - start
            held = [
                name
                for name, count in (
                    ("drain_timeout", waiting["lookups"] + waiting["emergency_calls"]),
                    ("emergency_drain_timeout", waiting["emergency_dialogs"]),
                    ("dialog_drain_timeout", waiting["dialogs"]),
                )
                if count
            ]
            if elapsed >= options.min_drain_time:
                if not held:
                    reason = "idle"
                    break
                if all(elapsed >= bounds[name] for name in held):
                    # Named for the longest grace period that ran out with a call waiting.
                    reason = max(held, key=bounds.__getitem__)
                    break
            if first or now - last_log >= options.drain_log_interval:
                first = False
                last_log = now
                log.info(
                    "draining: waiting for calls",
                    extra={
                        **waiting,
                        "not_waited_for": self._not_waited_for(),
                        "seconds": round(elapsed, 1),
                    },
                )
            try:
                async with asyncio.timeout(0.1):
                    await force.wait()
            except TimeoutError:
                pass
        for task in list(self._tasks):
            task.cancel()
        log.info(
            "drain finished",
            extra={
                "reason": reason,
                "seconds": round(loop.time() - start, 1),
                **self.waiting_for(),
                "not_waited_for": self._not_waited_for(),
            },
        )

    def _not_waited_for(self) -> dict[str, int]:
        return {
            "transactions": self._core.transactions_in_flight,
            "contexts": max(0, self._core.contexts_in_flight - len(self._calls)),
        }

    def _prune(self, now: float) -> None:
        """Forget dialogs and calls older than their bounds (a lost BYE or event)."""
        limit = self._options.emergency_dialog_max_age
        for call_id, since in list(self._emergency_dialogs.items()):
            if now - since > limit:
                del self._emergency_dialogs[call_id]
        dialogs = self._dialogs
        oldest = now - self._options.dialog_max_age
        while dialogs:
            call_id = next(iter(dialogs))
            if dialogs[call_id] >= oldest:
                break
            dialogs.popitem(last=False)
            self._dialogs_forgotten["max_age"].inc()
        for call_id, call in list(self._calls.items()):
            if now - call.started > _CALL_MAX_AGE:
                del self._calls[call_id]

    def close(self) -> None:
        """Stop the timer."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
