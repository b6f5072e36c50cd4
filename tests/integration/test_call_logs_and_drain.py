"""What the real process logs about a call, and how SIGTERM ends it.

Every log line about an emergency call carries the same call fields, whatever happened to it
(no location, a failover); SIGTERM with nothing that needs the process exits without waiting
out a dead trunk's client transactions, and says what the drain waited for.
"""

from __future__ import annotations

import json
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.integration.harness import (
    DEFAULT_CALLER,
    DEFAULT_ENDPOINT,
    EdgeProcess,
    SilentUdpPeer,
    Sipp,
    edge_config,
    free_port,
    trunk_uri,
)

EdgeFactory = Callable[..., EdgeProcess]

CALL_FIELDS = ("call_id", "caller", "number", "outcome", "enriched", "trunk", "attempt")


def lines(edge: EdgeProcess) -> list[dict[str, Any]]:
    out = []
    for line in edge.log_text().splitlines():
        if line.startswith("{"):
            out.append(json.loads(line))
    return out


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.05)


def start_edge(
    edge_factory: EdgeFactory,
    *,
    trunks: list[str],
    default: list[str] | None = None,
    seed_file: Path | None = None,
    **overrides: Any,
) -> EdgeProcess:
    emergency = {"provisional_timeout": 0.5, **overrides.pop("emergency", {})}
    config = edge_config(
        sip_port=free_port("both"),
        http_port=free_port("tcp"),
        emergency_trunks=trunks,
        default_trunks=default or [trunk_uri(free_port("udp"))],
        seed_file=seed_file,
        emergency=emergency,
        **overrides,
    )
    return edge_factory(config)


def check_call_lines(edge: EdgeProcess, *, outcome: str, enriched: bool, trunks: list[str]) -> None:
    """The call's lines all carry every call field; its forwarded lines say where it went."""
    about = [
        line for line in lines(edge) if "call_id" in line and line["logger"] == "e911_sip.edge"
    ]
    assert about, edge.log_text()
    for line in about:
        missing = [name for name in CALL_FIELDS if name not in line]
        assert not missing, f"{line['msg']!r} lacks {missing}: {line}"
        assert line["number"] == "911", line
        assert line["caller"] == DEFAULT_CALLER, line
        assert line["outcome"] == outcome, line
    forwarded = [line for line in about if line["msg"] == "emergency call forwarded"]
    assert [(f["trunk"], f["attempt"]) for f in forwarded] == [
        (trunk, n) for n, trunk in enumerate(trunks, 1)
    ]
    assert all(f["enriched"] is enriched for f in forwarded), forwarded
    failed = [line for line in about if line["msg"] == "trunk failed, trying the next one"]
    assert [f["trunk"] for f in failed] == trunks[:-1]


def test_no_location_after_a_failover_every_line_carries_the_call(
    edge_factory: EdgeFactory, sipp: Sipp
) -> None:
    second = free_port("udp")
    working = sipp.uas("uas_no_location.xml", port=second)
    with SilentUdpPeer() as silent:
        edge = start_edge(edge_factory, trunks=[silent.uri, trunk_uri(second)])
        caller = sipp.uac("uac_911.xml", edge.sip_target)
        assert caller.ok, caller.summary()
        assert working.wait().ok
    check_call_lines(
        edge, outcome="no_location", enriched=False, trunks=[silent.uri, trunk_uri(second)]
    )
    warned = [line for line in lines(edge) if line["msg"].startswith("emergency call without")]
    assert len(warned) == 1 and warned[0]["enriched"] is False


def test_enriched_after_a_failover_every_line_carries_the_call(
    edge_factory: EdgeFactory, sipp: Sipp, tmp_path: Path
) -> None:
    seed = tmp_path / "locations.json"
    seed.write_text(json.dumps({DEFAULT_CALLER: {"provider_endpoint": DEFAULT_ENDPOINT}}))
    second = free_port("udp")
    working = sipp.uas("uas_emergency.xml", port=second)
    with SilentUdpPeer() as silent:
        edge = start_edge(edge_factory, trunks=[silent.uri, trunk_uri(second)], seed_file=seed)
        caller = sipp.uac("uac_911.xml", edge.sip_target)
        assert caller.ok, caller.summary()
        assert working.wait().ok
    check_call_lines(
        edge, outcome="enriched", enriched=True, trunks=[silent.uri, trunk_uri(second)]
    )


def _invite(edge_port: int, local_port: int, number: str, call_id: str) -> bytes:
    return (
        f"INVITE sip:{number}@127.0.0.1:{edge_port} SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 127.0.0.1:{local_port};branch=z9hG4bK-{call_id};rport\r\n"
        "Max-Forwards: 70\r\n"
        f"From: <sip:{DEFAULT_CALLER}@127.0.0.1>;tag=drain1\r\n"
        f"To: <sip:{number}@127.0.0.1>\r\n"
        f"Call-ID: {call_id}\r\n"
        "CSeq: 1 INVITE\r\n"
        f"Contact: <sip:{DEFAULT_CALLER}@127.0.0.1:{local_port}>\r\n"
        "Content-Length: 0\r\n\r\n"
    ).encode()


def test_sigterm_does_not_wait_out_a_dead_trunks_transactions(
    edge_factory: EdgeFactory, sipp: Sipp
) -> None:
    """A finished 911 call leaves its first, silent trunk's INVITE transaction behind (Timer
    B, 32 s); a non-emergency INVITE waits on a silent default trunk. Neither holds the drain
    (the drain timeout is a minute here, so waiting for them would outlast the bound)."""
    second = free_port("udp")
    working = sipp.uas("uas_no_location.xml", port=second)
    with SilentUdpPeer() as silent, SilentUdpPeer() as silent_default:
        edge = start_edge(
            edge_factory,
            trunks=[silent.uri, trunk_uri(second)],
            default=[silent_default.uri],
            shutdown={"drain_timeout": 60},
        )
        caller = sipp.uac("uac_911.xml", edge.sip_target)
        assert caller.ok, caller.summary()
        assert working.wait().ok
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind(("127.0.0.1", 0))
            sock.settimeout(5.0)
            port = sock.getsockname()[1]
            sock.sendto(
                _invite(edge.sip_port, port, "2125550100", "drain-1"), ("127.0.0.1", edge.sip_port)
            )
            assert sock.recvfrom(65535)[0].startswith(b"SIP/2.0 100 ")
            wait_for(lambda: silent_default.count >= 1, "the INVITE to reach the default trunk")
            assert (edge.metric("e911_sip_transactions_in_flight") or 0) >= 2
            edge.signal(signal.SIGTERM)
            assert edge.wait(timeout=20) == 0
    finished = [line for line in lines(edge) if line["msg"] == "drain finished"]
    assert len(finished) == 1, edge.log_text()
    assert finished[0]["reason"] == "idle"
    assert finished[0]["emergency_calls"] == 0 and finished[0]["emergency_dialogs"] == 0
    assert finished[0]["not_waited_for"]["transactions"] >= 2


def test_sigterm_waits_for_a_911_call_being_set_up_and_says_so(
    edge_factory: EdgeFactory,
) -> None:
    """A 911 INVITE with no final response yet holds the drain, which logs what it waits
    for; a second SIGTERM ends the wait."""
    with SilentUdpPeer() as silent:
        edge = start_edge(
            edge_factory,
            trunks=[silent.uri],
            emergency={"provisional_timeout": 30},
            shutdown={"drain_timeout": 60},
        )
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind(("127.0.0.1", 0))
            sock.settimeout(5.0)
            port = sock.getsockname()[1]
            sock.sendto(
                _invite(edge.sip_port, port, "911", "drain-911"), ("127.0.0.1", edge.sip_port)
            )
            assert sock.recvfrom(65535)[0].startswith(b"SIP/2.0 100 ")
            wait_for(lambda: silent.count >= 1, "the INVITE to reach the trunk")
            edge.signal(signal.SIGTERM)

            def waiting() -> list[dict[str, Any]]:
                return [
                    line for line in lines(edge) if line["msg"] == "draining: waiting for calls"
                ]

            wait_for(lambda: bool(waiting()), "the drain to say what it waits for")
            assert waiting()[0]["emergency_calls"] == 1
            assert edge.running
            edge.signal(signal.SIGTERM)
            assert edge.wait(timeout=20) == 0
    finished = [line for line in lines(edge) if line["msg"] == "drain finished"]
    assert [f["reason"] for f in finished] == ["forced"]
