"""Location coverage end to end: a provisioning process on real Redis with the Bandwidth
emulator over HTTP, lines at each cascade level (use cases 1.1, 1.3, 1.7), a line with no
address, one whose endpoint order Bandwidth fails, and lines whose record the edge would
not find; then ``GET /v1/coverage``, ``e911-sip coverage`` run as a process against the
running service, and the ``e911_sip_coverage_*`` gauges on its /metrics.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.harness import (
    LOOPBACK,
    PACKAGE_ROOT,
    EdgeProcess,
    RedisServer,
    edge_config,
    free_port,
    free_port_pair,
    metric_value,
    trunk_uri,
)

TOKEN = "coverage-integration-token"
NC_OFFICE = {
    "line1": "900 Main Campus Drive",
    "line2": "Suite 500",
    "city": "Raleigh",
    "state": "NC",
    "postal_code": "27606",
}
CARRY_OFFICE = {
    "line1": "600 Chatham Street",
    "city": "Cary",
    "state": "NC",
    "postal_code": "27513",
}

CUSTOMER_LINE = "1321551234"  # 1.1: the customer's address
SITE_LINE = "1321551235"  # 1.3: the site's
ACCOUNT_LINE = "1321551236"  # 1.7: its own
NO_ADDRESS_LINE = "1321551237"  # nothing anywhere
FAILED_LINE = "1321551238"  # its own address, but Bandwidth fails the endpoint order
MISSING_LINE = "1321551239"  # covered in state, record deleted behind provisioning's back
MALFORMED_LINE = "1321551240"  # covered in state, record overwritten with garbage


class Provisioning:
    def __init__(self, process: EdgeProcess, api_port: int, emulator_port: int) -> None:
        self.process = process
        self.api_port = api_port
        self.emulator_port = emulator_port

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        request = urllib.request.Request(
            f"http://{LOOPBACK}:{self.api_port}{path}",
            method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")

    def ok(self, method: str, path: str, body: Any = None) -> Any:
        status, payload = self.call(method, path, body)
        assert status in (200, 201), (status, payload)
        return payload

    def fault(self, spec: dict[str, Any]) -> None:
        request = urllib.request.Request(
            f"http://{LOOPBACK}:{self.emulator_port}/_emulator/faults",
            method="POST",
            data=json.dumps(spec).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 201

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ)
        src = PACKAGE_ROOT
        env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if "PYTHONPATH" in env else "")
        for name in ("E911_SIP_API_URL", "E911_SIP_API_TOKEN"):
            env.pop(name, None)
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "e911_sip",
                "coverage",
                "--config",
                str(self.process.config_path),
            ]
            + list(args),
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )


@pytest.fixture
def provisioning(tmp_path: Path, redis_server: RedisServer) -> Iterator[Provisioning]:
    api_port, emulator_port = free_port("tcp"), free_port("tcp")
    config = edge_config(
        sip_port=free_port_pair(),
        http_port=free_port("tcp"),
        emergency_trunks=[trunk_uri(free_port("udp"))],
        default_trunks=[trunk_uri(free_port("udp"))],
        store_url=redis_server.url,
        provisioning={
            "listen": f"{LOOPBACK}:{api_port}",
            "tokens": {"noc": TOKEN},
            "state_url": redis_server.url,
            "audit_url": redis_server.url,
            "coverage_alert_below": 0.9,
            "coverage_interval": 1.0,
        },
        bandwidth={
            "api_base": f"http://{LOOPBACK}:{emulator_port}/api/v2",
            "token_url": f"http://{LOOPBACK}:{emulator_port}/api/v1/oauth2/token",
            "run_emulator": True,
            "order_poll_interval": 0.05,
            "max_retry_time": 5.0,
        },
    )
    command = [sys.executable, "-m", "e911_sip", "serve", "--role", "provisioning"]
    process = EdgeProcess(tmp_path, config, command=command + ["--config", "{config}"])
    try:
        process.start(timeout=30)
        yield Provisioning(process, api_port, emulator_port)
    finally:
        process.stop()


def wait_for(condition: Callable[[], Any], what: str, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


def provision(p: Provisioning, redis_server: RedisServer) -> None:
    p.ok("PUT", "/v1/customers/hd365", {"name": "Helpdesk 365", "address": NC_OFFICE})
    for line in (CUSTOMER_LINE, MISSING_LINE, MALFORMED_LINE):
        p.ok("PUT", f"/v1/accounts/{line}", {"customer_id": "hd365"})
    p.ok("PUT", "/v1/customers/hd365/sites/carryoffice", {"address": CARRY_OFFICE})
    p.ok("PUT", f"/v1/accounts/{SITE_LINE}", {"customer_id": "hd365", "site_id": "carryoffice"})
    p.ok("PUT", f"/v1/accounts/{ACCOUNT_LINE}", {"customer_id": "hd365", "address": CARRY_OFFICE})
    p.ok("PUT", "/v1/customers/acme", {"name": "No address yet"})
    p.ok("PUT", f"/v1/accounts/{NO_ADDRESS_LINE}", {"customer_id": "acme"})
    p.ok("PUT", f"/v1/accounts/{FAILED_LINE}", {"customer_id": "acme"})
    p.fault({"order_error": "PSAP lookup failed", "order_error_code": 13999})
    status, body = p.call("PATCH", f"/v1/accounts/{FAILED_LINE}", {"address": NC_OFFICE})
    assert status == 422 and body["error"]["code"] == "endpoint_rejected", body
    client = redis_server.client()
    assert client.delete(f"e911:line:{MISSING_LINE}") == 1
    client.hset(f"e911:line:{MALFORMED_LINE}", "provider_endpoint", "not an endpoint!")


EXPECTED_GAUGES = {
    "account": 1,
    "site": 1,
    "customer": 1,
    "no_address": 2,
    "not_provisioned": 0,
    "record_missing": 2,
    "record_mismatch": 0,
}


def test_coverage_through_the_api_the_cli_and_the_gauges(
    provisioning: Provisioning, redis_server: RedisServer
) -> None:
    p = provisioning
    # Nothing yet: fully covered, and the threshold is exported.
    wait_for(
        lambda: metric_value(p.process.metrics(), "e911_sip_coverage_alert_below") == 0.9,
        "the first computation",
    )
    assert metric_value(p.process.metrics(), "e911_sip_coverage_share") == 1.0
    provision(p, redis_server)

    # The gauges follow on their own: the writes, and the records changed behind
    # provisioning's back within the interval.
    def gauges() -> dict[str, float | None]:
        text = p.process.metrics()
        return {s: metric_value(text, "e911_sip_coverage_lines", state=s) for s in EXPECTED_GAUGES}

    wait_for(lambda: gauges() == EXPECTED_GAUGES, f"gauges {EXPECTED_GAUGES}")
    text = p.process.metrics()
    assert metric_value(text, "e911_sip_coverage_share") == pytest.approx(3 / 7)
    assert metric_value(text, "e911_sip_coverage_endpoints_failed") == 1
    assert metric_value(text, "e911_sip_coverage_endpoints_pending") == 0

    # The API.
    body = p.ok("GET", "/v1/coverage")
    assert (body["lines"], body["covered"], body["alert_below"]) == (7, 3, 0.9)
    assert body["share"] == pytest.approx(3 / 7)
    assert body["by_level"] == {"account": 1, "site": 1, "customer": 1}
    assert body["uncovered_by_reason"] == {
        "no_address": 2,
        "not_provisioned": 0,
        "record_missing": 2,
        "record_mismatch": 0,
    }
    listed = {u["line"]: u for u in body["uncovered"]["lines"]}
    assert set(listed) == {NO_ADDRESS_LINE, FAILED_LINE, MISSING_LINE, MALFORMED_LINE}
    assert listed[FAILED_LINE]["order"] == "failed"
    assert listed[MISSING_LINE]["source"] == "customer:hd365"
    assert listed[MISSING_LINE]["record_endpoint"] is None
    [failed] = body["endpoints"]["failed"]
    assert (failed["entity"], failed["phone_number"], failed["lines"]) == (
        f"account:{FAILED_LINE}",
        FAILED_LINE,
        1,
    )
    assert "PSAP lookup failed" in failed["reason"]
    page = p.ok("GET", "/v1/coverage?limit=2&offset=2")
    assert page["uncovered"]["total"] == 4
    assert [u["line"] for u in page["uncovered"]["lines"]] == [MISSING_LINE, MALFORMED_LINE]

    # The CLI, as a process, against this running service (URL and token from its config).
    summary = p.cli()
    assert summary.returncode == 0, summary.stderr
    out = summary.stdout
    assert "Lines:            7" in out
    assert "With a location:  3 (42.86%)" in out
    assert "BELOW the alert threshold of 90.00%" in out
    assert "1 failed" in out and "PSAP lookup failed" in out
    for line in (NO_ADDRESS_LINE, FAILED_LINE, MISSING_LINE, MALFORMED_LINE):
        assert line in out
    for line in (CUSTOMER_LINE, SITE_LINE, ACCOUNT_LINE):
        assert line not in out
    as_json = p.cli("--json", "--limit", "1", "--fail-below", "0.9")
    assert as_json.returncode == 3, as_json.stderr
    view = json.loads(as_json.stdout)
    assert (view["lines"], view["uncovered"]["total"]) == (7, 4)
    assert [u["line"] for u in view["uncovered"]["lines"]] == [NO_ADDRESS_LINE]
    wrong = p.cli("--token", "not-the-right-token-at-all")
    assert wrong.returncode == 1 and "401" in wrong.stderr

    # resync repairs the records: the two lines are covered again, gauges and all.
    p.ok("POST", "/v1/resync")
    body = p.ok("GET", "/v1/coverage")
    assert (body["covered"], body["uncovered"]["total"]) == (5, 2)
    assert metric_value(p.process.metrics(), "e911_sip_coverage_lines", state="customer") == 3


async def test_redis_state_reads_every_customer_in_batches(redis_server: RedisServer) -> None:
    from e911_sip.provisioning.model import Customer, CustomerState
    from e911_sip.provisioning.state import RedisStateStore

    store = RedisStateStore(url=redis_server.url, key_prefix="t:")
    try:
        for cid in ("e", "a", "d", "b", "c"):
            await store.put(CustomerState(customer=Customer(customer_id=cid), version=1))
        got = await store.all_customers(batch=2)
        assert [s.customer_id for s in got] == ["a", "b", "c", "d", "e"]
    finally:
        await store.close()
