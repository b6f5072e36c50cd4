"""Bulk import end to end: the ``e911-sip import`` command against a real provisioning
process (Redis state, line records in Redis), a separate Bandwidth emulator process with
its fault injection, a 429 storm, and a provisioning process killed with SIGKILL in the
middle of an import."""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path
from typing import Any

from e911_sip.provisioning.bandwidth import make_endpoint_id
from tests.integration.harness import (
    BandwidthEmulator,
    EdgeProcess,
    RedisServer,
    edge_config_on_free_ports,
    free_port,
    provisioning_sections,
    run_cli,
    serve,
    wait_until,
)
from tests.integration.harness import api as _api

TOKEN = "integration-import-token"
ACCOUNT = "5555555"

api = functools.partial(_api, token=TOKEN)
"""``harness.api`` with the token these tests configure."""


def provisioning_config(
    redis_url: str, api_port: int, emulator: BandwidthEmulator
) -> dict[str, Any]:
    return edge_config_on_free_ports(
        store_url=redis_url,
        **provisioning_sections(
            api_port,
            emulator.base,
            tokens={"migration": TOKEN},
            bandwidth={"order_poll_interval": 0.05, "max_retry_time": 10.0},
            state_url=redis_url,
            audit_url=redis_url,
            import_concurrency=4,
            import_batch_size=25,
            import_retry_delay=0.2,
        ),
    )


def start_import(api_port: int, path: Path) -> dict[str, Any]:
    """POST the CSV file at ``path`` to ``/v1/imports``; the job as accepted (202)."""
    status, accepted = api(
        api_port, "POST", "/v1/imports", data=path.read_bytes(), content_type="text/csv"
    )
    assert status == 202, accepted
    job: dict[str, Any] = accepted
    return job


def kill_midway(process: EdgeProcess, api_port: int, status_path: str) -> None:
    """SIGKILL ``process`` once the import job at ``status_path`` has rows done and rows
    pending (checked), as seen through the API on ``api_port``."""
    wait_until(
        lambda: bool(api(api_port, "GET", status_path)[1]["done"] > 0),
        "the first rows to be done",
        timeout=60,
    )
    _, before = api(api_port, "GET", status_path)
    assert before["pending"] > 0, before
    process.kill()


def wait_completed(api_port: int, status_path: str, timeout: float, what: str) -> None:
    wait_until(
        lambda: bool(api(api_port, "GET", status_path)[1]["state"] == "completed"),
        what,
        timeout=timeout,
    )
    _, view = api(api_port, "GET", status_path)
    assert (view["done"], view["failed"]) == (208, 0), view


def onboarding_file(path: Path, *, customers: int = 4, lines: int = 50, own: int = 3) -> int:
    """``customers`` x (customer address, one site address, ``own`` lines with their own
    address); half the lines on the site. Returns the number of distinct addresses."""
    rows = ["kind,customer_id,site_id,number,name,line1,city,state,postal_code"]
    house = 1000
    for c in range(customers):
        cid = f"csp{c}"
        house += 1
        rows.append(f"customer,{cid},,,Customer {c},{house} Oak Street,Raleigh,NC,27606")
        house += 1
        rows.append(f"site,{cid},hq,,HQ,{house} Elm Street,Cary,NC,27513")
        for i in range(lines):
            number = f"19195{c:02d}{i:03d}"
            site = "hq" if i % 2 else ""
            if i < own:
                house += 1
                rows.append(f"account,{cid},{site},{number},,{house} Pine Street,Cary,NC,27513")
            else:
                rows.append(f"account,{cid},{site},{number},,,,,")
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return customers * (2 + own)


def import_file(path: Path, api_port: int) -> subprocess.CompletedProcess[str]:
    """``e911-sip import`` of ``path`` through the API on ``api_port``."""
    return run_cli(
        "import",
        str(path),
        "--url",
        f"http://127.0.0.1:{api_port}",
        "--token",
        TOKEN,
        "--interval",
        "0.1",
        timeout=240,
    )


def expected_endpoints(customers: int, lines: int, own: int) -> set[str]:
    ids = set()
    for c in range(customers):
        cid = f"csp{c}"
        ids.add(make_endpoint_id("customer", cid))
        ids.add(make_endpoint_id("site", f"{cid}/hq"))
        for i in range(own):
            ids.add(make_endpoint_id("account", f"{cid}/19195{c:02d}{i:03d}"))
    return ids


def assert_every_line_recorded(redis_server: RedisServer, customers: int, lines: int) -> None:
    client = redis_server.client()
    for c in range(customers):
        for i in range(lines):
            fields = client.hgetall(f"e911:line:19195{c:02d}{i:03d}")
            assert fields, f"no line record for 19195{c:02d}{i:03d}"


def test_the_cli_imports_200_lines_through_a_429_storm(
    tmp_path: Path,
    processes: list[EdgeProcess],
    redis_server: RedisServer,
    emulator: BandwidthEmulator,
) -> None:
    api_port = free_port("tcp")
    config = provisioning_config(redis_server.url, api_port, emulator)
    serve(tmp_path, processes, config, "provisioning")
    path = tmp_path / "lines.csv"
    addresses = onboarding_file(path, customers=4, lines=50, own=3)
    assert addresses == 20
    emulator.fault({"status": 429, "retry_after": 0.2, "count": 30, "path_prefix": "/api/v2/"})
    done = import_file(path, api_port)
    assert done.returncode == 0, done.stdout + done.stderr
    # Not a terminal: plain counts, one line per change, then the report.
    assert "completed: 208 done, 0 failed of 208" in done.stdout
    assert done.stdout.splitlines()[0].startswith("import ")
    state = emulator.state()
    assert {e["id"] for e in state["endpoints"]} == expected_endpoints(4, 50, 3)
    assert sum(1 for r in state["requests"] if r["status"] == 429) == 30
    assert_every_line_recorded(redis_server, 4, 50)


def test_an_import_killed_midway_finishes_on_restart_without_duplicates(
    tmp_path: Path,
    processes: list[EdgeProcess],
    redis_server: RedisServer,
    emulator: BandwidthEmulator,
) -> None:
    api_port = free_port("tcp")
    config = provisioning_config(redis_server.url, api_port, emulator)
    first = serve(tmp_path, processes, config, "provisioning")
    path = tmp_path / "lines.csv"
    onboarding_file(path, customers=4, lines=50, own=3)
    # Slow endpoint orders so the kill lands with work done and work pending.
    emulator.fault({"delay": 0.3, "count": 1000, "path_prefix": "/api/v2/", "method": "POST"})
    status_path = start_import(api_port, path)["status_url"]
    kill_midway(first, api_port, status_path)
    emulator.clear_faults()

    # The restarted process resumes the job; the same file imported again also completes.
    serve(tmp_path, processes, config, "provisioning")
    again = import_file(path, api_port)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "208 done, 0 failed of 208" in again.stdout
    wait_completed(api_port, status_path, 120, "the resumed job to complete")
    endpoints = [e["id"] for e in emulator.state()["endpoints"]]
    # Exactly one endpoint per distinct address, however often a row was applied.
    assert sorted(endpoints) == sorted(expected_endpoints(4, 50, 3))
    assert_every_line_recorded(redis_server, 4, 50)
