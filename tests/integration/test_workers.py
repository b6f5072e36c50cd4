"""Two edge workers behind one UDP address: the real supervisor, workers, redis-server and SIPp.

SIPp is given Call-ID formats (``-cid_str``) so the tests know, through the same
rendezvous hash the dispatcher uses, which worker owns each call.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from e911_sip.transport.dispatch import pick
from tests.integration.harness import (
    DEFAULT_CALLER,
    DEFAULT_ENDPOINT,
    LOOPBACK,
    EdgeProcess,
    RedisServer,
    Sipp,
    edge_config,
    free_port,
    port_bound_by,
    trunk_uri,
)

EdgeFactory = Callable[..., EdgeProcess]
BOTH = (0, 1)
TRUNK_HOST = "127.0.0.3"
"""A trunk outside the trust domain, which is 127.0.0.1 in these tests."""
START_TIMEOUT = 120.0
"""Two workers import and load on a 2-core host shared with other test runs."""


def provision(redis_server: RedisServer) -> None:
    redis_server.client().hset(
        f"e911:line:{DEFAULT_CALLER}",
        mapping={"provider_endpoint": DEFAULT_ENDPOINT, "updated_at": "2026-11-01T12:00:00Z"},
    )


def start_workers(
    edge_factory: EdgeFactory,
    redis_server: RedisServer,
    trunk: int,
    *,
    transports: tuple[str, ...] = ("udp",),
    trunk_host: str = LOOPBACK,
    **overrides: Any,
) -> EdgeProcess:
    config = edge_config(
        sip_port=free_port("both"),
        http_port=free_port("tcp"),
        emergency_trunks=[trunk_uri(trunk, host=trunk_host)],
        default_trunks=[trunk_uri(trunk, host=trunk_host)],
        store_url=redis_server.url,
        transports=transports,
        sip={"workers": 2},
        **overrides,
    )
    return edge_factory(config, timeout=START_TIMEOUT)


def workers(edge: EdgeProcess) -> list[dict[str, Any]]:
    """The supervisor's view of each worker, from /readyz (200 or 503)."""
    _, body = edge.http_get("/readyz", timeout=5.0)
    listed: list[dict[str, Any]] = json.loads(body)["workers"]
    return listed


def wait_until(what: str, check: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout}s: {what}")


def call_ids(prefix: str, count: int) -> list[bytes]:
    """The Call-IDs SIPp makes with ``-cid_str PREFIX-%u`` (call numbers start at 1)."""
    return [f"{prefix}-{n}".encode() for n in range(1, count + 1)]


def owners(prefix: str, count: int) -> list[int]:
    return [pick(c, BOTH) for c in call_ids(prefix, count)]


def test_calls_spread_over_both_workers_every_911_enriched_and_metrics_merged(
    edge_factory: EdgeFactory, sipp: Sipp, redis_server: RedisServer
) -> None:
    calls = 40
    provision(redis_server)
    expected = owners("spread", calls)
    assert set(expected) == {0, 1}
    trunk = free_port("udp")
    uas = sipp.uas("uas_emergency.xml", port=trunk, calls=calls, timeout=120)
    api_port = free_port("tcp")
    edge = start_workers(
        edge_factory,
        redis_server,
        trunk,
        provisioning={
            "listen": f"{LOOPBACK}:{api_port}",
            "tokens": {"noc": "workers-test-token-0123456789"},
            "state_url": redis_server.url,
            "audit_url": redis_server.url,
        },
    )
    # --role all (the harness's default): provisioning runs once, in the supervisor.
    assert edge.pid is not None and port_bound_by(edge.pid, "tcp", api_port)
    for worker in workers(edge):
        assert not port_bound_by(worker["pid"], "tcp", api_port)
        assert not port_bound_by(worker["pid"], "tcp", edge.http_port)
    caller = sipp.uac(
        "uac_911.xml",
        edge.sip_target,
        calls=calls,
        rate=20,
        timeout=90,
        extra=["-cid_str", "spread-%u"],
    )
    assert caller.ok, caller.summary()
    trunk_result = uas.wait(timeout=60)
    # uas_emergency.xml fails any call whose INVITE lacks the location headers.
    assert trunk_result.ok, trunk_result.summary()
    assert trunk_result.successful == calls

    # Both workers served calls: the dispatcher handed each one its own Call-IDs' messages.
    for slot in BOTH:
        served = edge.metric("e911_sip_worker_datagrams_total", worker=str(slot)) or 0
        assert served >= 4 * expected.count(slot), (slot, served)
    # /metrics adds up both workers' counters: every 911 INVITE counted once, enriched.
    assert edge.metric("e911_sip_emergency_calls_total", outcome="enriched") == calls
    assert edge.metric("e911_sip_requests_total", method="INVITE", route="emergency") == calls
    assert edge.metric("e911_sip_emergency_enrich_seconds_count") == calls
    assert edge.metric("e911_sip_workers", state="ready") == 2
    assert edge.metric("e911_sip_dispatch_dropped_total") == 0
    assert (edge.metric("e911_sip_worker_restarts_total") or 0) == 0
    # Each worker's log lines name it.
    logged = {json.loads(line).get("worker") for line in edge.log_text().splitlines() if line}
    assert {0, 1} <= logged


def test_calls_over_tcp_to_a_udp_trunk_are_served_by_the_worker_holding_the_connection(
    edge_factory: EdgeFactory, sipp: Sipp, redis_server: RedisServer
) -> None:
    """Worker 0 serves the TCP listener and claims the Call-IDs its connections carry, so
    the trunk's UDP responses reach it even for Call-IDs the hash gives to worker 1."""
    calls = 30
    provision(redis_server)
    assert 1 in owners("tcp", calls)
    trunk = free_port("udp")
    uas = sipp.uas("uas_emergency.xml", port=trunk, calls=calls + 1, timeout=120)
    edge = start_workers(edge_factory, redis_server, trunk, transports=("udp", "tcp"))
    assert edge.pid is not None and port_bound_by(edge.pid, "tcp", edge.sip_port)
    caller = sipp.uac(
        "uac_911.xml",
        edge.sip_target,
        transport="t1",
        calls=calls,
        rate=20,
        timeout=90,
        extra=["-cid_str", "tcp-%u"],
    )
    assert caller.ok, caller.summary()
    # A UDP call alongside still goes by the hash.
    udp_call = sipp.uac("uac_911.xml", edge.sip_target, extra=["-cid_str", "udp-%u"])
    assert udp_call.ok, udp_call.summary()
    trunk_result = uas.wait(timeout=60)
    assert trunk_result.ok, trunk_result.summary()
    assert edge.metric("e911_sip_emergency_calls_total", outcome="enriched") == calls + 1
    assert (edge.metric("e911_sip_dispatch_claims") or 0) >= calls
    assert edge.metric("e911_sip_dispatch_dropped_total") == 0


def test_the_tcp_listener_outlives_a_restart_of_worker_0(
    edge_factory: EdgeFactory, sipp: Sipp, redis_server: RedisServer
) -> None:
    """The supervisor holds the listening socket: after worker 0 is killed and started
    again, a new TCP connection reaches the new worker 0."""
    provision(redis_server)
    trunk = free_port("udp")
    uas = sipp.uas("uas_emergency.xml", port=trunk, calls=2, timeout=180)
    edge = start_workers(edge_factory, redis_server, trunk, transports=("udp", "tcp"))
    first = sipp.uac("uac_911.xml", edge.sip_target, transport="t1", extra=["-cid_str", "a-%u"])
    assert first.ok, first.summary()
    before = {w["worker"]: w["pid"] for w in workers(edge)}
    os.kill(before[0], signal.SIGKILL)

    def restarted() -> bool:
        now = {w["worker"]: w for w in workers(edge)}
        return now[0]["pid"] not in (None, before[0]) and now[0]["ready"]

    wait_until("worker 0 is restarted", restarted, START_TIMEOUT)
    assert edge.pid is not None and port_bound_by(edge.pid, "tcp", edge.sip_port)
    second = sipp.uac("uac_911.xml", edge.sip_target, transport="t1", extra=["-cid_str", "b-%u"])
    assert second.ok, second.summary()
    assert uas.wait(timeout=60).ok
    assert edge.metric("e911_sip_worker_restarts_total", worker="0") == 1


def _aborted_call_ids(path: Path) -> set[bytes]:
    if not path.exists():
        return set()
    text = path.read_bytes()
    return set(re.findall(rb"(?im)^call-id:\s*(\S+)", text))


def test_a_killed_worker_is_restarted_and_its_answered_calls_still_end(
    edge_factory: EdgeFactory, sipp: Sipp, redis_server: RedisServer, tmp_path: Path
) -> None:
    provision(redis_server)
    long_calls, load_calls = 6, 200
    # Call-IDs of the answered calls: some owned by each worker.
    assert 0 < owners("long", long_calls).count(1) < long_calls
    trunk = free_port("udp")
    uas = sipp.uas("uas_load.xml", port=trunk, calls=long_calls + load_calls, timeout=180)
    edge = start_workers(edge_factory, redis_server, trunk)
    before = {w["worker"]: w["pid"] for w in workers(edge)}
    assert all(before.values())

    # Answered calls that hang up 20 s later, after the kill.
    answered = sipp.start_uac(
        "uac_load.xml",
        edge.sip_target,
        calls=long_calls,
        rate=50,
        keys={"hold_ms": "20000"},
        timeout=120,
        extra=["-cid_str", "long-%u"],
    )
    wait_until(
        "the long calls are answered",
        lambda: (edge.metric("e911_sip_requests_total", method="ACK") or 0) >= long_calls,
        60,
    )
    calldebug = tmp_path / "load-calldebug.log"
    load = sipp.start_uac(
        "uac_load.xml",
        edge.sip_target,
        calls=load_calls,
        rate=20,
        timeout=90,
        extra=["-cid_str", "load-%u", "-trace_calldebug", "-calldebug_file", str(calldebug)],
    )
    wait_until(
        "load calls are in progress",
        lambda: (edge.metric("e911_sip_requests_total", method="ACK") or 0) >= long_calls + 10,
        60,
    )
    os.kill(before[1], signal.SIGKILL)

    def restarted() -> bool:
        now = {w["worker"]: w for w in workers(edge)}
        return now[1]["pid"] not in (None, before[1]) and now[1]["ready"]

    wait_until("worker 1 is restarted", restarted, START_TIMEOUT)
    after = {w["worker"]: w["pid"] for w in workers(edge)}
    assert after[0] == before[0], "the other worker was not touched"
    assert edge.metric("e911_sip_worker_restarts_total", worker="1") == 1
    assert (edge.metric("e911_sip_worker_restarts_total", worker="0") or 0) == 0

    # Every answered call, those of the dead worker included, had its BYE routed.
    result = answered.wait(timeout=150)
    assert result.ok, result.summary()
    assert result.successful == long_calls
    # Only the dead worker's calls may have failed: a 200 that came back to a worker
    # without the transaction is relayed (late_2xx), but what the dead worker held when it
    # died (a failure response it waited for, a BYE it had forwarded) comes back only if a
    # retransmission brings it, within SIPp's patience.
    loaded = load.wait(timeout=200)
    assert load_calls - loaded.successful <= owners("load", load_calls).count(1), loaded.summary()
    aborted = _aborted_call_ids(calldebug)
    assert len(aborted) >= loaded.failed or not loaded.failed
    assert {pick(c, BOTH) for c in aborted} <= {1}, aborted
    assert loaded.successful >= load_calls // 2, loaded.summary()
    uas.stop()
    if loaded.failed == 0:
        # Every call ended, so no worker is left waiting for a BYE: the calls worker 0 took
        # over while slot 1 restarted were handed back to it with their Call-IDs, and the
        # BYE each got reached the worker that held it. A drain then ends at once (a
        # worker holding a call whose BYE went elsewhere would wait for it for 2 hours).
        wait_until(
            "no answered call is held",
            lambda: (edge.metric("e911_sip_dialogs", kind="emergency") or 0) == 0,
            30,
        )
        edge.signal(signal.SIGTERM)
        assert edge.wait(timeout=90) == 0


def test_sigterm_drains_every_worker_keeping_an_answered_911_call_and_exits_0(
    edge_factory: EdgeFactory, sipp: Sipp, redis_server: RedisServer
) -> None:
    provision(redis_server)
    trunk = free_port("udp")
    uas = sipp.uas("uas_emergency.xml", port=trunk, calls=1, timeout=120)
    edge = start_workers(
        edge_factory, redis_server, trunk, shutdown={"emergency_drain_timeout": 60.0}
    )
    pids = [w["pid"] for w in workers(edge)]
    call = sipp.start_uac("uac_911.xml", edge.sip_target, keys={"hold_ms": "4000"}, timeout=60)
    wait_until(
        "the 911 call is answered",
        lambda: (edge.metric("e911_sip_requests_total", method="ACK") or 0) >= 1,
        60,
    )
    edge.signal(signal.SIGTERM)
    # The answered emergency call keeps its route through the drain: its BYE gets through.
    result = call.wait(timeout=60)
    assert result.ok, result.summary()
    assert uas.wait(timeout=30).ok
    assert edge.wait(timeout=90) == 0
    for pid in pids:
        wait_until(f"worker {pid} exited", lambda pid=pid: not _alive(pid), 30)
    log = edge.log_text()
    assert log.count('"msg":"e911-sip stopped"') == 3, "both workers and the supervisor"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (the supervisor already gone) counts as exited.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_the_psap_answers_and_hangs_up_911_calls_a_killed_worker_set_up(
    edge_factory: EdgeFactory, sipp: Sipp, redis_server: RedisServer
) -> None:
    # The 911 calls ring at the PSAP while the worker that forwarded them is killed. The
    # trunk's 200 then reaches a worker with no transaction for it (the other one, or the
    # dead one restarted), and later the PSAP hangs up with a BYE that worker never saw a
    # dialog for. Both are recognised from what they carry, with the key every worker of
    # the edge shares: the stamped Record-Route and our Via's branch.
    provision(redis_server)
    calls = 6
    dead = owners("psap", calls).count(1)
    assert 0 < dead < calls
    trunk = free_port("udp")
    # The trunk on its own loopback address: outside the trust domain (127.0.0.1), so its
    # BYE is let in only for a dialog the edge knows it routed to a trunk.
    uas = sipp.uas(
        "uas_psap_hangs_up.xml",
        port=trunk,
        calls=calls,
        keys={"ring_ms": "12000", "hold_ms": "3000"},
        timeout=150,
        host=TRUNK_HOST,
    )
    edge = start_workers(edge_factory, redis_server, trunk, trunk_host=TRUNK_HOST)
    before = {w["worker"]: w["pid"] for w in workers(edge)}
    call = sipp.start_uac(
        "uac_911_callee_hangs_up.xml",
        edge.sip_target,
        calls=calls,
        rate=20,
        timeout=150,
        extra=["-cid_str", "psap-%u"],
    )
    wait_until(
        "every call rings at the PSAP",
        lambda: (edge.metric("e911_sip_emergency_calls_total", outcome="enriched") or 0) >= calls,
        60,
    )
    os.kill(before[1], signal.SIGKILL)

    result = call.wait(timeout=180)
    assert result.ok, result.summary()
    assert result.successful == calls
    assert uas.wait(timeout=60).ok

    def recovered(kind: str) -> float:
        return edge.metric("e911_sip_recovered_total", kind=kind) or 0

    # Every call of the dead worker had its 200 relayed and its BYE let in from the stamp
    # (retransmissions may add more); the other worker's calls needed neither.
    wait_until("the recoveries are counted", lambda: recovered("trunk_dialog") >= dead, 30)
    assert recovered("late_2xx") >= dead
    assert (edge.metric("e911_sip_messages_discarded_total", reason="untrusted_dialog") or 0) == 0


def test_requests_from_outside_the_trust_domain_stop_at_the_dispatcher(
    edge_factory: EdgeFactory, sipp: Sipp, redis_server: RedisServer
) -> None:
    provision(redis_server)
    trunk = free_port("udp")
    uas = sipp.uas("uas_emergency.xml", port=trunk, calls=1, timeout=120)
    edge = start_workers(edge_factory, redis_server, trunk)
    flood = 300
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as outsider:
        outsider.bind(("127.0.0.9", 0))
        for n in range(flood):
            outsider.sendto(
                (
                    f"INVITE sip:911@127.0.0.1:{edge.sip_port} SIP/2.0\r\n"
                    f"Via: SIP/2.0/UDP 127.0.0.9:5060;branch=z9hG4bKx{n}\r\n"
                    f"From: <sip:{DEFAULT_CALLER}@127.0.0.9>;tag=x\r\n"
                    f"To: <sip:911@127.0.0.1>\r\nCall-ID: outsider-{n}\r\nCSeq: 1 INVITE\r\n"
                    "Max-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
                ).encode(),
                ("127.0.0.1", edge.sip_port),
            )
    wait_until(
        "the flood is counted",
        lambda: (
            (edge.metric("e911_sip_dispatch_dropped_total", reason="untrusted_source") or 0)
            >= flood
        ),
        30,
    )
    # Counted where operators and the E911UntrustedTraffic alert look, and nothing reached
    # a worker: no worker saw an INVITE yet.
    discarded = edge.metric("e911_sip_messages_discarded_total", reason="untrusted_source")
    assert discarded == flood
    assert (edge.metric("e911_sip_requests_total", method="INVITE") or 0) == 0
    # The softswitch's 911 call goes through as ever.
    result = sipp.uac("uac_911.xml", edge.sip_target)
    assert result.ok, result.summary()
    assert uas.wait(timeout=60).ok
