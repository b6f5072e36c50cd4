"""A rolling upgrade across two hosts: two real edges in front of one SIPp trunk, SIPp calls
(911 and ordinary) through both, SIGTERM to edge A in the middle.

The test plays PortaSIP: its route list is [A, B], and it sends a new call to the first host
that answers its OPTIONS keepalive with 200. One ordinary call on A is placed by the test
itself over TCP (``PinnedCall``) and hung up only at the end, so A is provably draining, not
gone, while every check runs; the SIPp calls answered on A before the SIGTERM hang up through
A during the drain. Every wait is bounded and waits on an event (a metric, a reply, an exit).
"""

from __future__ import annotations

import json
import signal
import socket
import time
from collections.abc import Callable
from typing import Any

from tests.integration.harness import (
    EdgeProcess,
    Sipp,
    SippProcess,
    edge_config,
    free_port,
    trunk_uri,
)
from tests.integration.streampeers import header_lines, in_dialog, invite, options, read_message

EdgeFactory = Callable[..., EdgeProcess]

ORDINARY = "2125550100"
HOLD_BEFORE_MS = "3000"
"""Talk time of the calls placed before the SIGTERM: they are normally still up when it
comes; nothing fails if a slow machine lets them end first (the pinned call still is)."""


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def keepalive(edge: EdgeProcess) -> tuple[int, str | None]:
    """PortaSIP's OPTIONS to the edge over UDP: (status, Retry-After)."""
    call_id = f"keepalive-{time.monotonic_ns()}"
    # rport: the answer comes back to this socket's port, not the one in the Via.
    request = options(edge.sip_port, "udp", call_id=call_id).replace(
        f"branch=z9hG4bK{call_id}".encode(), f"branch=z9hG4bK{call_id};rport".encode()
    )
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(5.0)
        sock.sendto(request, ("127.0.0.1", edge.sip_port))
        reply, _ = sock.recvfrom(65535)
    status = int(reply.split(b" ", 2)[1])
    retry = header_lines(reply, "retry-after")
    return status, retry[0] if retry else None


def route(hosts: list[EdgeProcess]) -> EdgeProcess:
    """The softswitch's route list: the first host whose keepalive is answered 200."""
    for host in hosts:
        if keepalive(host)[0] == 200:
            return host
    raise AssertionError("no host in the route list answers its keepalive")


class PinnedCall:
    """An ordinary call from the softswitch over TCP whose BYE the test sends when it wants."""

    def __init__(self, edge: EdgeProcess, call_id: str) -> None:
        self.call_id = call_id
        self.stream = socket.create_connection(("127.0.0.1", edge.sip_port), timeout=10.0)
        self.buffer = bytearray()
        self.invite = invite(edge.sip_port, "tcp", call_id=call_id, number=ORDINARY)
        self.stream.sendall(self.invite)
        self.ok = self._final("INVITE")
        assert self.ok.startswith(b"SIP/2.0 200 "), self.ok[:200]
        self.stream.sendall(in_dialog("ACK", 1, self.invite, self.ok, call_id=call_id))

    def _final(self, method: str) -> bytes:
        """The next final response to ``method`` (2xx retransmissions of the INVITE may
        still arrive before the BYE's answer)."""
        while True:
            message = read_message(self.stream, self.buffer)
            assert message is not None, "the edge closed the connection"
            if not message.startswith(b"SIP/2.0 ") or message.startswith(b"SIP/2.0 1"):
                continue
            if header_lines(message, "cseq")[0].split()[-1] == method:
                return message

    def hang_up(self) -> bytes:
        self.stream.sendall(in_dialog("BYE", 2, self.invite, self.ok, call_id=self.call_id))
        reply = self._final("BYE")
        self.stream.close()
        return reply


def start(edge_factory: EdgeFactory, trunk: str) -> EdgeProcess:
    return edge_factory(
        edge_config(
            sip_port=free_port("both"),
            http_port=free_port("tcp"),
            emergency_trunks=[trunk],
            default_trunks=[trunk],
        )
    )


def calls(
    sipp: Sipp, edge: EdgeProcess, *, hold_ms: str, emergency: int, ordinary: int
) -> list[SippProcess]:
    keys = {"hold_ms": hold_ms}
    return [
        sipp.start_uac("uac_load", edge.sip_target, service="911", calls=emergency, keys=keys),
        sipp.start_uac("uac_load", edge.sip_target, service=ORDINARY, calls=ordinary, keys=keys),
    ]


def metric(edge: EdgeProcess, name: str, **labels: str) -> float:
    return edge.metric(name, **labels) or 0.0


def drain_lines(edge: EdgeProcess, message: str) -> list[dict[str, Any]]:
    out = []
    for line in edge.log_text().splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            if record.get("msg") == message:
                out.append(record)
    return out


def test_sigterm_steers_new_calls_to_the_other_host_and_finishes_the_calls_it_holds(
    edge_factory: EdgeFactory, sipp: Sipp
) -> None:
    trunk_port = free_port("udp")
    # Before: 2 + 2 on each host, plus the pinned call on A. After: 2 + 2 on B, 1 911 on A.
    total = 2 * 4 + 1 + 4 + 1
    trunk = sipp.uas("uas_load", port=trunk_port, calls=total, timeout=120.0)
    a = start(edge_factory, trunk_uri(trunk_port))
    b = start(edge_factory, trunk_uri(trunk_port))
    hosts = [a, b]
    assert keepalive(a) == (200, None) and keepalive(b) == (200, None)

    before = calls(sipp, a, hold_ms=HOLD_BEFORE_MS, emergency=2, ordinary=2)
    before += calls(sipp, b, hold_ms=HOLD_BEFORE_MS, emergency=2, ordinary=2)
    pinned = PinnedCall(a, "pinned-1")
    # The calls on A answered (911) or relayed to the trunk (ordinary) before the SIGTERM.
    wait_for(
        lambda: metric(a, "e911_sip_emergency_results_total", status_class="2xx") >= 2,
        "A's 911 calls to be answered",
    )
    wait_for(
        lambda: metric(a, "e911_sip_requests_total", method="INVITE", route="default") >= 3,
        "A's ordinary calls to reach the trunk",
    )
    assert metric(a, "e911_sip_dialogs", kind="other") >= 1  # the pinned call at least

    a.signal(signal.SIGTERM)
    wait_for(lambda: keepalive(a)[0] == 503, "A to answer its keepalive 503")
    status, retry_after = keepalive(a)
    assert status == 503 and retry_after is not None and int(retry_after) > 0
    assert a.http_get("/readyz")[0] == 503

    # The softswitch moves on: new calls go to B.
    target = route(hosts)
    assert target is b
    after = calls(sipp, target, hold_ms="200", emergency=2, ordinary=2)
    # Rule one: a 911 call that still reaches A is served as usual.
    late = sipp.start_uac("uac_load", a.sip_target, service="911", calls=1)

    results = [process.wait(timeout=60.0) for process in [*before, *after, late]]
    for result in results:
        assert result.ok, result.summary()  # 0 failed calls; BYEs of A's calls went via A
    assert sum(result.successful for result in results) == 2 * 4 + 4 + 1

    # Still draining, not gone: the pinned call answered before the SIGTERM holds it.
    assert a.running and keepalive(a)[0] == 503
    assert pinned.hang_up().startswith(b"SIP/2.0 200 ")
    assert a.wait(timeout=30.0) == 0
    finished = drain_lines(a, "drain finished")
    assert finished and finished[0]["reason"] == "idle"
    waiting = drain_lines(a, "draining: waiting for calls")
    assert waiting and waiting[0]["dialogs"] >= 1

    assert keepalive(b) == (200, None) and b.http_get("/readyz")[0] == 200
    assert metric(b, "e911_sip_emergency_results_total", status_class="2xx") == 4
    assert metric(b, "e911_sip_dialogs", kind="other") == 0
    checked = trunk.wait(timeout=60.0)
    assert checked.ok, checked.summary()
