"""The edge's reporting of trunk health: logs, metrics and readiness, on the real loop timer."""

from __future__ import annotations

import functools
import ipaddress
import logging
import random

import pytest

from e911_sip.edge import Edge, EdgeOptions
from e911_sip.metrics import Metrics
from e911_sip.policy.emergency import emergency_number
from e911_sip.policy.enrich import EnrichOptions
from e911_sip.proxy.core import ProxyCore, ProxyOptions
from e911_sip.proxy.routing import LocalAddress
from e911_sip.proxy.trunks import ProbeOptions
from e911_sip.sip.message import Request, parse
from e911_sip.sip.peer import Peer
from e911_sip.store.memory import MemoryStore
from e911_sip.store.resilient import LookupOptions, ResilientLookup
from e911_sip.transport.recording import RecordingTransport
from tests.unit.proxy.test_core import response_to
from tests.unit.test_edge import BASE, until

T1, T2 = "sip:198.51.100.1:5060", "sip:198.51.100.2:5060"
DEFAULT = "sip:203.0.113.5:5060"
PEER1 = Peer("udp", "198.51.100.1", 5060)


def build() -> tuple[Edge, RecordingTransport, Metrics]:
    options = ProxyOptions(
        local=(LocalAddress("udp", "192.0.2.1", 5070),),
        emergency_classifier=functools.partial(emergency_number, numbers=frozenset({"911"})),
        emergency_trunks=(T1, T2),
        default_trunks=(DEFAULT,),
        emergency_probe=ProbeOptions(interval=0.2, timeout=0.1, failures=1),
        trusted_sources=(ipaddress.ip_network("192.0.2.0/24"),),
    )
    metrics = Metrics()
    store = MemoryStore()
    edge = Edge(
        core=ProxyCore(options=options, entropy=random.Random(1).randbytes),
        store=store,
        lookup=ResilientLookup(store, options=LookupOptions()),
        metrics=metrics,
        options=EdgeOptions(enrich=EnrichOptions(geolocation_base_url=BASE)),
    )
    transport = RecordingTransport(sink=edge)
    edge.add_transport("udp", transport)
    edge.start()
    return edge, transport, metrics


def trunk_up(metrics: Metrics, trunk: str, route: str = "emergency") -> float | None:
    return metrics.registry.get_sample_value("e911_sip_trunk_up", {"trunk": trunk, "route": route})


def probes_to(transport: RecordingTransport, host: str) -> list[bytes]:
    out = []
    for sent in transport.sent:
        message = parse(sent.data)
        if sent.peer.host == host and isinstance(message, Request) and message.method == "OPTIONS":
            out.append(sent.data)
    return out


async def test_down_and_up_are_logged_counted_and_shown_in_readiness(
    caplog: pytest.LogCaptureFixture,
) -> None:
    edge, transport, metrics = build()
    assert trunk_up(metrics, T1) == 1 and trunk_up(metrics, DEFAULT, "default") == 1
    with caplog.at_level(logging.INFO, logger="e911_sip.edge"):
        # Nobody answers: the probes started by the edge itself time out.
        await until(lambda: trunk_up(metrics, T1) == 0 and trunk_up(metrics, T2) == 0)
        ready, details = edge.readiness()
        assert ready  # every trunk is still tried: the edge stays in service
        assert details["emergency_trunks"] == "all_down"
        trunks = details["trunks"]
        assert isinstance(trunks, dict)
        assert trunks["emergency"][T1]["state"] == "down"
        assert trunks["emergency"][T1]["last_result"] == "timeout"
        assert trunks["default"][DEFAULT]["state"] == "not_probed"
        timeouts = metrics.registry.get_sample_value(
            "e911_sip_trunk_probes_total", {"trunk": T1, "result": "timeout"}
        )
        assert timeouts is not None and timeouts >= 1

        # Trunk 1 answers its probes again: up again. (Answering the newest probe until it
        # counts: on a loaded machine one may time out before its answer is fed in.)
        def answer_newest() -> bool:
            sent = probes_to(transport, PEER1.host)
            edge.message_received(response_to(sent[-1], 200, "OK"), PEER1)
            return trunk_up(metrics, T1) == 1

        await until(answer_newest)
        assert trunk_up(metrics, T1) == 1
        details = edge.readiness()[1]
        assert details["emergency_trunks"] == "degraded"
    down = [r for r in caplog.records if r.getMessage().startswith("trunk is down")]
    up = [r for r in caplog.records if r.getMessage().startswith("trunk is up")]
    assert {r.__dict__["trunk"] for r in down} == {T1, T2}
    assert all(r.levelno == logging.WARNING for r in down)
    assert [(r.__dict__["trunk"], r.levelno) for r in up] == [(T1, logging.INFO)]
    assert up[0].__dict__["routes"] == ["emergency"]
    edge.close()
