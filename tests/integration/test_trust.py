"""The trust domain through the real edge process: outsiders, forged responses, locations.

The attacker uses its own loopback address, 127.0.0.9, outside the default trusted sources
(127.0.0.1/32 and ::1/128); the softswitch (SIPp or a socket on 127.0.0.1) is inside them.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.integration.harness import (
    DEFAULT_CALLER,
    DEFAULT_ENDPOINT,
    EdgeProcess,
    RedisServer,
    SilentUdpPeer,
    Sipp,
    edge_config,
    free_port,
    trunk_uri,
)

EdgeFactory = Callable[..., EdgeProcess]
ATTACKER = "127.0.0.9"
PROVISIONED = "3215551000"


def start_edge(edge_factory: EdgeFactory, *, trunks: list[str], **overrides: Any) -> EdgeProcess:
    config = edge_config(
        sip_port=free_port("both"),
        http_port=free_port("tcp"),
        emergency_trunks=trunks,
        default_trunks=overrides.pop("default_trunks", [trunk_uri(free_port("udp"))]),
        **overrides,
    )
    return edge_factory(config)


def wait_metric(edge: EdgeProcess, name: str, value: float, **labels: str) -> None:
    deadline = time.monotonic() + 15.0
    while (edge.metric(name, **labels) or 0.0) < value:
        assert time.monotonic() < deadline, f"{name}{labels} never reached {value}"
        time.sleep(0.02)


@pytest.fixture
def attacker() -> Iterator[socket.socket]:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((ATTACKER, 0))
        yield sock


def request(
    method: str, ruri: str, *, call_id: str, to_tag: str = "", extra: str = "", via: str
) -> bytes:
    tag = f";tag={to_tag}" if to_tag else ""
    return (
        f"{method} {ruri} SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP {via};branch=z9hG4bK-{call_id}-{method.lower()};rport\r\n"
        "Max-Forwards: 70\r\n"
        f"From: <sip:{PROVISIONED}@{via.split(':')[0]}>;tag=a1\r\n"
        f"To: <{ruri}>{tag}\r\nCall-ID: {call_id}\r\nCSeq: 1 {method}\r\n"
        f"Contact: <sip:{PROVISIONED}@{via}>\r\n{extra}Content-Length: 0\r\n\r\n"
    ).encode()


def no_datagram(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        sock.recvfrom(65535)
    except BlockingIOError:
        return True
    finally:
        sock.setblocking(True)
    return False


def keepalive(edge: EdgeProcess) -> bytes:
    """An OPTIONS from the softswitch, answered by the edge: proves earlier datagrams were
    handled (one socket, read in order) and that trusted traffic is still served."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(5.0)
        via = f"127.0.0.1:{sock.getsockname()[1]}"
        sock.sendto(
            request("OPTIONS", f"sip:127.0.0.1:{edge.sip_port}", call_id="ka", via=via),
            ("127.0.0.1", edge.sip_port),
        )
        reply, _ = sock.recvfrom(65535)
        return reply


def relay_attempts(edge: EdgeProcess, target: SilentUdpPeer, attacker: socket.socket) -> int:
    via = f"{ATTACKER}:{attacker.getsockname()[1]}"
    edge_uri = f"sip:911@127.0.0.1:{edge.sip_port}"
    elsewhere = f"sip:victim@127.0.0.1:{target.port}"
    attempts = [
        # A 911 call claiming a provisioned line's identity: it must not get that location,
        # nor any path to the emergency trunk.
        request(
            "INVITE",
            edge_uri,
            call_id="r1",
            via=via,
            extra=f"P-Asserted-Identity: <sip:{PROVISIONED}@127.0.0.1>\r\nPrivacy: id\r\n",
        ),
        request(
            "INVITE",
            f"sip:2125550100@127.0.0.1:{edge.sip_port}",
            call_id="r2",
            via=via,
            extra=f"Route: <sip:127.0.0.1:{target.port};lr>\r\n",
        ),
        request("MESSAGE", elsewhere, call_id="r3", to_tag="x", via=via),
        request("ACK", elsewhere, call_id="r4", to_tag="x", via=via),
        request("OPTIONS", elsewhere, call_id="r5", via=via),
    ]
    for data in attempts:
        attacker.sendto(data, ("127.0.0.1", edge.sip_port))
    return len(attempts)


def test_nothing_from_outside_the_trust_domain_is_relayed(
    edge_factory: EdgeFactory, attacker: socket.socket, redis_server: RedisServer
) -> None:
    redis_server.client().hset(f"e911:line:{PROVISIONED}", "provider_endpoint", "5555555/e1")
    with SilentUdpPeer() as trunk, SilentUdpPeer() as target:
        edge = start_edge(
            edge_factory,
            trunks=[trunk.uri],
            default_trunks=[trunk.uri],
            store_url=redis_server.url,
        )
        sent = relay_attempts(edge, target, attacker)
        wait_metric(edge, "e911_sip_messages_discarded_total", sent, reason="untrusted_source")
        assert keepalive(edge).startswith(b"SIP/2.0 200 OK\r\n")
        assert trunk.count == 0 and target.count == 0
        assert no_datagram(attacker)  # dropped: no reply to reflect off a spoofed source
        assert not edge.metric("e911_sip_emergency_calls_total")
        assert not edge.metric("e911_sip_requests_total", route="emergency")


def test_reject_answers_403_to_the_source_only(
    edge_factory: EdgeFactory, attacker: socket.socket
) -> None:
    with SilentUdpPeer() as trunk:
        edge = start_edge(edge_factory, trunks=[trunk.uri], security={"untrusted": "reject"})
        via = f"{ATTACKER}:{attacker.getsockname()[1]}"
        attacker.settimeout(5.0)
        attacker.sendto(
            request("INVITE", f"sip:911@127.0.0.1:{edge.sip_port}", call_id="j1", via=via),
            ("127.0.0.1", edge.sip_port),
        )
        reply, source = attacker.recvfrom(65535)
        assert reply.startswith(b"SIP/2.0 403 Forbidden\r\n")
        assert source == ("127.0.0.1", edge.sip_port)
        # One 403 and no retransmission cycle: the reply is stateless.
        assert edge.metric("e911_sip_transactions_in_flight") == 0
        assert keepalive(edge).startswith(b"SIP/2.0 200 OK\r\n")
        assert trunk.count == 0


class ScriptedUdpTrunk:
    """A trunk the test drives message by message, on 127.0.0.1."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(10.0)
        self.port = int(self.sock.getsockname()[1])

    @property
    def uri(self) -> str:
        return trunk_uri(self.port)

    def receive(self, method: str) -> tuple[bytes, tuple[str, int]]:
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:
            data, source = self.sock.recvfrom(65535)
            if data.startswith(method.encode() + b" "):
                return data, source
        raise AssertionError(f"no {method} reached the trunk")

    def response(self, request: bytes, status: int, reason: str) -> bytes:
        lines = [f"SIP/2.0 {status} {reason}"]
        for line in request.split(b"\r\n\r\n", 1)[0].decode().split("\r\n")[1:]:
            name = line.split(":", 1)[0].strip().lower()
            if name in ("via", "from", "call-id", "cseq", "record-route"):
                lines.append(line)
            elif name == "to":
                lines.append(line if ";tag=" in line else f"{line};tag=trunk-1")
        lines += [f"Contact: <sip:911@127.0.0.1:{self.port}>", "Content-Length: 0"]
        return ("\r\n".join(lines) + "\r\n\r\n").encode()

    def close(self) -> None:
        self.sock.close()


def test_a_forged_response_does_not_end_a_911_call(
    edge_factory: EdgeFactory, sipp: Sipp, attacker: socket.socket
) -> None:
    trunk = ScriptedUdpTrunk()
    with SilentUdpPeer() as second:
        edge = start_edge(edge_factory, trunks=[trunk.uri, second.uri])
        caller = sipp.start_uac("uac_911.xml", edge.sip_target)
        invite, edge_address = trunk.receive("INVITE")
        trunk.sock.sendto(trunk.response(invite, 180, "Ringing"), edge_address)
        forged = trunk.response(invite, 503, "Service Unavailable")
        attacker.sendto(forged, edge_address)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as same_host:
            same_host.bind(("127.0.0.1", 0))
            same_host.sendto(forged, edge_address)
        wait_metric(edge, "e911_sip_messages_discarded_total", 2, reason="response_source")
        trunk.sock.sendto(trunk.response(invite, 200, "OK"), edge_address)
        trunk.receive("ACK")
        bye, source = trunk.receive("BYE")
        trunk.sock.sendto(trunk.response(bye, 200, "OK"), source)
        result = caller.wait()
        assert result.ok, result.summary()
        assert second.count == 0, "a forged 503 moved the call to the next trunk"
        assert edge.metric("e911_sip_emergency_results_total", status_class="2xx") == 1
        assert not edge.metric("e911_sip_trunk_failovers_total")
    trunk.close()


@pytest.mark.parametrize("provisioned", [False, True], ids=["unprovisioned", "provisioned"])
def test_a_device_location_does_not_reach_the_trunk(
    edge_factory: EdgeFactory, sipp: Sipp, redis_server: RedisServer, provisioned: bool
) -> None:
    if provisioned:
        redis_server.client().hset(
            f"e911:line:{DEFAULT_CALLER}", "provider_endpoint", DEFAULT_ENDPOINT
        )
    port = free_port("udp")
    uas = sipp.uas("uas_emergency.xml" if provisioned else "uas_no_location.xml", port=port)
    edge = start_edge(edge_factory, trunks=[trunk_uri(port)], store_url=redis_server.url)
    caller = sipp.uac("uac_911_device_location.xml", edge.sip_target)
    assert caller.ok, caller.summary()
    trunk = uas.wait()
    assert trunk.ok, trunk.summary()
    assert "removed a Geolocation the edge did not write" in edge.log_text()
