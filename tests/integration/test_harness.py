"""The harness and the SIPp scenarios, proven without the edge.

SIPp callers talk straight to SIPp trunks. Helper callers (uac_911_enriched, _unlocated,
_proxied) put on the wire what the edge would send, so each trunk scenario is shown both to
pass what it should and to fail the call on what it must reject.
"""

from __future__ import annotations

import os
import re
import select
import socket
import sys
import textwrap
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.integration.harness import (
    DEFAULT_ENDPOINT,
    LOOPBACK,
    SCENARIO_DIR,
    SCENARIO_KEYS,
    EdgeProcess,
    EdgeStartError,
    HarnessError,
    RedisServer,
    SilentTcpPeer,
    SilentUdpPeer,
    Sipp,
    SippResult,
    edge_config,
    free_port,
    free_port_pair,
    metric_value,
    toml_dumps,
    trunk_uri,
)

pytestmark = pytest.mark.integration

WAIT = 20.0


def run_pair(
    sipp: Sipp,
    uas_scenario: str,
    uac_scenario: str,
    *,
    uas_keys: dict[str, str] | None = None,
    uac_keys: dict[str, str] | None = None,
    service: str = "911",
    transport: str = "u1",
    calls: int = 1,
    rate: float = 10,
) -> tuple[SippResult, SippResult]:
    """Run a caller scenario straight at a trunk scenario; (caller result, trunk result)."""
    port = free_port("tcp" if transport.startswith("t") else "udp")
    uas = sipp.uas(uas_scenario, port=port, transport=transport, keys=uas_keys, calls=calls)
    uac = sipp.uac(
        uac_scenario,
        f"{LOOPBACK}:{port}",
        service=service,
        transport=transport,
        keys=uac_keys,
        calls=calls,
        rate=rate,
        timeout=WAIT,
    )
    return uac, uas.wait(timeout=WAIT)


def pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


# ----------------------------------------------------------------------------- ports


def test_free_ports_can_be_bound() -> None:
    for transport, kind in (("udp", socket.SOCK_DGRAM), ("tcp", socket.SOCK_STREAM)):
        port = free_port(transport)
        with socket.socket(socket.AF_INET, kind) as sock:
            sock.bind((LOOPBACK, port))
    port = free_port_pair()
    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp,
        socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp,
    ):
        udp.bind((LOOPBACK, port))
        tcp.bind((LOOPBACK, port))
    with pytest.raises(ValueError, match="transport"):
        free_port("sctp")


def test_free_ports_are_never_ones_the_kernel_hands_to_outgoing_connections() -> None:
    ephemeral_low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    picked = [free_port("udp") for _ in range(20)] + [free_port_pair() for _ in range(20)]
    assert all(port < ephemeral_low for port in picked)
    # Two picks made before either is bound must not collide.
    assert len(set(picked)) == len(picked)


# ----------------------------------------------------------------------------- Redis


def test_redis_server_answers_and_is_stopped_by_pid(redis_server: RedisServer) -> None:
    client = redis_server.client()
    assert client.set("line:1321551234", "555555/202369122819078578")
    assert client.get("line:1321551234") == "555555/202369122819078578"
    assert redis_server.url == f"redis://127.0.0.1:{redis_server.port}/0"
    pid = redis_server.pid
    assert pid is not None and redis_server.running

    redis_server.stop()

    assert pid_gone(pid)
    assert not redis_server.running
    with socket.socket() as sock:
        assert sock.connect_ex((LOOPBACK, redis_server.port)) != 0
    redis_server.stop()  # idempotent


def test_redis_restart_reloads_the_append_only_file(tmp_path: Path) -> None:
    with RedisServer(tmp_path, appendonly=True) as server:
        server.client().set("k", "v")
        server.stop()
        server.start()
        assert server.client().get("k") == "v"


def test_redis_start_failure_names_the_cause(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind((LOOPBACK, 0))
        taken.listen()
        server = RedisServer(tmp_path, port=taken.getsockname()[1])
        with pytest.raises(HarnessError, match="(?s)exited with.*in use"):
            server.start()
        server.stop()


# ------------------------------------------------------------- emergency trunk checks


def test_enriched_invite_passes_the_emergency_trunk(sipp: Sipp) -> None:
    uac, uas = run_pair(sipp, "uas_emergency", "uac_911_enriched")
    assert uac.ok, uac
    assert uas.ok, uas
    assert (uas.successful, uas.failed) == (1, 0)
    assert "Geolocation: <https://emergency.bandwidth.com/locations/" in uas.message_log


def test_plain_invite_fails_the_emergency_trunk(sipp: Sipp) -> None:
    uac, uas = run_pair(sipp, "uas_emergency", "uac_911")
    assert uac.ok, uac  # the dialog still completes on the caller side
    assert not uas.ok
    assert (uas.returncode, uas.failed) == (1, 1), uas
    assert "header Priority: not found" in uas.error_log, uas


@pytest.mark.parametrize(
    ("service", "uac_keys", "uas_keys", "failed_check"),
    [
        pytest.param(
            "933",
            {"endpoint": "777777/42", "callback": "9195550100"},
            {
                "expected_ruser": "933",
                "expected_endpoint": "777777/42",
                "expected_callback": "9195550100",
            },
            None,
            id="933-custom-line",
        ),
        pytest.param("911", {"endpoint": "777777/42"}, {}, "geolocation", id="wrong-geolocation"),
        pytest.param("911", {"callback": "9195550100"}, {}, "pai_user", id="wrong-callback"),
        pytest.param("933", {}, {}, "ruri_user", id="wrong-request-uri"),
    ],
)
def test_emergency_trunk_expectations_come_from_keys(
    sipp: Sipp,
    service: str,
    uac_keys: dict[str, str],
    uas_keys: dict[str, str],
    failed_check: str | None,
) -> None:
    uac, uas = run_pair(
        sipp,
        "uas_emergency",
        "uac_911_enriched",
        service=service,
        uac_keys=uac_keys,
        uas_keys=uas_keys,
    )
    assert uac.ok, uac
    if failed_check is None:
        assert uas.ok, uas
    else:
        assert not uas.ok and uas.failed == 1, uas
        assert f"strcmp {failed_check}:" in uas.error_log, uas


def test_emergency_trunk_over_tcp(sipp: Sipp) -> None:
    uac, uas = run_pair(sipp, "uas_emergency", "uac_911_enriched", transport="t1")
    assert uac.ok, uac
    assert uas.ok, uas
    assert "TCP message received" in uas.message_log


def test_emergency_trunk_wants_a_proxy_via_and_record_route(sipp: Sipp) -> None:
    """A request straight from the caller has no edge Via on top: the Via check fails it."""
    uac, uas = run_pair(sipp, "uas_no_location", "uac_911_unlocated")
    assert uas.ok, uas
    # The unlocated helper has the edge's Via; the plain caller's own Via is not one.
    uac, uas = run_pair(sipp, "uas_passthrough", "uac_911", service="2125550100")
    assert uac.ok, uac
    assert not uas.ok, uas
    assert "branch=z9hG4bK-uac-" in uas.error_log, uas


# ------------------------------------------------------------------ no-location trunk


def test_unlocated_invite_passes_the_no_location_trunk(sipp: Sipp) -> None:
    uac, uas = run_pair(sipp, "uas_no_location", "uac_911_unlocated")
    assert uac.ok, uac
    assert uas.ok, uas


def test_geolocation_fails_the_no_location_trunk(sipp: Sipp) -> None:
    uac, uas = run_pair(sipp, "uas_no_location", "uac_911_enriched")
    assert uac.ok, uac
    assert not uas.ok and uas.failed == 1, uas
    assert "Regexp matched but should not" in uas.error_log, uas
    assert "emergency.bandwidth.com" in uas.error_log, uas


# -------------------------------------------------------------------- default trunk


@pytest.mark.parametrize(
    ("uac_scenario", "uas_keys", "failed_check"),
    [
        pytest.param("uac_911_proxied", {}, None, id="relayed-unchanged"),
        pytest.param("uac_911_enriched", {}, "Regexp matched but should not", id="enriched"),
        pytest.param(
            "uac_911_proxied",
            {"expected_pai": "<sip:9195550100@127.0.0.1>"},
            "strcmp pai:",
            id="pai-missing",
        ),
        pytest.param(
            "uac_911_proxied", {"expected_ruser": "911"}, "strcmp ruri_user:", id="ruri-changed"
        ),
    ],
)
def test_passthrough_trunk(
    sipp: Sipp, uac_scenario: str, uas_keys: dict[str, str], failed_check: str | None
) -> None:
    uac, uas = run_pair(
        sipp, "uas_passthrough", uac_scenario, service="2125550100", uas_keys=uas_keys
    )
    assert uac.ok, uac
    if failed_check is None:
        assert uas.ok, uas
    else:
        assert not uas.ok and uas.failed == 1, uas
        assert failed_check in uas.error_log, uas


# ---------------------------------------------------------------- other trunk flows


def test_cancel_pair_end_to_end(sipp: Sipp) -> None:
    uac, uas = run_pair(sipp, "uas_ring_then_487", "uac_cancel")
    assert uac.ok, uac
    assert uas.ok, uas
    # The 487 answers the INVITE with the INVITE's own Via and CSeq.
    response = uac.message_log.split("SIP/2.0 487 Request Terminated", 1)[1]
    assert "branch=z9hG4bK-uac-" in response.split("\n\n", 1)[0]
    assert "CSeq: 102 INVITE" in response.split("\n\n", 1)[0]


@pytest.mark.parametrize(
    ("uas_scenario", "expected_status", "uac_ok"),
    [
        ("uas_408", "408", True),
        ("uas_486", "486", True),
        ("uas_500", "500", True),
        ("uas_503", "503", True),
        ("uas_603", "603", True),
        pytest.param("uas_503", "500", False, id="unexpected-status"),
    ],
)
def test_rejecting_trunks(
    sipp: Sipp, uas_scenario: str, expected_status: str, uac_ok: bool
) -> None:
    uac, uas = run_pair(
        sipp, uas_scenario, "uac_911_rejected", uac_keys={"expected_status": expected_status}
    )
    assert uas.ok, uas  # the trunk got its ACK
    assert uac.ok is uac_ok, uac
    if not uac_ok:
        assert 'strcmp status:"503" and expected_status:"500"' in uac.error_log, uac


@pytest.mark.parametrize(
    ("uac_scenario", "on_the_wire"),
    [
        ("uac_911", "INVITE sip:911@"),
        ("uac_911_pai", "P-Asserted-Identity: <sip:9195550100@127.0.0.1>"),
        ("uac_sos", "INVITE urn:service:sos SIP/2.0"),
        ("uac_load", "INVITE sip:911@"),
        ("uac_911_proxied", "Record-Route: <sip:127.0.0.1:"),
    ],
)
def test_every_caller_completes_a_call(sipp: Sipp, uac_scenario: str, on_the_wire: str) -> None:
    uac, uas = run_pair(sipp, "uas_load", uac_scenario)
    assert uac.ok, uac
    assert uas.ok, uas
    assert on_the_wire in uas.message_log
    assert "X-Pass-Through: keep-me" in uas.message_log


def test_load_pair_runs_many_calls(sipp: Sipp) -> None:
    uac, uas = run_pair(sipp, "uas_load", "uac_load", uac_keys={"hold_ms": "20"}, calls=10, rate=50)
    assert uac.ok, uac
    assert uas.ok, uas
    assert (uac.successful, uas.successful) == (10, 10)
    assert "CallLength(C)" in uac.stats


# ------------------------------------------------------------------ SIPp lifecycle


def test_uas_that_gets_no_call_is_stopped_and_reported(sipp: Sipp) -> None:
    uas = sipp.uas("uas_load", port=free_port("udp"))
    pid = uas.pid
    result = uas.wait(timeout=0.3)
    assert result.timed_out and not result.ok
    assert pid_gone(pid)
    assert "stopped by the harness" in result.summary()


def test_uas_that_cannot_bind_is_reported(sipp: Sipp) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind((LOOPBACK, 0))
        with pytest.raises(HarnessError, match="did not bind"):
            sipp.uas("uas_load", port=taken.getsockname()[1])


def test_unknown_scenario_key_is_refused(sipp: Sipp) -> None:
    with pytest.raises(HarnessError, match="expected_endpont"):
        sipp.uas("uas_emergency", port=free_port(), keys={"expected_endpont": DEFAULT_ENDPOINT})


_BUILTIN_KEYWORDS = {
    "service",
    "remote_ip",
    "remote_port",
    "transport",
    "local_ip",
    "local_port",
    "pid",
    "call_number",
    "call_id",
    "len",
    "next_url",
    "routes",
    "peer_tag_param",
}


def test_every_scenario_key_has_a_documented_default() -> None:
    readme = (SCENARIO_DIR / "README.md").read_text()
    files = sorted(SCENARIO_DIR.glob("*.xml"))
    assert {f.stem for f in files} == set(SCENARIO_KEYS)
    for path in files:
        text = re.sub(r"<!--.*?-->", "", path.read_text(), flags=re.S)
        used = set(re.findall(r"\[([a-z_]+)\]", text)) - _BUILTIN_KEYWORDS
        assert used == set(SCENARIO_KEYS[path.stem]), path.name
        assert f"`{path.name}`" in readme, path.name
        for key, default in SCENARIO_KEYS[path.stem].items():
            assert f"`{key}`" in readme, (path.name, key)
            assert default in readme, (path.name, key, default)


# -------------------------------------------------------------------- silent peers


def test_silent_udp_peer_counts_and_never_answers() -> None:
    with (
        SilentUdpPeer() as peer,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client,
    ):
        client.bind((LOOPBACK, 0))
        for n in range(3):
            client.sendto(b"INVITE %d" % n, (LOOPBACK, peer.port))
        assert peer.wait_for(3, timeout=5)
        assert [data for data, _ in peer.received] == [b"INVITE 0", b"INVITE 1", b"INVITE 2"]
        assert peer.received[0][1] == client.getsockname()
        assert peer.uri == f"sip:127.0.0.1:{peer.port}"
        assert select.select([client], [], [], 0.05)[0] == []


def test_silent_tcp_peer_accepts_and_never_answers() -> None:
    with SilentTcpPeer() as peer, socket.create_connection((LOOPBACK, peer.port)) as client:
        client.sendall(b"INVITE sip:911@127.0.0.1 SIP/2.0\r\n")
        assert peer.wait_for(1, timeout=5)
        assert peer.connections == 1
        assert peer.uri.endswith(";transport=tcp")
        assert select.select([client], [], [], 0.05)[0] == []


# ------------------------------------------------------------- configuration, TOML


def test_edge_config_is_the_documented_document(tmp_path: Path) -> None:
    seed = tmp_path / "lines.json"
    config = edge_config(
        sip_port=5070,
        http_port=8070,
        emergency_trunks=[trunk_uri(5080), trunk_uri(5081, "tcp")],
        default_trunks=[trunk_uri(5090)],
        seed_file=seed,
        emergency={"numbers": ["911"]},
        logging={"level": "debug"},
    )
    assert tomllib.loads(toml_dumps(config)) == {
        "sip": {"listen": ["udp:127.0.0.1:5070", "tcp:127.0.0.1:5070"]},
        "emergency": {
            "numbers": ["911"],
            "trunks": ["sip:127.0.0.1:5080", "sip:127.0.0.1:5081;transport=tcp"],
            "geolocation_base_url": "https://emergency.bandwidth.com/locations/",
            "probe_interval": 0,
        },
        "default": {"trunks": ["sip:127.0.0.1:5090"], "probe_interval": 0},
        "store": {"url": "memory://", "seed_file": str(seed)},
        "http": {"listen": "127.0.0.1:8070"},
        "logging": {"level": "debug"},
    }


_scalars = (
    st.text(max_size=12)
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.booleans()
    | st.floats(allow_nan=False)
)
_values = st.recursive(
    _scalars | st.lists(_scalars, max_size=3),
    lambda inner: (
        st.dictionaries(st.text(max_size=8), inner, max_size=3)
        | st.lists(
            st.dictionaries(st.text(max_size=8), _scalars, max_size=3), min_size=1, max_size=2
        )
    ),
    max_leaves=12,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.text(max_size=8), _values, max_size=4))
def test_toml_writer_round_trips(document: dict[str, Any]) -> None:
    assert tomllib.loads(toml_dumps(document)) == document


# ------------------------------------------------------------- the edge as a process

FAKE_EDGE = textwrap.dedent(
    """
    import http.server, sys, tomllib
    config = tomllib.load(open(sys.argv[1], "rb"))
    host, port = config["http"]["listen"].rsplit(":", 1)
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = {
                "/readyz": b"ready",
                "/metrics": b'# TYPE e911_sip_calls_total counter\\n'
                            b'e911_sip_calls_total{outcome="enriched"} 2.0\\n'
                            b'e911_sip_calls_total{outcome="no_location"} 1.0\\n',
            }.get(self.path)
            self.send_response(200 if body else 404)
            self.end_headers()
            self.wfile.write(body or b"")
        def log_message(self, *args):
            sys.stderr.write("request\\n")
    http.server.HTTPServer((host, int(port)), Handler).serve_forever()
    """
)


def test_edge_process_waits_for_readyz_and_stops_by_pid(tmp_path: Path) -> None:
    script = tmp_path / "fake_edge.py"
    script.write_text(FAKE_EDGE)
    config = edge_config(
        sip_port=free_port_pair(),
        http_port=free_port("tcp"),
        emergency_trunks=[trunk_uri(5080)],
        default_trunks=[trunk_uri(5090)],
    )
    edge = EdgeProcess(tmp_path, config, command=[sys.executable, str(script), "{config}"])
    with edge:
        pid = edge.pid
        assert pid is not None and edge.running
        assert tomllib.loads(edge.config_path.read_text()) == config
        assert edge.http_get("/readyz") == (200, "ready")
        assert edge.metric("e911_sip_calls_total", outcome="enriched") == 2.0
        assert edge.metric("e911_sip_calls_total") == 3.0
        assert edge.metric("e911_sip_calls_total", outcome="failed") is None
    assert pid_gone(pid)
    assert "request" in edge.log_text()
    edge.stop()  # idempotent


def test_edge_process_that_exits_reports_its_stderr(tmp_path: Path) -> None:
    config = edge_config(
        sip_port=free_port_pair(),
        http_port=free_port("tcp"),
        emergency_trunks=[],
        default_trunks=[],
    )
    crash = "import sys; sys.stderr.write('config: [store] url is not a URL\\n'); sys.exit(3)"
    edge = EdgeProcess(tmp_path, config, command=[sys.executable, "-c", crash])
    with pytest.raises(EdgeStartError, match="(?s)exited with 3.*url is not a URL"):
        edge.start(timeout=10)
    assert not edge.running


def test_metric_value_parses_prometheus_text() -> None:
    text = (
        "# HELP e911_sip_lookup_seconds Store lookups\n"
        'e911_sip_lookup_seconds_count{store="redis"} 4\n'
        'e911_sip_lookup_seconds_sum{store="redis"} 0.25\n'
        "process_open_fds 12\n"
    )
    assert metric_value(text, "e911_sip_lookup_seconds_count", store="redis") == 4.0
    assert metric_value(text, "process_open_fds") == 12.0
    assert metric_value(text, "e911_sip_lookup_seconds_count", store="memory") is None
