"""Bulk import benchmark with real processes on loopback.

Starts redis-server, the Bandwidth emulator (``e911-sip bandwidth-emulator``, its own
process: orders answer PROCESSING once, so with the client's default
``order_poll_interval`` of 0.5 s every endpoint order takes about half a second, as
Bandwidth's asynchronous orders do) and a provisioning process (``e911-sip serve --role
provisioning``, state and line records in Redis). It generates an onboarding file
(``--customers`` customers, each with an address and one site with an address; ``--lines``
lines spread over them, half on the site; ``--own`` of them with their own address), runs
``e911-sip import`` against the running service, and reports:

* wall time of the CLI, from the POST to the final report;
* Bandwidth requests made (the emulator's request log) and 429s seen;
* endpoints at the emulator (must be one per distinct address) and line records in Redis
  (must be one per line).

``--storm N`` has the emulator answer the next N API requests with 429 and Retry-After 1.

    python bench/import_bench.py --lines 10000 --own 500 --customers 100

Everything listens on 127.0.0.1 and stops when the run ends.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TOKEN = "bench-import-token-0123456789"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if condition():
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.05)


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=60) as response:
        return json.loads(response.read())


def env() -> dict[str, str]:
    out = dict(os.environ)
    src = str(REPO / "src")
    out["PYTHONPATH"] = src + (os.pathsep + out["PYTHONPATH"] if out.get("PYTHONPATH") else "")
    return out


def onboarding_file(path: Path, *, customers: int, lines: int, own: int) -> int:
    """Write the file; the number of distinct addresses in it."""
    rows = ["kind,customer_id,site_id,number,name,line1,city,state,postal_code"]
    house = 1000
    per_customer = [
        lines // customers + (1 if c < lines % customers else 0) for c in range(customers)
    ]
    own_left = own
    number = 2_000_000_000
    for c, count in enumerate(per_customer):
        cid = f"csp{c:04d}"
        house += 1
        rows.append(f"customer,{cid},,,Customer {c},{house} Oak Street,Raleigh,NC,27606")
        house += 1
        rows.append(f"site,{cid},hq,,HQ,{house} Elm Street,Cary,NC,27513")
        own_here = own_left // (customers - c)
        own_left -= own_here
        for i in range(count):
            number += 1
            site = "hq" if i % 2 else ""
            if i < own_here:
                house += 1
                rows.append(f"account,{cid},{site},{number},,{house} Pine Street,Cary,NC,27513")
            else:
                rows.append(f"account,{cid},{site},{number},,,,,")
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return 2 * customers + own


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=10_000)
    parser.add_argument("--own", type=int, default=500, help="lines with their own address")
    parser.add_argument("--customers", type=int, default=100)
    parser.add_argument(
        "--concurrency", type=int, default=8, help="[provisioning] import_concurrency"
    )
    parser.add_argument(
        "--batch-size", type=int, default=500, help="[provisioning] import_batch_size"
    )
    parser.add_argument("--storm", type=int, default=0, help="429s injected before the import")
    args = parser.parse_args()
    redis_server = shutil.which("redis-server")
    if redis_server is None:
        raise SystemExit("redis-server is not installed")

    work = Path(tempfile.mkdtemp(prefix="import-bench-"))
    procs: list[subprocess.Popen[bytes]] = []

    def start(cmd: list[str], name: str) -> subprocess.Popen[bytes]:
        log = (work / f"{name}.log").open("wb")
        proc = subprocess.Popen(cmd, stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=env())
        procs.append(proc)
        return proc

    try:
        redis_port, emulator_port, api_port, http_port, sip_port = (free_port() for _ in range(5))
        start(
            [
                redis_server,
                "--port",
                str(redis_port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(work),
            ],
            "redis",
        )
        start(
            [
                sys.executable,
                "-m",
                "e911_sip",
                "bandwidth-emulator",
                "--listen",
                f"127.0.0.1:{emulator_port}",
                "--log-level",
                "WARNING",
            ],
            "emulator",
        )
        emulator = f"http://127.0.0.1:{emulator_port}"
        wait_for(lambda: bool(get_json(f"{emulator}/_emulator/state") is not None), 30, "emulator")
        redis_url = f"redis://127.0.0.1:{redis_port}/0"
        config = work / "provisioning.toml"
        config.write_text(
            f"""
[sip]
listen = ["udp:127.0.0.1:{sip_port}"]
[emergency]
trunks = ["sip:127.0.0.1:{free_port()}"]
probe_interval = 0
[store]
url = "{redis_url}"
[http]
listen = "127.0.0.1:{http_port}"
[log]
level = "WARNING"
[provisioning]
listen = "127.0.0.1:{api_port}"
state_url = "{redis_url}"
audit_url = "{redis_url}"
import_concurrency = {args.concurrency}
import_batch_size = {args.batch_size}
[provisioning.tokens]
bench = "{TOKEN}"
[bandwidth]
api_base = "{emulator}/api/v2"
token_url = "{emulator}/api/v1/oauth2/token"
""",
            encoding="utf-8",
        )
        start(
            [
                sys.executable,
                "-m",
                "e911_sip",
                "serve",
                "--role",
                "provisioning",
                "--config",
                str(config),
            ],
            "provisioning",
        )
        api = f"http://127.0.0.1:{api_port}"
        wait_for(lambda: get_json(f"{api}/healthz")["status"] == "ok", 60, "provisioning API")
        data = work / "lines.csv"
        addresses = onboarding_file(data, customers=args.customers, lines=args.lines, own=args.own)
        if args.storm:
            request = urllib.request.Request(
                f"{emulator}/_emulator/faults",
                method="POST",
                data=json.dumps(
                    {
                        "status": 429,
                        "retry_after": 1,
                        "count": args.storm,
                        "path_prefix": "/api/v2/",
                    }
                ).encode(),
                headers={"Content-Type": "application/json"},
            )
            urllib.request.urlopen(request, timeout=10).close()
        started = time.monotonic()
        cli = subprocess.run(
            [
                sys.executable,
                "-m",
                "e911_sip",
                "import",
                str(data),
                "--url",
                api,
                "--token",
                TOKEN,
                "--interval",
                "1",
            ],
            capture_output=True,
            text=True,
            env=env(),
            check=False,
        )
        wall = time.monotonic() - started
        state = get_json(f"{emulator}/_emulator/state")
        requests = state["requests"]
        line_keys = subprocess.run(
            ["redis-cli", "-p", str(redis_port), "--scan", "--pattern", "e911:line:*"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        report = {
            "lines": args.lines,
            "own_address_lines": args.own,
            "customers": args.customers,
            "distinct_addresses": addresses,
            "import_concurrency": args.concurrency,
            "import_batch_size": args.batch_size,
            "cli_exit": cli.returncode,
            "cli_last_line": (cli.stdout.strip().splitlines() or [""])[-1]
            if cli.returncode == 0
            else cli.stdout[-2000:] + cli.stderr[-2000:],
            "wall_seconds": round(wall, 1),
            "bandwidth_requests": len(requests),
            "bandwidth_request_log_full": len(requests) >= 10_000,
            "http_429_seen": sum(1 for r in requests if r["status"] == 429),
            "endpoints": len(state["endpoints"]),
            "line_records": len(line_keys),
            "host": {"cpus": os.cpu_count(), "load_average": os.getloadavg()},
        }
        print(json.dumps(report, indent=2))
        ok = (
            cli.returncode == 0
            and report["endpoints"] == addresses
            and report["line_records"] == args.lines
        )
        return 0 if ok else 1
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
