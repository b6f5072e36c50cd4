"""Provision through the API, then call 911 through the edge and see the Geolocation arrive.

This is the README's quick start as a test: the bundled Bandwidth emulator, the provisioning
API and the edge, in one process (embedded mode) and split into two processes with a real
redis-server between them.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from tests.integration.harness import (
    API_TOKEN,
    EdgeProcess,
    RedisServer,
    Sipp,
    api,
    call_and_check,
    edge_config_on_free_ports,
    free_port,
    provisioning_sections,
    run_cli,
    serve,
    write_toml,
)

CUSTOMER_ADDRESS = {
    "line1": "900 Main Campus Drive",
    "line2": "Suite 500",
    "city": "Raleigh",
    "state": "NC",
    "postal_code": "27606",
    "country": "US",
}


def provisioning_tables(api_port: int, emulator_port: int, **state: str) -> dict[str, Any]:
    """The API on ``api_port`` taking ``api``'s token as ``integration``; the emulator runs
    in the process."""
    return provisioning_sections(
        api_port, f"http://127.0.0.1:{emulator_port}", tokens={"integration": API_TOKEN}, **state
    )


def resync(config_path: Path) -> subprocess.CompletedProcess[str]:
    return run_cli("resync", "--config", str(config_path), timeout=120)


def provision_customer_and_line(api_port: int, line: str) -> str:
    """Use case 1.1 then an account on the customer; returns the line's provider_endpoint."""
    status, customer = api(
        api_port,
        "PUT",
        "/v1/customers/helpdesk365",
        {"name": "Helpdesk 365", "address": CUSTOMER_ADDRESS},
    )
    assert status == 201, customer
    assert customer["standardized_address"]["one_line"] == (
        "900 MAIN CAMPUS DR, STE 500, RALEIGH, NC 27606-5177, US"
    )
    status, account = api(api_port, "PUT", f"/v1/accounts/{line}", {"customer_id": "helpdesk365"})
    assert status == 201, account
    endpoint = account["effective"]["provider_endpoint"]
    assert account["effective"]["level"] == "customer" and endpoint.startswith("5555555/")
    return str(endpoint)


def test_embedded_single_box(tmp_path: Path, processes: list[EdgeProcess], sipp: Sipp) -> None:
    api_port, emulator_port, trunk = free_port("tcp"), free_port("tcp"), free_port("udp")
    config = edge_config_on_free_ports(
        trunk=trunk,
        **provisioning_tables(
            api_port,
            emulator_port,
            state_url=f"file://{tmp_path / 'state.json'}",
            audit_url=f"file://{tmp_path / 'audit.jsonl'}",
        ),
    )
    edge = serve(tmp_path, processes, config, "all")
    endpoint = provision_customer_and_line(api_port, "1321551234")
    call_and_check(sipp, edge, trunk, "1321551234", endpoint)
    status, audit = api(api_port, "GET", "/v1/audit?line=1321551234")
    assert status == 200
    entries = audit["entries"] if isinstance(audit, dict) else audit
    assert any(
        e["new_provider_endpoint"] == endpoint and e["who"] == "integration" for e in entries
    )

    # `e911-sip resync` acts on the running service, whose in-memory records are complete:
    # nothing to write (a resync in a store of the command's own would "write" the line).
    config_path = write_toml(config, tmp_path / "resync.toml")
    result = resync(config_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["written"] == []

    # The in-memory line store starts empty again after a restart; the records of provisioned
    # lines are rebuilt from the state file before calls are taken.
    edge.stop()
    # With the service down, resync refuses instead of repairing a throwaway copy.
    audit_before = (tmp_path / "audit.jsonl").read_bytes()
    result = resync(config_path)
    assert result.returncode == 2 and result.stdout == ""
    assert "memory://" in result.stderr and f"127.0.0.1:{api_port}" in result.stderr
    assert (tmp_path / "audit.jsonl").read_bytes() == audit_before
    restarted = serve(tmp_path, processes, config, "all")
    call_and_check(sipp, restarted, trunk, "1321551234", endpoint)


def test_split_roles_with_redis_between_them(
    tmp_path: Path, processes: list[EdgeProcess], sipp: Sipp, redis_server: RedisServer
) -> None:
    api_port, emulator_port, trunk = free_port("tcp"), free_port("tcp"), free_port("udp")
    shared = {"store_url": redis_server.url}
    provisioning_config = edge_config_on_free_ports(
        trunk=trunk,
        **shared,
        **provisioning_tables(
            api_port, emulator_port, state_url=redis_server.url, audit_url=redis_server.url
        ),
    )
    provisioning = serve(tmp_path, processes, provisioning_config, "provisioning")
    edge_only = edge_config_on_free_ports(trunk=trunk, **shared)
    edge = serve(tmp_path, processes, edge_only, "edge")

    endpoint = provision_customer_and_line(api_port, "3215551234")
    record = redis_server.client().hgetall("e911:line:3215551234")
    assert record["provider_endpoint"] == endpoint
    # The edge learns of the record from Redis (within a second, usually milliseconds): the
    # call waits until it holds it, or a loaded host could place it first.
    edge.wait_metric(
        "e911_sip_location_records", lambda v: v >= 1, "the new line record", timeout=15.0
    )
    call_and_check(sipp, edge, trunk, "3215551234", endpoint)

    # A lost line record (a crash between Bandwidth and Redis, an operator's mistake) is
    # rebuilt from provisioning state by `e911-sip resync`.
    redis_server.client().delete("e911:line:3215551234")
    config_path = write_toml(provisioning_config, tmp_path / "resync.toml")
    result = resync(config_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert "3215551234" in report["written"]
    assert redis_server.client().hget("e911:line:3215551234", "provider_endpoint") == endpoint
    # The running service did it: the repair is audited under the token's name.
    status, audit = api(api_port, "GET", "/v1/audit?line=3215551234")
    assert (audit["entries"][-1]["action"], audit["entries"][-1]["who"]) == (
        "resync",
        "integration",
    )

    # With the provisioning service stopped, the stores are shared (Redis), so the command
    # repairs them itself and says so. (The emulator stopped with the service: the report
    # says Bandwidth could not be checked, hence exit 1.)
    provisioning.stop()
    redis_server.client().delete("e911:line:3215551234")
    result = resync(config_path)
    assert result.returncode == 1, result.stderr
    assert "resyncing the shared stores directly" in result.stderr
    report = json.loads(result.stdout)
    assert report["written"] == ["3215551234"] and report["provider_checked"] is False
    assert redis_server.client().hget("e911:line:3215551234", "provider_endpoint") == endpoint
