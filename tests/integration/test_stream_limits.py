"""Stream connection limits and SIP over TLS through the real edge process.

Limits are configured small so each test opens a handful of loopback connections; closes are
waited for with a bounded timeout, never assumed after a sleep. 127.0.0.9 plays an outsider
(the edge trusts 127.0.0.1 and ::1 by default), 127.0.0.1 the softswitch.

The edge listens for SIP on 127.0.0.2 (EDGE), not 127.0.0.1. Every other test process on the
host dials 127.0.0.1, and some keep dialling a port whose server is gone (a Redis replica or
Sentinel re-dialling a killed master sends a RESP PING and waits); an edge that took such a
port on 127.0.0.1 closed that stranger at its header deadline and counted it with the test's
own connections (``header_timeout`` once counted 2). On 127.0.0.2 only these tests reach it.
"""

from __future__ import annotations

import re
import resource
import shutil
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from tests.integration.harness import (
    EdgeProcess,
    SilentUdpPeer,
    edge_config,
    edge_config_on_free_ports,
    free_port,
    trunk_uri,
)
from tests.integration.streampeers import (
    LOOPBACK,
    TlsTrunk,
    header_lines,
    in_dialog,
    invite,
    options,
    sip_exchange,
)

EdgeFactory = Callable[..., EdgeProcess]
OUTSIDER = "127.0.0.9"
EDGE = "127.0.0.2"
"""The address of the edge's SIP listeners: one no other process on the host dials."""


def start_edge(edge_factory: EdgeFactory, **overrides: Any) -> EdgeProcess:
    return edge_factory(edge_config_on_free_ports(sip_host=EDGE, **overrides))


def wait_metric(
    edge: EdgeProcess, name: str, value: float, timeout: float = 10.0, **labels: str
) -> float:
    """Poll ``/metrics`` until ``name{labels}`` reaches ``value``; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    seen = None
    while time.monotonic() < deadline:
        seen = edge.metric(name, **labels) or 0.0
        if seen >= value:
            return seen
        time.sleep(0.02)
    pytest.fail(f"{name}{labels} stayed at {seen}, expected {value} within {timeout}s")


def closed(edge: EdgeProcess, reason: str, transport: str = "tcp") -> float:
    return (
        edge.metric("e911_sip_stream_connections_closed_total", transport=transport, reason=reason)
        or 0.0
    )


def connect(port: int, source: str = LOOPBACK) -> socket.socket:
    """A connection from ``source`` to the edge's ``port`` on EDGE."""
    return socket.create_connection((EDGE, port), timeout=5.0, source_address=(source, 0))


def closed_by_edge(sock: socket.socket, timeout: float = 10.0) -> bool:
    """True once the edge closed or reset ``sock``; False if it is still open at ``timeout``."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return True


def still_open(sock: socket.socket) -> bool:
    """True when neither an EOF nor a reset is waiting on ``sock``."""
    sock.setblocking(False)
    try:
        return bool(sock.recv(1)) and False
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        sock.setblocking(True)


@pytest.fixture
def sockets() -> Iterator[list[socket.socket]]:
    opened: list[socket.socket] = []
    yield opened
    for sock in opened:
        sock.close()


def test_per_ip_cap_refuses_an_outsider_while_the_softswitch_still_connects(
    edge_factory: EdgeFactory, sockets: list[socket.socket]
) -> None:
    edge = start_edge(edge_factory, tcp={"max_connections_per_ip": 3})
    held = [connect(edge.sip_port, OUTSIDER) for _ in range(3)]
    sockets.extend(held)
    wait_metric(edge, "e911_sip_stream_connections", 3, transport="tcp", direction="inbound")
    extra = connect(edge.sip_port, OUTSIDER)
    sockets.append(extra)
    assert closed_by_edge(extra)
    assert closed(edge, "refused_per_ip") == 1
    assert all(still_open(sock) for sock in held)
    assert closed(edge, "refused_per_ip") == 1
    softswitch = connect(edge.sip_port)
    sockets.append(softswitch)
    replies = sip_exchange(softswitch, options(edge.sip_port, "tcp", call_id="cap-1", host=EDGE))
    assert replies and replies[-1].startswith(b"SIP/2.0 200 ")
    assert all(still_open(sock) for sock in held)
    # The process raised its open-file limit at start and said so.
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY:
        assert f'"msg":"open-file limit","nofile":{hard}' in edge.log_text()


def test_header_deadline_and_idle_timeout_close_slow_connections(
    edge_factory: EdgeFactory, sockets: list[socket.socket]
) -> None:
    edge = start_edge(edge_factory, tcp={"header_timeout": 2.0, "idle_timeout": 3.0})
    slowloris = connect(edge.sip_port, OUTSIDER)
    sockets.append(slowloris)
    slowloris.sendall(b"INVITE sip:911@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/TCP 127.0.0.9")
    assert closed_by_edge(slowloris)
    assert closed(edge, "header_timeout") == 1
    quiet = connect(edge.sip_port)
    sockets.append(quiet)
    replies = sip_exchange(quiet, options(edge.sip_port, "tcp", call_id="idle-1", host=EDGE))
    assert replies[-1].startswith(b"SIP/2.0 200 ")
    assert closed_by_edge(quiet)
    assert closed(edge, "idle") == 1
    assert closed(edge, "header_timeout") == 1


def test_buffer_cap_closes_a_connection_that_never_ends_its_header(
    edge_factory: EdgeFactory, sockets: list[socket.socket]
) -> None:
    edge = start_edge(edge_factory, tcp={"max_buffer": 2048})
    sock = connect(edge.sip_port, OUTSIDER)
    sockets.append(sock)
    try:
        sock.sendall(b"INVITE sip:911@127.0.0.1 SIP/2.0\r\nX-Pad: " + b"a" * 8192)
    except ConnectionResetError:
        pass  # the edge may close it before the last bytes are written
    assert closed_by_edge(sock)
    assert closed(edge, "buffer") == 1
    assert edge.http_get("/readyz")[0] == 200


def test_low_open_file_limit_still_serves_the_softswitch_and_metrics(
    tmp_path: Path, sockets: list[socket.socket]
) -> None:
    prlimit = shutil.which("prlimit")
    assert prlimit is not None, "prlimit (util-linux) is needed to start the edge with nofile 400"
    config = edge_config_on_free_ports(sip_host=EDGE)
    command = [prlimit, "--nofile=400:400", *EdgeProcess.default_command()]
    with EdgeProcess(tmp_path, config, command=command) as edge:
        # 400 descriptors: the table is fitted to 80 connections, 20 of them for trusted sources.
        for n in range(100):
            sockets.append(connect(edge.sip_port, f"127.0.0.{10 + n // 20}"))
        wait_metric(edge, "e911_sip_stream_connections_closed_total", 40, transport="tcp")
        assert closed(edge, "refused_untrusted_full") == 40
        for n in range(3):
            softswitch = connect(edge.sip_port)
            sockets.append(softswitch)
            replies = sip_exchange(
                softswitch, options(edge.sip_port, "tcp", call_id=f"fd-{n}", host=EDGE)
            )
            assert replies and replies[-1].startswith(b"SIP/2.0 200 ")
        assert edge.http_get("/metrics")[0] == 200
        assert "open-file limit too low for [tcp] max_connections: lowered" in edge.log_text()


# ------------------------------------------------------------------------------ TLS


class Pki:
    """A CA, the certificates its holders present, and PEM files for the edge's config."""

    def __init__(self, directory: Path) -> None:
        self.ca = trustme.CA()
        self.dir = directory
        self.ca_file = directory / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        edge = self.ca.issue_cert(EDGE)
        self.certificate = directory / "edge.pem"
        self.private_key = directory / "edge.key"
        edge.private_key_pem.write_to_path(str(self.private_key))
        with self.certificate.open("wb") as out:
            for blob in edge.cert_chain_pems:
                out.write(blob.bytes())

    def edge_tls(self) -> dict[str, str]:
        return {
            "certificate": str(self.certificate),
            "private_key": str(self.private_key),
            "ca_file": str(self.ca_file),
        }

    def client(self, *, with_certificate: bool = True) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        self.ca.configure_trust(context)
        if with_certificate:
            self.ca.issue_cert("softswitch.test").configure_cert(context)
        return context

    def server(self, ca: trustme.CA | None = None) -> ssl.SSLContext:
        """A trunk's server context with a certificate for 127.0.0.1 from ``ca``."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        (ca or self.ca).issue_cert(LOOPBACK).configure_cert(context)
        self.ca.configure_trust(context)
        context.verify_mode = ssl.CERT_REQUIRED
        return context


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path)


def start_tls_edge(
    edge_factory: EdgeFactory, pki: Pki, trunks: list[str], **overrides: Any
) -> tuple[EdgeProcess, int]:
    udp = free_port("udp", host=EDGE)
    tls = free_port("tcp", host=EDGE)
    config = edge_config(
        sip_port=udp,
        http_port=free_port("tcp"),
        emergency_trunks=trunks,
        default_trunks=[trunk_uri(free_port("udp"))],
        sip={"listen": [f"udp:{EDGE}:{udp}", f"tls:{EDGE}:{tls}"]},
        tls=pki.edge_tls(),
        **overrides,
    )
    return edge_factory(config), tls


def test_911_over_tls_end_to_end_with_failover_from_an_unverifiable_trunk(
    edge_factory: EdgeFactory, pki: Pki
) -> None:
    stranger = trustme.CA()
    with TlsTrunk(pki.server(stranger)) as impostor, TlsTrunk(pki.server()) as trunk:
        edge, tls_port = start_tls_edge(edge_factory, pki, [impostor.uri, trunk.uri])
        raw = connect(tls_port)
        with pki.client().wrap_socket(raw, server_hostname=EDGE) as stream:
            request = invite(tls_port, "tls", call_id="tls-911-1")
            replies = sip_exchange(stream, request)
            ok = replies[-1]
            assert ok.startswith(b"SIP/2.0 200 "), replies
            # The dialog's ACK and BYE come back through the edge over TLS (Record-Route).
            stream.sendall(in_dialog("ACK", 1, request, ok, call_id="tls-911-1"))
            bye = sip_exchange(stream, in_dialog("BYE", 2, request, ok, call_id="tls-911-1"))
            assert bye[-1].startswith(b"SIP/2.0 200 ") and b"CSeq: 2 BYE" in bye[-1]
        assert trunk.wait_for(3)
        assert [m.split(b" ", 1)[0] for m in trunk.received] == [b"INVITE", b"ACK", b"BYE"]
        relayed = trunk.received[0]
        assert relayed.startswith(b"INVITE sip:911@127.0.0.1:")
        assert header_lines(relayed, "via")[0].startswith(f"SIP/2.0/TLS {EDGE}:{tls_port};")
        record_route = header_lines(relayed, "record-route")
        # Ours, over TLS, with the emergency dialog's stamp.
        assert re.fullmatch(
            rf"<sip:{re.escape(EDGE)}:{tls_port};transport=tls;lr;dlg=e[0-9a-f]{{18}}>",
            record_route[0],
        )
        assert impostor.received == []
        assert closed(edge, "tls_handshake", transport="tls") == 1
        assert edge.metric("e911_sip_delivery_failures_total", transport="tls") == 1
        assert edge.metric("e911_sip_emergency_calls_total", outcome="failover") == 1
        assert edge.metric("e911_sip_emergency_results_total", status_class="2xx") == 1


def test_a_911_call_whose_tls_fails_everywhere_is_retried_without_tls(
    edge_factory: EdgeFactory, pki: Pki
) -> None:
    # RFC 6881: if TLS fails, retry without TLS. The only trunk's certificate does not
    # verify; its plain twin on the same host ([emergency] tls_fallback) gets the call.
    stranger = trustme.CA()
    with TlsTrunk(pki.server(stranger)) as impostor, SilentUdpPeer() as twin:
        edge, tls_port = start_tls_edge(
            edge_factory, pki, [impostor.uri], emergency={"tls_fallback_port": twin.port}
        )
        raw = connect(tls_port)
        with pki.client().wrap_socket(raw, server_hostname=EDGE) as stream:
            stream.sendall(invite(tls_port, "tls", call_id="tls-fallback-1"))
            assert twin.wait_for(1), "the call never reached the trunk without TLS"
        relayed = twin.received[0][0]
        assert relayed.startswith(f"INVITE sip:911@127.0.0.1:{twin.port} SIP/2.0".encode())
        assert header_lines(relayed, "via")[0].startswith("SIP/2.0/UDP ")
        assert impostor.received == []
        assert closed(edge, "tls_handshake", transport="tls") == 1


def test_tls_client_without_a_certificate_is_refused(
    edge_factory: EdgeFactory, pki: Pki, sockets: list[socket.socket]
) -> None:
    edge, tls_port = start_tls_edge(edge_factory, pki, [trunk_uri(free_port("udp"))])
    raw = connect(tls_port)
    sockets.append(raw)
    bare = pki.client(with_certificate=False)
    with (
        pytest.raises((ssl.SSLError, ConnectionError)),
        bare.wrap_socket(raw, server_hostname=EDGE) as stream,
    ):
        # With TLS 1.3 the client's side of the handshake ends first: the refusal (an alert,
        # or the close) comes with the first read.
        replies = sip_exchange(
            stream, options(tls_port, "tls", call_id="nocert-1", host=EDGE), timeout=10
        )
        if not replies:
            raise ConnectionError("closed by the edge")
    assert wait_metric(
        edge,
        "e911_sip_stream_connections_closed_total",
        1,
        transport="tls",
        reason="tls_handshake",
    )
