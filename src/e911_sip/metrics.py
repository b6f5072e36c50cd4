"""Every Prometheus metric of the product, defined once (``e911_sip_<noun>_total/_seconds``).

A :class:`Metrics` instance owns its own registry, so two edges in one test process do not
collide and ``/metrics`` shows only this product's series plus the process collectors.
"""

from __future__ import annotations

import platform
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, cast

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    ProcessCollector,
    generate_latest,
)
from prometheus_client import (
    PlatformCollector as _PlatformCollector,
)
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from e911_sip import __version__, build

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Sub-millisecond resolution where the product's latency lives, out to the lookup timeout.
_FAST_BUCKETS = (
    0.00005,
    0.0001,
    0.0002,
    0.0003,
    0.0005,
    0.00075,
    0.001,
    0.002,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
)

EMERGENCY_OUTCOMES = (
    "enriched",
    "no_location",
    "store_error",
    "cached",
    "invalid_record",
    "no_caller",
    "enrich_error",
    "fail_open",
    "failover",
    "failed",
)

STORE_FAILURE_KINDS = ("timeout", "connection", "pool_wait", "invalid_record", "error")

STORE_BREAKER_STATES = ("closed", "open", "half_open")

NOTIFY_CHANNELS = ("webhook", "email", "sms")
NOTIFY_OUTCOMES = ("delivered", "retried", "dead")
COVERAGE_STATES = (
    "account",
    "site",
    "customer",
    "no_address",
    "not_provisioned",
    "record_missing",
    "record_mismatch",
)
"""The ``state`` labels of ``e911_sip_coverage_lines`` (provisioning.coverage.LineState)."""

# From a webhook on loopback (milliseconds) to SMS paced at 1 message a second behind others.
_NOTIFY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0)


class Children:
    """The children of one labelled metric, each bound once.

    ``metric.labels(...)`` validates the values, builds a key and takes the metric's lock on
    every call; the message path asks for the same few children over and over, so it keeps
    them in a dict. At most ``limit`` are kept (label values a peer can influence, such as a
    trunk's failure reason, stay bounded); beyond that ``labels`` is called each time.
    """

    __slots__ = ("_metric", "_bound", "_limit")

    def __init__(self, metric: Any, *, limit: int = 256) -> None:
        self._metric = metric
        self._bound: dict[tuple[str, ...], Any] = {}
        self._limit = limit

    def __call__(self, *values: str) -> Any:
        """The child for ``values``, in the metric's label order."""
        child = self._bound.get(values)
        if child is None:
            child = self._metric.labels(*values)
            if len(self._bound) < self._limit:
                self._bound[values] = child
        return child


class _FunctionCounter(Collector):
    """A counter whose value is read from its owner when scraped (like
    ``Gauge.set_function``), for counts kept by a layer that must not import this one."""

    def __init__(self, name: str, documentation: str) -> None:
        self._name = name
        self._documentation = documentation
        self._function: Callable[[], float] = lambda: 0.0

    def set_function(self, function: Callable[[], float]) -> None:
        self._function = function

    def collect(self) -> Iterable[Metric]:
        family = CounterMetricFamily(self._name, self._documentation)
        family.add_metric([], self._function())
        yield family


class _LoopCount:
    """One child of a :class:`LoopCounter`: a plain number."""

    __slots__ = ("value", "created")

    def __init__(self) -> None:
        self.value = 0.0
        self.created = time.time()

    def inc(self, amount: float = 1.0) -> None:
        """Add ``amount`` (at least 0, as a counter's increments are)."""
        if amount < 0:
            raise ValueError("counters can only be incremented by non-negative amounts")
        self.value += amount


class _LoopObservations:
    """One child of a :class:`LoopHistogram`: a count per bucket and the sum."""

    __slots__ = ("bounds", "counts", "sum", "created")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * len(bounds)
        self.sum = 0.0
        self.created = time.time()

    def observe(self, amount: float) -> None:
        """Count ``amount`` in the first bucket whose bound is not below it."""
        # bisect_left: the first bound >= amount, the bucket "le" names (the last is +Inf).
        self.counts[bisect_left(self.bounds, amount)] += 1
        self.sum += amount


class _LoopMetric(Collector):
    """What :class:`LoopCounter` and :class:`LoopHistogram` share: the children by label
    values, made on first use (``labels``), or the one child of a metric without labels."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        registry: CollectorRegistry,
    ) -> None:
        self._name = name
        self._documentation = documentation
        self._labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], Any] = {}
        registry.register(self)

    def _child(self, values: tuple[str, ...]) -> Any:
        child = self._children.get(values)
        if child is None:
            if len(values) != len(self._labelnames):
                raise ValueError(
                    f"{self._name}: {len(self._labelnames)} label values expected, "
                    f"got {len(values)}"
                )
            # Kept under the values as written out, and looked up again under them: a value
            # given as something other than a str (an int status) finds the same child each
            # time instead of replacing it.
            key = tuple(str(v) for v in values)
            child = self._children.get(key)
            if child is None:
                child = self._children[key] = self._new_child()
        return child

    def _new_child(self) -> Any:
        raise NotImplementedError

    def describe(self) -> Iterable[Metric]:
        return self._families(())

    def collect(self) -> Iterable[Metric]:
        return self._families(tuple(self._children.items()))

    def _families(self, children: tuple[tuple[tuple[str, ...], Any], ...]) -> Iterable[Metric]:
        raise NotImplementedError


class LoopCounter(_LoopMetric):
    """A counter of the message path: a plain number per child, no lock.

    prometheus_client's ``Counter`` takes a lock in every ``inc`` (about 1 µs with its
    checks, ten times a 911 call); the edge's message path runs on the event loop's one
    thread, and so does ``/metrics``, which reads the numbers when scraped (as the
    dispatcher's per-worker counters are read). Only the loop's thread may change one.
    The exposition is a ``Counter``'s: ``_total`` and ``_created`` per child.
    """

    def labels(self, *values: str) -> _LoopCount:
        """The child for ``values``, in label order (made, and exported, on first use)."""
        child: _LoopCount = self._child(values)
        return child

    def inc(self, amount: float = 1.0) -> None:
        """Add ``amount`` to a counter without labels."""
        child: _LoopCount = self._child(())
        child.inc(amount)

    def _new_child(self) -> _LoopCount:
        return _LoopCount()

    def _families(self, children: tuple[tuple[tuple[str, ...], Any], ...]) -> Iterable[Metric]:
        family = CounterMetricFamily(self._name, self._documentation, labels=self._labelnames)
        for values, child in children:
            family.add_metric(values, child.value, created=child.created)
        yield family


class LoopHistogram(_LoopMetric):
    """A histogram of the message path: a count per bucket per child, no lock (as
    :class:`LoopCounter`; prometheus_client's ``Histogram`` also walks its buckets in Python
    and takes two locks per ``observe``). The exposition is a ``Histogram``'s."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        *,
        buckets: Sequence[float],
        registry: CollectorRegistry,
    ) -> None:
        bounds = sorted(float(b) for b in buckets)
        if not bounds or bounds[-1] != float("inf"):
            bounds.append(float("inf"))
        self._bounds = tuple(bounds)
        # Written as prometheus_client writes a bucket's bound ("+Inf", "5e-05").
        go_float = cast(Callable[[float], str], floatToGoString)
        self._le = tuple(go_float(bound) for bound in self._bounds)
        super().__init__(name, documentation, labelnames, registry)
        if not self._labelnames:
            self._child(())

    def labels(self, *values: str) -> _LoopObservations:
        """The child for ``values``, in label order (made, and exported, on first use)."""
        child: _LoopObservations = self._child(values)
        return child

    def observe(self, amount: float) -> None:
        """Observe ``amount`` in a histogram without labels."""
        child: _LoopObservations = self._child(())
        child.observe(amount)

    def _new_child(self) -> _LoopObservations:
        return _LoopObservations(self._bounds)

    def _families(self, children: tuple[tuple[tuple[str, ...], Any], ...]) -> Iterable[Metric]:
        family = HistogramMetricFamily(self._name, self._documentation, labels=self._labelnames)
        for values, child in children:
            cumulative = 0
            buckets: list[tuple[str, float]] = []
            for le, count in zip(self._le, child.counts, strict=True):
                cumulative += count
                buckets.append((le, cumulative))
            family.add_metric(values, buckets, child.sum)
            family.add_sample(
                f"{self._name}_created",
                dict(zip(self._labelnames, values, strict=True)),
                child.created,
            )
        yield family


class Metrics:
    """The edge's and provisioning's metrics on one registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        ProcessCollector(registry=r)
        _PlatformCollector(registry=r)
        # Which release runs where, and whether its hot modules are compiled: during a
        # rolling upgrade, or when one host is slower than the others, the first question.
        Info(
            "e911_sip_build",
            "The running release: version, build (compiled, pure or partly compiled) and "
            "Python version.",
            registry=r,
        ).info(
            {
                "version": __version__,
                "build": build.describe(),
                "python": platform.python_version(),
            }
        )
        # The message path's own counters and histograms: a plain number each, no lock.
        self.requests = LoopCounter(
            "e911_sip_requests",
            "New SIP requests (not retransmissions) by method and how they were routed.",
            ["method", "route"],
            registry=r,
        )
        self.emergency_calls = LoopCounter(
            "e911_sip_emergency_calls",
            "Emergency call events by outcome: enriched, no_location, store_error, cached, "
            "invalid_record, no_caller, enrich_error, fail_open, failover (one per trunk "
            "change) and failed (no trunk completed the call).",
            ["outcome"],
            registry=r,
        )
        for outcome in EMERGENCY_OUTCOMES:
            self.emergency_calls.labels(outcome)
        self.emergency_results = LoopCounter(
            "e911_sip_emergency_results",
            "Final responses sent upstream for emergency INVITEs, by status class.",
            ["status_class"],
            registry=r,
        )
        self.failovers = Counter(
            "e911_sip_trunk_failovers_total",
            "Calls moved off a trunk, by route, trunk and reason.",
            ["route", "trunk", "reason"],
            registry=r,
        )
        self.enrich_seconds = LoopHistogram(
            "e911_sip_emergency_enrich_seconds",
            "Time from receiving an emergency INVITE to sending it on to a trunk.",
            buckets=_FAST_BUCKETS,
            registry=r,
        )
        self.store_lookup_seconds = LoopHistogram(
            "e911_sip_store_lookup_seconds",
            "Location store lookup latency, by where the answer came from.",
            ["source"],
            buckets=_FAST_BUCKETS,
            registry=r,
        )
        self.transactions = Gauge(
            "e911_sip_transactions_in_flight",
            "SIP transactions (server plus client) not yet terminated.",
            registry=r,
        )
        self.transactions_working = Gauge(
            "e911_sip_transactions_working",
            "SIP transactions still waiting for their final response: what "
            "[overload] shed_transactions counts (finished ones only absorb retransmissions).",
            registry=r,
        )
        self.contexts = Gauge(
            "e911_sip_requests_in_flight",
            "Requests being proxied (response contexts).",
            registry=r,
        )
        self.dialogs = Gauge(
            "e911_sip_dialogs",
            "Calls answered through this edge whose BYE has not been seen, by kind "
            "(emergency, other): what a drain keeps routing for.",
            ["kind"],
            registry=r,
        )
        self.dialogs_forgotten = Counter(
            "e911_sip_dialogs_forgotten_total",
            "Answered non-emergency calls no longer waited for by a drain, by reason: "
            "max_age (no BYE seen), capacity (the table's bound).",
            ["reason"],
            registry=r,
        )
        self.discarded = Counter(
            "e911_sip_messages_discarded_total",
            "Messages dropped or answered with an error by the edge itself, by reason.",
            ["reason"],
            registry=r,
        )
        self.recovered = Counter(
            "e911_sip_recovered_total",
            "Messages routed on what they carry with no state of this process to match them "
            "(a dead worker's or a restarted edge's call), by kind: trunk_dialog (a trunk's "
            "request in a dialog stamped by us), late_2xx (a 2xx to an INVITE we sent, "
            "relayed without a transaction).",
            ["kind"],
            registry=r,
        )
        self.shed = Counter(
            "e911_sip_shed_total",
            "Requests refused with a stateless 503 by overload control, by reason: "
            "transactions_full, contexts_full, transactions, lag, queue; and queue_full, a "
            "datagram dropped unread from the full receive queue.",
            ["reason"],
            registry=r,
        )
        self.queue_dropped = Counter(
            "e911_sip_receive_queue_dropped_total",
            "Datagrams dropped because the receive queue was full, by the class they had.",
            ["priority"],
            registry=r,
        )
        self.evicted = Counter(
            "e911_sip_evicted_total",
            "Non-emergency state evicted to admit an emergency INVITE or a BYE, by table.",
            ["table"],
            registry=r,
        )
        self.overload_limit = Gauge(
            "e911_sip_overload_limit",
            "Configured overload thresholds and bounds ([overload]), by limit: max_lag_seconds, "
            "max_queue, max_queue_delay_seconds, queue_delay_sustain_seconds, queue_limit, "
            "shed_transactions, max_transactions, "
            "max_contexts, send_backlog.",
            ["limit"],
            registry=r,
        )
        self.loop_lag = Gauge(
            "e911_sip_event_loop_lag_seconds",
            "How late the event loop's periodic tick ran: the lower of the last two, so a "
            "single stall does not count.",
            registry=r,
        )
        self.queue_depth = Gauge(
            "e911_sip_receive_queue_depth",
            "Datagrams read and waiting to be processed.",
            registry=r,
        )
        self.send_backlog = Gauge(
            "e911_sip_udp_send_backlog",
            "Datagrams waiting for room in the kernel's UDP send buffer.",
            registry=r,
        )
        self.delivery_failures = Counter(
            "e911_sip_delivery_failures_total",
            "Messages a transport could not deliver, by transport.",
            ["transport"],
            registry=r,
        )
        self.trunk_up = Gauge(
            "e911_sip_trunk_up",
            "1 while a trunk is tried in its configured place, 0 while OPTIONS probes (or "
            "calls) have it down and tried last; unprobed trunks stay 1.",
            ["trunk", "route"],
            registry=r,
        )
        self.trunk_probes = Counter(
            "e911_sip_trunk_probes_total",
            "OPTIONS probes of trunks by result: ok, timeout, transport or the failing status.",
            ["trunk", "result"],
            registry=r,
        )
        self.stream_closed = Counter(
            "e911_sip_stream_connections_closed_total",
            "Stream (TCP/TLS) connections refused or closed by a limit, and outbound messages "
            "refused by one, by transport and reason (refused_full, refused_untrusted_full, "
            "refused_per_ip, idle, header_timeout, tls_handshake, buffer, write_buffer, "
            "framing, outbound_limit, queue_full, connect_failed).",
            ["transport", "reason"],
            registry=r,
        )
        self.stream_connections = Gauge(
            "e911_sip_stream_connections",
            "Open stream (TCP/TLS) connections by transport and direction (inbound, outbound).",
            ["transport", "direction"],
            registry=r,
        )
        self.location_records = Gauge(
            "e911_sip_location_records",
            "Line records held in memory by the Redis mirror (0 with memory:// or without "
            "the mirror).",
            registry=r,
        )
        self.location_sync_age = Gauge(
            "e911_sip_location_sync_age_seconds",
            "Seconds since the in-memory records were last known to match Redis: 0 while the "
            "mirror follows Redis, growing while Redis is unreachable, +Inf before the first load.",
            registry=r,
        )
        self.location_updates = _FunctionCounter(
            "e911_sip_location_updates",
            "Line records re-read into memory after a change in Redis.",
        )
        r.register(self.location_updates)
        self.store_lookup_failures = Counter(
            "e911_sip_store_lookup_failures_total",
            "Location store lookups that failed, by kind: timeout, connection, pool_wait "
            "(every connection stayed busy), invalid_record (that line's record is unusable) "
            "and error (the store refused the command).",
            ["kind"],
            registry=r,
        )
        for kind in STORE_FAILURE_KINDS:
            self.store_lookup_failures.labels(kind)
        self.store_lookups_skipped = Counter(
            "e911_sip_store_lookups_skipped_total",
            "Lookups not sent to the location store because its circuit breaker was open.",
            registry=r,
        )
        self.store_breaker = Gauge(
            "e911_sip_store_breaker_state",
            "1 for the location store circuit breaker's current state (closed, open, "
            "half_open), 0 for the others.",
            ["state"],
            registry=r,
        )
        self.store_breaker_transitions = Counter(
            "e911_sip_store_breaker_transitions_total",
            "Location store circuit breaker state changes, by the state entered.",
            ["state"],
            registry=r,
        )
        for state in STORE_BREAKER_STATES:
            self.store_breaker_transitions.labels(state)
        self.set_store_breaker("closed", count=False)
        self.store_up = Gauge(
            "e911_sip_store_up",
            "1 when the location store answered its last health check, else 0.",
            registry=r,
        )
        self.store_master_changes = _FunctionCounter(
            "e911_sip_store_master_changes",
            "Redis master switches this process was told of by the sentinels "
            "(redis+sentinel:// only; once per switch, whichever client saw it first).",
        )
        r.register(self.store_master_changes)
        self.provisioning_operations = Counter(
            "e911_sip_provisioning_operations_total",
            "Provisioning API operations by operation and result.",
            ["operation", "result"],
            registry=r,
        )
        self.provisioning_leases = Counter(
            "e911_sip_provisioning_leases_total",
            "Leases a provisioning process took in Redis, by kind (customer, import_job) and "
            "outcome: free (at the first try), waited (another process held it first), busy "
            "(held elsewhere for the whole wait: the change was refused), lost (expired or "
            "taken while held).",
            ["kind", "outcome"],
            registry=r,
        )
        for kind in ("customer", "import_job"):
            for outcome in ("free", "waited", "busy", "lost"):
                self.provisioning_leases.labels(kind, outcome)
        self.provisioning_lease_wait = Histogram(
            "e911_sip_provisioning_lease_wait_seconds",
            "Seconds a change waited for a customer's lease another provisioning process held.",
            buckets=(0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 15.0, 30.0, 60.0),
            registry=r,
        )
        self.bandwidth_requests = Counter(
            "e911_sip_bandwidth_requests_total",
            "Requests to the Bandwidth API by operation and result.",
            ["operation", "result"],
            registry=r,
        )
        self.import_rows = Counter(
            "e911_sip_import_rows_total",
            "Rows of bulk import files by result (done, failed).",
            ["result"],
            registry=r,
        )

        # Counted per emergency call by the edge's recorder, on the loop: lock-free.
        self.call_records = LoopCounter(
            "e911_sip_call_records",
            "Emergency call records at the edge by result: written (handed on), queue_full "
            "and lost_at_stop (dropped), write_failed (attempts, retried), internal_error.",
            ["result"],
            registry=r,
        )
        self.call_records_finished = LoopCounter(
            "e911_sip_call_records_finished",
            "Emergency call records finished at the edge, by why (bye, failed, cancelled, "
            "max_age, capacity, shutdown, replaced).",
            ["end"],
            registry=r,
        )
        self.call_records_in_progress = Gauge(
            "e911_sip_call_records_in_progress",
            "Emergency calls with a record in progress at the edge (bounded).",
            registry=r,
        )
        self.call_records_queued = Gauge(
            "e911_sip_call_records_queued",
            "Finished call records waiting to be written (bounded).",
            registry=r,
        )
        self.call_records_backlog = Gauge(
            "e911_sip_call_records_backlog",
            "Call records waiting for provisioning to store them (the stream's length, "
            "bounded by [records] stream_maxlen).",
            registry=r,
        )
        self.call_records_stored = Counter(
            "e911_sip_call_records_stored_total",
            "Call records read by provisioning, by result: stored, store_error (retried), "
            "invalid (skipped), pruned (past retention).",
            ["result"],
            registry=r,
        )
        self.notifications = Counter(
            "e911_sip_notifications_total",
            "Kari's Law notification attempts by channel (webhook, email, sms) and outcome: "
            "delivered, retried (an attempt failed; another follows) and dead (given up, in "
            "the dead-letter list); channel none, outcome no_target: a call with nobody to "
            "notify (no contacts and no [notify] fallback).",
            ["channel", "outcome"],
            registry=r,
        )
        self.notification_seconds = Histogram(
            "e911_sip_notification_latency_seconds",
            "Time from the emergency INVITE to a notification's delivery, by channel.",
            ["channel"],
            buckets=_NOTIFY_BUCKETS,
            registry=r,
        )
        for channel in NOTIFY_CHANNELS:
            self.notification_seconds.labels(channel)
            for outcome in NOTIFY_OUTCOMES:
                self.notifications.labels(channel, outcome)
        self.notifications.labels("none", "no_target")
        self.notification_queue = Gauge(
            "e911_sip_notification_queue_depth",
            "Notification items stored and not finished, by queue (events, deliveries), as "
            "last read (every few seconds).",
            ["queue"],
            registry=r,
        )
        self.notification_dead_letters = Gauge(
            "e911_sip_notification_dead_letters",
            "Notifications in the dead-letter list (never delivered).",
            registry=r,
        )
        self.notification_events_dropped = Counter(
            "e911_sip_notification_events_dropped_total",
            "Emergency call events the edge could not queue for notification (the queue was "
            "unreachable and the in-memory backlog full).",
            registry=r,
        )

        self._coverage(r)

    def _coverage(self, r: CollectorRegistry) -> None:
        """Location coverage, set by the provisioning role (see provisioning/coverage.py)."""
        self.coverage_lines = Gauge(
            "e911_sip_coverage_lines",
            "Provisioned lines by coverage state: account, site, customer (covered at that "
            "level) or no_address, not_provisioned, record_missing, record_mismatch (a 911 "
            "call would reach the PSAP without a location).",
            ["state"],
            registry=r,
        )
        for state in COVERAGE_STATES:
            self.coverage_lines.labels(state)
        self.coverage_share = Gauge(
            "e911_sip_coverage_share",
            "Share of provisioned lines covered (1 with no lines; 0 until first computed).",
            registry=r,
        )
        self.coverage_endpoints_pending = Gauge(
            "e911_sip_coverage_endpoints_pending",
            "Endpoints whose Bandwidth order is running, or that an entity with lines lacks.",
            registry=r,
        )
        self.coverage_endpoints_failed = Gauge(
            "e911_sip_coverage_endpoints_failed",
            "Endpoints whose last Bandwidth order failed (as seen by this process).",
            registry=r,
        )
        self.coverage_alert_below = Gauge(
            "e911_sip_coverage_alert_below",
            "[provisioning] coverage_alert_below: E911CoverageLow fires below this share "
            "(0 until coverage is first computed, so nothing fires before).",
            registry=r,
        )
        self.coverage_refreshes = Counter(
            "e911_sip_coverage_refreshes_total",
            "Coverage computations by result (ok, error).",
            ["result"],
            registry=r,
        )
        for result in ("ok", "error"):
            self.coverage_refreshes.labels(result)
        self.coverage_orders_forgotten = Counter(
            "e911_sip_coverage_orders_forgotten_total",
            "Failed endpoint orders dropped from memory at the bound "
            "(CoverageOptions.max_failed_orders).",
            registry=r,
        )

    def set_store_breaker(self, state: str, *, count: bool = True) -> None:
        """Show ``state`` as the breaker's current state and count the change."""
        for name in STORE_BREAKER_STATES:
            self.store_breaker.labels(name).set(1 if name == state else 0)
        if count:
            self.store_breaker_transitions.labels(state).inc()

    def render(self) -> bytes:
        """The registry in Prometheus text format."""
        return generate_latest(self.registry)


# -- several workers: one /metrics over all of them ---------------------------------------------

GAUGES_MAX = frozenset(
    {
        "e911_sip_build_info",
        "e911_sip_overload_limit",
        "e911_sip_event_loop_lag_seconds",
        "e911_sip_location_records",
        "e911_sip_location_sync_age_seconds",
        "e911_sip_store_breaker_state",
        "e911_sip_coverage_lines",
        "e911_sip_coverage_share",
        "e911_sip_coverage_endpoints_pending",
        "e911_sip_coverage_endpoints_failed",
        "e911_sip_coverage_alert_below",
        "e911_sip_call_records_backlog",
        "e911_sip_notification_queue_depth",
        "e911_sip_notification_dead_letters",
        "process_max_fds",
        "python_info",
    }
)
"""Gauges every worker reports the same thing for (a configured limit, a copy of shared
state, the worst case): the merged value is the highest. Other gauges count something each
worker holds (transactions, queued datagrams, memory) and are summed."""

GAUGES_MIN = frozenset({"e911_sip_store_up", "e911_sip_trunk_up", "process_start_time_seconds"})
"""Gauges where one worker's 0 must show: the merged value is the lowest."""

_ADDITIVE = frozenset({"counter", "histogram", "summary"})

SampleKey = tuple[str, tuple[tuple[str, str], ...]]


@dataclass(slots=True)
class Family:
    """One metric family parsed from Prometheus text: its type, help and samples."""

    type: str
    documentation: str
    samples: dict[SampleKey, float]


def parse_exposition(text: bytes) -> dict[str, Family]:
    """The families of a Prometheus text exposition (``_created`` series left out: a sum
    over processes has no single creation time)."""
    families: dict[str, Family] = {}
    for parsed in text_string_to_metric_families(text.decode("utf-8", "replace")):
        if parsed.name.endswith("_created"):
            continue
        samples: dict[SampleKey, float] = {}
        for sample in parsed.samples:
            if sample.name.endswith("_created"):
                continue
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        families[parsed.name] = Family(parsed.type, parsed.documentation, samples)
    return families


def additive_part(families: dict[str, Family]) -> dict[str, Family]:
    """Only the counters, histograms and summaries: what a dead worker leaves behind."""
    return {name: f for name, f in families.items() if f.type in _ADDITIVE}


def merge_families(parts: Iterable[dict[str, Family]]) -> dict[str, Family]:
    """One set of families from several processes' (see :data:`GAUGES_MAX`,
    :data:`GAUGES_MIN`; everything else is summed)."""
    merged: dict[str, Family] = {}
    for part in parts:
        for name, family in part.items():
            into = merged.get(name)
            if into is None:
                merged[name] = Family(family.type, family.documentation, dict(family.samples))
                continue
            combine: Callable[[float, float], float]
            if family.type == "gauge" and name in GAUGES_MAX:
                combine = max
            elif family.type == "gauge" and name in GAUGES_MIN:
                combine = min
            else:
                combine = _add
            for key, value in family.samples.items():
                have = into.samples.get(key)
                into.samples[key] = value if have is None else combine(have, value)
    return merged


def _add(a: float, b: float) -> float:
    return a + b


class _Families(Collector):
    def __init__(self, families: dict[str, Family]) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        for name, family in self._families.items():
            metric = Metric(name, family.documentation, family.type)
            for (sample, labels), value in family.samples.items():
                metric.add_sample(sample, dict(labels), value)
            yield metric


def render_families(families: dict[str, Family]) -> bytes:
    """Prometheus text of ``families``."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(families))
    return generate_latest(registry)


class _PerWorkerCounter(Collector):
    """A counter per worker slot read from the dispatcher's own tallies when scraped: the
    dispatcher counts in a plain dict, the cheapest thing per datagram."""

    def __init__(self, name: str, documentation: str) -> None:
        self._name = name
        self._documentation = documentation
        self._function: Callable[[], dict[int, int]] = dict

    def set_function(self, function: Callable[[], dict[int, int]]) -> None:
        self._function = function

    def collect(self) -> Iterable[Metric]:
        family = CounterMetricFamily(self._name, self._documentation, labels=["worker"])
        for slot, count in sorted(self._function().items()):
            family.add_metric([str(slot)], count)
        yield family


class SupervisorMetrics:
    """The supervisor's own series, beside the merged ones of its workers."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.worker_restarts = Counter(
            "e911_sip_worker_restarts",
            "Edge workers started again after they exited unasked, by worker slot.",
            ["worker"],
            registry=r,
        )
        self.workers = Gauge(
            "e911_sip_workers",
            "Edge workers by state: configured, live (receiving datagrams), ready.",
            ["state"],
            registry=r,
        )
        self.dispatched = _PerWorkerCounter(
            "e911_sip_worker_datagrams",
            "Datagrams the dispatcher handed to each worker slot.",
        )
        r.register(self.dispatched)
        self.dispatch_claims = Gauge(
            "e911_sip_dispatch_claims",
            "Call-IDs claimed by the worker whose TCP/TLS stream carried them, remembered by "
            "the dispatcher so their UDP messages go to that worker (at most 65,536, the "
            "oldest forgotten first).",
            registry=r,
        )
        self.dispatch_dropped = Counter(
            "e911_sip_dispatch_dropped",
            "Datagrams the dispatcher dropped, by reason: no_worker (none live), worker_busy "
            "(its channel full), worker_gone (its end closed), untrusted_source (from outside "
            "the trust domain, also counted in e911_sip_messages_discarded_total).",
            ["reason"],
            registry=r,
        )
        self.discarded = Counter(
            "e911_sip_messages_discarded",
            "Messages dropped or answered with an error by the edge itself, by reason.",
            ["reason"],
            registry=r,
        )

    def render(self) -> bytes:
        """The registry in Prometheus text format."""
        return generate_latest(self.registry)
