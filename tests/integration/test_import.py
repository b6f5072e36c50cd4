"""Bulk import end to end: the ``e911-sip import`` command against a real provisioning
process (Redis state, line records in Redis), a separate Bandwidth emulator process with
its fault injection, a 429 storm, and a provisioning process killed with SIGKILL in the
middle of an import."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from e911_sip.provisioning.bandwidth import make_endpoint_id
from tests.integration.harness import (
    REPO_ROOT,
    EdgeProcess,
    RedisServer,
    edge_config,
    free_port,
    trunk_uri,
)

TOKEN = "integration-import-token"
ACCOUNT = "5555555"


def http(url: str, method: str = "GET", body: Any = None) -> tuple[int, Any]:
    request = urllib.request.Request(
        url,
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    src = str(REPO_ROOT / "src")
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


class Emulator:
    """``e911-sip bandwidth-emulator`` in its own process, so it outlives a killed
    provisioning process."""

    def __init__(self, tmp_path: Path) -> None:
        self.port = free_port("tcp")
        self.base = f"http://127.0.0.1:{self.port}"
        self._log = (tmp_path / "emulator.log").open("wb")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "e911_sip",
                "bandwidth-emulator",
                "--listen",
                f"127.0.0.1:{self.port}",
                "--log-level",
                "WARNING",
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
            env=child_env(),
        )
        wait_for(self._answers, 20, "the emulator to listen")

    def _answers(self) -> bool:
        assert self.proc.poll() is None, "the emulator exited"
        try:
            return self.state() is not None
        except OSError:
            return False

    def state(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.base}/_emulator/state", timeout=10) as response:
            result: dict[str, Any] = json.loads(response.read())
            return result

    def fault(self, spec: dict[str, Any]) -> None:
        status, _ = http(f"{self.base}/_emulator/faults", "POST", spec)
        assert status == 201

    def clear_faults(self) -> None:
        request = urllib.request.Request(f"{self.base}/_emulator/faults", method="DELETE")
        with urllib.request.urlopen(request, timeout=10):
            pass

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


@pytest.fixture
def emulator(tmp_path: Path) -> Iterator[Emulator]:
    running = Emulator(tmp_path)
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def processes() -> Iterator[list[EdgeProcess]]:
    started: list[EdgeProcess] = []
    try:
        yield started
    finally:
        for process in started:
            process.stop()


def provisioning_config(redis_url: str, api_port: int, emulator: Emulator) -> dict[str, Any]:
    return edge_config(
        sip_port=free_port("both"),
        http_port=free_port("tcp"),
        emergency_trunks=[trunk_uri(free_port("udp"))],
        default_trunks=[trunk_uri(free_port("udp"))],
        store_url=redis_url,
        provisioning={
            "listen": f"127.0.0.1:{api_port}",
            "tokens": {"migration": TOKEN},
            "state_url": redis_url,
            "audit_url": redis_url,
            "import_concurrency": 4,
            "import_batch_size": 25,
            "import_retry_delay": 0.2,
        },
        bandwidth={
            "api_base": f"{emulator.base}/api/v2",
            "token_url": f"{emulator.base}/api/v1/oauth2/token",
            "order_poll_interval": 0.05,
            "max_retry_time": 10.0,
        },
    )


def start_provisioning(
    tmp_path: Path, processes: list[EdgeProcess], config: dict[str, Any]
) -> EdgeProcess:
    command = [
        sys.executable,
        "-m",
        "e911_sip",
        "serve",
        "--role",
        "provisioning",
        "--config",
        "{config}",
    ]
    process = EdgeProcess(tmp_path, config, command=command)
    processes.append(process)
    process.start(timeout=30)
    return process


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


def run_cli(path: Path, api_port: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "e911_sip",
            "import",
            str(path),
            "--url",
            f"http://127.0.0.1:{api_port}",
            "--token",
            TOKEN,
            "--interval",
            "0.1",
        ],
        capture_output=True,
        text=True,
        timeout=240,
        env=child_env(),
        check=False,
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
    emulator: Emulator,
) -> None:
    api_port = free_port("tcp")
    start_provisioning(
        tmp_path, processes, provisioning_config(redis_server.url, api_port, emulator)
    )
    path = tmp_path / "lines.csv"
    addresses = onboarding_file(path, customers=4, lines=50, own=3)
    assert addresses == 20
    emulator.fault({"status": 429, "retry_after": 0.2, "count": 30, "path_prefix": "/api/v2/"})
    done = run_cli(path, api_port)
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
    emulator: Emulator,
) -> None:
    api_port = free_port("tcp")
    config = provisioning_config(redis_server.url, api_port, emulator)
    first = start_provisioning(tmp_path, processes, config)
    path = tmp_path / "lines.csv"
    onboarding_file(path, customers=4, lines=50, own=3)
    # Slow endpoint orders so the kill lands with work done and work pending.
    emulator.fault({"delay": 0.3, "count": 1000, "path_prefix": "/api/v2/", "method": "POST"})
    request = urllib.request.Request(
        f"http://127.0.0.1:{api_port}/v1/imports",
        method="POST",
        data=path.read_bytes(),
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "text/csv"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status == 202
        accepted = json.loads(response.read())
    status_url = f"http://127.0.0.1:{api_port}{accepted['status_url']}"

    def some_done() -> bool:
        _, view = http(status_url)
        return bool(view["done"] > 0)

    wait_for(some_done, 60, "the first rows to be done")
    _, before = http(status_url)
    assert before["pending"] > 0, before
    assert first.pid is not None
    os.kill(first.pid, signal.SIGKILL)
    wait_for(lambda: not first.running, 10, "the killed process to exit")
    emulator.clear_faults()

    # The restarted process resumes the job; the same file imported again also completes.
    start_provisioning(tmp_path, processes, config)
    again = run_cli(path, api_port)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "208 done, 0 failed of 208" in again.stdout

    def resumed() -> bool:
        _, view = http(status_url)
        return bool(view["state"] == "completed")

    wait_for(resumed, 120, "the resumed job to complete")
    _, view = http(status_url)
    assert (view["done"], view["failed"]) == (208, 0), view
    endpoints = [e["id"] for e in emulator.state()["endpoints"]]
    # Exactly one endpoint per distinct address, however often a row was applied.
    assert sorted(endpoints) == sorted(expected_endpoints(4, 50, 3))
    assert_every_line_recorded(redis_server, 4, 50)
