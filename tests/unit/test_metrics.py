"""Labelled children bound once; the message path's lock-free counters and histograms; the
build the process runs."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from e911_sip import __version__, build
from e911_sip.metrics import (
    Children,
    LoopCounter,
    LoopHistogram,
    Metrics,
    merge_families,
    parse_exposition,
)
from tests.integration.harness import metric_value


def test_a_child_is_bound_once_and_counts_like_labels() -> None:
    metrics = Metrics()
    failovers = Children(metrics.failovers)
    first = failovers("emergency", "sip:198.51.100.1", "timeout")
    assert failovers("emergency", "sip:198.51.100.1", "timeout") is first
    first.inc()
    metrics.failovers.labels("emergency", "sip:198.51.100.1", "timeout").inc()
    sample = metrics.registry.get_sample_value(
        "e911_sip_trunk_failovers_total",
        {"route": "emergency", "trunk": "sip:198.51.100.1", "reason": "timeout"},
    )
    assert sample == 2


def test_past_the_limit_children_still_count_but_are_not_kept() -> None:
    metrics = Metrics()
    discarded = Children(metrics.discarded, limit=2)
    for reason in ("a", "b", "c", "c"):
        discarded(reason).inc()
    assert len(discarded._bound) == 2
    sample = metrics.registry.get_sample_value("e911_sip_messages_discarded_total", {"reason": "c"})
    assert sample == 2


def test_the_build_is_a_metric() -> None:
    text = generate_latest(Metrics().registry).decode()
    # The build this test runs: compiled under scripts/check's second pass, pure under the first.
    assert (
        metric_value(text, "e911_sip_build_info", version=__version__, build=build.describe()) == 1
    )


def _without_created(
    registry: CollectorRegistry,
) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in registry.collect()
        for sample in family.samples
        if not sample.name.endswith("_created")
    }


BOUNDS = (0.0001, 0.0005, 0.001, 0.01)
VALUES = (0.0, 0.00005, 0.0001, 0.00010001, 0.0005, 0.0007, 0.001, 0.5, 3.0, 0.0001)


def test_a_loop_counter_exposes_what_a_counter_does() -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    counter = LoopCounter("x_requests", "Requests.", ["method", "route"], registry=ours)
    reference = Counter("x_requests_total", "Requests.", ["method", "route"], registry=theirs)
    for method, amount in (("INVITE", 1.0), ("BYE", 2.5), ("INVITE", 1.0)):
        counter.labels(method, "emergency").inc(amount)
        reference.labels(method, "emergency").inc(amount)
    assert _without_created(ours) == _without_created(theirs)
    assert (
        ours.get_sample_value("x_requests_total", {"method": "INVITE", "route": "emergency"}) == 2
    )
    # Each child has its creation time, as prometheus_client's do.
    text = generate_latest(ours).decode()
    assert 'x_requests_created{method="BYE",route="emergency"}' in text
    assert text.count("# TYPE x_requests_total counter") == 1


def test_a_loop_counter_without_labels_and_its_checks() -> None:
    registry = CollectorRegistry()
    counter = LoopCounter("x_events", "Events.", (), registry=registry)
    counter.inc()
    counter.inc(2)
    assert registry.get_sample_value("x_events_total") == 3
    with pytest.raises(ValueError, match="non-negative"):
        counter.inc(-1)
    labelled = LoopCounter("x_other", "Other.", ["reason"], registry=registry)
    with pytest.raises(ValueError, match="1 label values expected, got 2"):
        labelled.labels("a", "b")
    # A label value given as an int is the same child every time, written as prometheus_client
    # writes it.
    by_status = LoopCounter("x_status", "By status.", ["status"], registry=registry)
    by_status.labels(5).inc()  # type: ignore[arg-type]
    by_status.labels(5).inc()  # type: ignore[arg-type]
    by_status.labels("5").inc()
    assert registry.get_sample_value("x_status_total", {"status": "5"}) == 3
    # A name already in the registry is refused, as for any collector.
    with pytest.raises(ValueError, match="Duplicated"):
        LoopCounter("x_events", "Again.", (), registry=registry)


def test_a_loop_histogram_exposes_what_a_histogram_does() -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    plain = LoopHistogram("x_seconds", "Latency.", buckets=BOUNDS, registry=ours)
    labelled = LoopHistogram("x_by_seconds", "By.", ["source"], buckets=BOUNDS, registry=ours)
    reference = Histogram("x_seconds", "Latency.", buckets=BOUNDS, registry=theirs)
    reference_labelled = Histogram(
        "x_by_seconds", "By.", ["source"], buckets=BOUNDS, registry=theirs
    )
    # On a bound counts in that bucket (le), above the last one only in +Inf.
    for value in VALUES:
        plain.observe(value)
        reference.observe(value)
        labelled.labels("store").observe(value * 2)
        reference_labelled.labels("store").observe(value * 2)
    labelled.labels("memory")
    reference_labelled.labels("memory")
    assert _without_created(ours) == _without_created(theirs)
    assert ours.get_sample_value("x_seconds_bucket", {"le": "0.0001"}) == 4
    assert ours.get_sample_value("x_seconds_bucket", {"le": "+Inf"}) == len(VALUES)
    assert ours.get_sample_value("x_seconds_count") == len(VALUES)
    assert "x_seconds_created " in generate_latest(ours).decode()


def test_loop_metrics_merge_across_workers_as_the_library_s_do() -> None:
    parts = []
    for invites in (3, 4):
        metrics = Metrics()
        metrics.requests.labels("INVITE", "emergency").inc(invites)
        metrics.enrich_seconds.observe(0.0004)
        parts.append(parse_exposition(metrics.render()))
    merged = merge_families(parts)
    requests = merged["e911_sip_requests"]
    assert requests.type == "counter"
    key = ("e911_sip_requests_total", (("method", "INVITE"), ("route", "emergency")))
    assert requests.samples[key] == 7
    enrich = merged["e911_sip_emergency_enrich_seconds"]
    assert enrich.type == "histogram"
    assert enrich.samples[("e911_sip_emergency_enrich_seconds_count", ())] == 2
