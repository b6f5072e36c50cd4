"""Labelled children bound once; the build the process runs."""

from __future__ import annotations

from prometheus_client import generate_latest

from e911_sip import __version__, build
from e911_sip.metrics import Children, Metrics
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
