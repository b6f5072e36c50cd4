"""911 through a flood, on the real edge process: SIPp probes while unique INVITEs pour in.

The edge is configured with small bounds (a few hundred transactions, a short receive queue)
so that it sheds on any machine, fast or slow: the table bound is a count, not a rate. What
is checked is what must hold whatever the machine's speed: every probe reaches the trunk and
completes, the flood gets 503 with Retry-After, and the edge counts what it shed.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from tests.integration.flood import UdpFlood
from tests.integration.harness import (
    EdgeProcess,
    SilentUdpPeer,
    Sipp,
    edge_config,
    free_port,
    trunk_uri,
)

EdgeFactory = Callable[..., EdgeProcess]

FLOOD_INVITES = 3000
FLOOD_RATE = 1500.0
PROBES = 8


def test_911_probes_complete_through_a_flood_of_new_calls(
    edge_factory: EdgeFactory, sipp: Sipp, silent_udp_peer: SilentUdpPeer
) -> None:
    trunk = free_port("udp")
    uas = sipp.uas("uas_no_location.xml", port=trunk, calls=PROBES, timeout=120.0)
    edge = edge_factory(
        edge_config(
            sip_port=free_port("both"),
            http_port=free_port("tcp"),
            emergency_trunks=[trunk_uri(trunk)],
            # The flood's calls ring nowhere: their client transactions stay and retransmit.
            default_trunks=[silent_udp_peer.uri],
            overload={
                "max_transactions": 300,
                "shed_transactions": 300,
                "max_contexts": 200,
                "max_queue": 50,
                "queue_limit": 2000,
                "max_lag": 0.02,
                "retry_after": 3,
            },
        )
    )
    with UdpFlood(("127.0.0.1", edge.sip_port)) as flood:
        sender = threading.Thread(
            target=flood.send, args=(FLOOD_INVITES,), kwargs={"rate": FLOOD_RATE}, daemon=True
        )
        sender.start()
        try:
            # The probes start once the table is full of flood calls.
            assert flood.wait_sent(600), "the flood did not get going"
            caller = sipp.uac("uac_911.xml", edge.sip_target, calls=PROBES, rate=5, timeout=60.0)
        finally:
            sender.join(timeout=60)
        assert not sender.is_alive()
        assert caller.ok, caller.summary()
        trunk_result = uas.wait(timeout=60.0)
        assert trunk_result.ok, trunk_result.summary()
        assert flood.sent == FLOOD_INVITES
        assert flood.retry_after > 0, dict(flood.statuses)

    assert edge.metric("e911_sip_emergency_results_total", status_class="2xx") == PROBES
    assert edge.metric("e911_sip_requests_total", method="INVITE", route="emergency") == PROBES
    shed = edge.metric("e911_sip_shed_total") or 0.0
    assert shed > 0
    assert edge.metric("e911_sip_overload_limit", limit="max_transactions") == 300
    # Every refusal is counted, but the log holds a summary, not a line per request.
    refused_lines = edge.log_text().count("overloaded: request refused with 503")
    assert refused_lines < shed
    assert edge.running
