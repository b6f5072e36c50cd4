"""HTTPS and mutual TLS on the real process: the ops endpoints, the provisioning API, and the
container image's health check, with certificates made by trustme for 127.0.0.1."""

from __future__ import annotations

import http.client
import json
import re
import ssl
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme

from tests.certs import PemPair, client_context, issue, write_ca
from tests.integration.harness import REPO_ROOT, EdgeProcess, edge_config, free_port, trunk_uri

TOKEN = "integration-token-0123456789"
ADDRESS = {
    "line1": "900 Main Campus Drive",
    "line2": "Suite 500",
    "city": "Raleigh",
    "state": "NC",
    "postal_code": "27606",
    "country": "US",
}

EdgeFactory = Callable[..., EdgeProcess]


@dataclass(frozen=True)
class Pki:
    """The server's CA and certificate, and a separate CA for client certificates."""

    server_ca: trustme.CA
    server: PemPair
    client_ca: trustme.CA
    client_ca_file: Path
    client: PemPair
    stranger: PemPair
    """A client certificate from a CA the server does not know."""


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    tls = tmp_path / "tls"
    server_ca, client_ca = trustme.CA(), trustme.CA()
    return Pki(
        server_ca=server_ca,
        server=issue(server_ca, tls, "server", "127.0.0.1", "localhost"),
        client_ca=client_ca,
        client_ca_file=write_ca(client_ca, tls / "client-ca.crt"),
        client=issue(client_ca, tls, "client", "prometheus.example.net"),
        stranger=issue(trustme.CA(), tls, "stranger", "prometheus.example.net"),
    )


def tls_keys(pki: Pki, *, mutual: bool = False) -> dict[str, str]:
    keys = {"tls_cert_file": str(pki.server.cert), "tls_key_file": str(pki.server.key)}
    if mutual:
        keys["tls_client_ca_file"] = str(pki.client_ca_file)
    return keys


def config(
    *, http: dict[str, Any] | None = None, provisioning: dict[str, Any] | None = None
) -> dict[str, Any]:
    """An edge on loopback; with ``provisioning``, the API and the Bandwidth emulator too."""
    tables: dict[str, Any] = {}
    if http is not None:
        tables["http"] = http
    if provisioning is not None:
        emulator = free_port("tcp")
        tables["provisioning"] = {
            "listen": f"127.0.0.1:{free_port('tcp')}",
            "tokens": {"integration": TOKEN},
            **provisioning,
        }
        tables["bandwidth"] = {
            "api_base": f"http://127.0.0.1:{emulator}/api/v2",
            "token_url": f"http://127.0.0.1:{emulator}/api/v1/oauth2/token",
            "run_emulator": True,
            "max_retry_time": 5.0,
        }
    return edge_config(
        sip_port=free_port("both"),
        http_port=free_port("tcp"),
        emergency_trunks=[trunk_uri(free_port("udp"))],
        default_trunks=[trunk_uri(free_port("udp"))],
        **tables,
    )


def api_port(process: EdgeProcess) -> int:
    return int(process.config["provisioning"]["listen"].rsplit(":", 1)[1])


def request(
    port: int,
    method: str,
    path: str,
    context: ssl.SSLContext,
    *,
    token: str | None = TOKEN,
    body: Any = None,
) -> tuple[int, Any]:
    """One HTTPS request to 127.0.0.1:port: (status, JSON body)."""
    conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=30, context=context)
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    try:
        conn.request(method, path, None if body is None else json.dumps(body), headers)
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"null")
    finally:
        conn.close()


def plain_get(port: int, path: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    finally:
        conn.close()


# A client the server refuses sees the refusal in the handshake or, with TLS 1.3 (where the
# server checks the client's certificate after the client has finished), on its first read.
REFUSED = (ssl.SSLError, ConnectionError)


def test_ops_endpoints_over_https(edge_factory: EdgeFactory, pki: Pki) -> None:
    edge = edge_factory(config(http={**tls_keys(pki)}), ssl_context=client_context(pki.server_ca))
    # The harness found the edge ready through GET /readyz over HTTPS, trusting the test CA.
    status, body = edge.http_get("/readyz")
    assert status == 200 and json.loads(body)["status"] == "ready"
    assert "# TYPE e911_sip_requests_total counter" in edge.metrics()
    assert edge.http_get("/healthz")[0] == 200

    # It is the configured certificate: a client that trusts another CA rejects it.
    with pytest.raises(ssl.SSLCertVerificationError):
        request(edge.http_port, "GET", "/readyz", client_context(trustme.CA()), token=None)
    # And nothing is served in plain HTTP.
    with pytest.raises((http.client.HTTPException, ConnectionError)):
        plain_get(edge.http_port, "/metrics")


def test_provisioning_api_over_https_with_a_bearer_token(
    edge_factory: EdgeFactory, pki: Pki
) -> None:
    process = edge_factory(config(provisioning=tls_keys(pki)), timeout=30.0)
    port, trust = api_port(process), client_context(pki.server_ca)

    status, customer = request(
        port,
        "PUT",
        "/v1/customers/helpdesk365",
        trust,
        body={"name": "Helpdesk 365", "address": ADDRESS},
    )
    assert status == 201, customer
    assert customer["standardized_address"]["one_line"] == (
        "900 MAIN CAMPUS DR, STE 500, RALEIGH, NC 27606-5177, US"
    )
    status, listed = request(port, "GET", "/v1/customers", trust)
    assert status == 200 and [c["customer_id"] for c in listed["customers"]] == ["helpdesk365"]
    assert request(port, "GET", "/v1/customers", trust, token=None)[0] == 401
    with pytest.raises((http.client.HTTPException, ConnectionError)):
        plain_get(port, "/healthz")


def test_client_certificates_are_required_when_a_client_ca_is_set(
    edge_factory: EdgeFactory, pki: Pki
) -> None:
    # Prometheus-style: the harness scrapes /readyz and /metrics with its client certificate.
    process = edge_factory(
        config(http=tls_keys(pki, mutual=True), provisioning=tls_keys(pki, mutual=True)),
        timeout=30.0,
        ssl_context=client_context(pki.server_ca, pki.client),
    )
    assert "# TYPE e911_sip_requests_total counter" in process.metrics()
    port = api_port(process)

    without = client_context(pki.server_ca)
    with pytest.raises(REFUSED):
        request(port, "GET", "/v1/customers", without)
    with pytest.raises(REFUSED):
        request(port, "GET", "/healthz", without, token=None)
    with pytest.raises(REFUSED):
        request(port, "GET", "/v1/customers", client_context(pki.server_ca, pki.stranger))
    with pytest.raises(REFUSED):
        request(process.http_port, "GET", "/metrics", without, token=None)

    valid = client_context(pki.server_ca, pki.client)
    assert request(port, "GET", "/v1/customers", valid) == (200, {"customers": []})
    # The certificate lets a client connect; the token is still what authorises a request.
    assert request(port, "GET", "/v1/customers", valid, token=None)[0] == 401


def dockerfile_healthcheck() -> str:
    """The Python code of the Dockerfile's HEALTHCHECK, its continuation lines joined."""
    text = (REPO_ROOT / "Dockerfile").read_text().replace("\\\n", "")
    line = next(line for line in text.splitlines() if line.startswith("HEALTHCHECK "))
    match = re.search(r'CMD python -c "([^"]+)" \|\| exit 1$', line)
    assert match is not None, line
    return match.group(1)


def run_healthcheck(code: str, port: int, tls_dir: Path) -> subprocess.CompletedProcess[str]:
    code = code.replace("127.0.0.1:9100", f"127.0.0.1:{port}")
    code = code.replace("'/etc/e911-sip/tls/'", repr(f"{tls_dir}/"))
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=False
    )


def test_dockerfile_healthcheck_speaks_https(
    edge_factory: EdgeFactory, pki: Pki, tmp_path: Path
) -> None:
    code = dockerfile_healthcheck()
    # The check must target what the container config serves, where the files are mounted.
    assert "'https://127.0.0.1:9100/healthz'" in code and "'/etc/e911-sip/tls/'" in code
    container = (REPO_ROOT / "config" / "e911-sip.container.toml").read_text()
    assert 'listen = "0.0.0.0:9100"' in container

    mounted = tmp_path / "mounted"
    mounted.mkdir()
    edge = edge_factory(config(http=tls_keys(pki)), ssl_context=client_context(pki.server_ca))
    result = run_healthcheck(code, edge.http_port, mounted)
    assert result.returncode == 0, result.stderr

    mutual = edge_factory(
        config(http=tls_keys(pki, mutual=True)),
        ssl_context=client_context(pki.server_ca, pki.client),
    )
    refused = run_healthcheck(code, mutual.http_port, mounted)
    assert refused.returncode != 0
    # With healthcheck.crt/.key mounted (signed by the client CA) the check gets through.
    issue(pki.client_ca, mounted, "healthcheck", "healthcheck.example.net")
    result = run_healthcheck(code, mutual.http_port, mounted)
    assert result.returncode == 0, result.stderr
