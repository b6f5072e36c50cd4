"""A 911 call that fails over is recorded once, with both trunks, its location and its times.

Two processes share a redis-server, as in production: the edge writes the finished record to
a Redis stream, provisioning consumes it, adds the cascade level and keeps it in Redis; the
API and ``e911-sip calls export`` read it back.
"""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from e911_sip.callrecords.book import CSV_COLUMNS, CallRecord
from tests.integration.harness import (
    EdgeProcess,
    RedisServer,
    Sipp,
    api,
    edge_config,
    free_port,
    serve,
    trunk_uri,
    write_toml,
)
from tests.integration.test_end_to_end import provision_customer_and_line, provisioning_tables

LINE = "1321551234"


def wait_for_calls(api_port: int, timeout: float = 20.0) -> list[dict[str, Any]]:
    """GET /v1/calls until a record is there (the stream and the keeper are asynchronous)."""
    deadline = time.monotonic() + timeout
    while True:
        status, body = api(api_port, "GET", f"/v1/calls?caller={LINE}&since=2020-01-01")
        assert status == 200, body
        if body["calls"] or time.monotonic() > deadline:
            return list(body["calls"])
        time.sleep(0.1)


def export(config_path: Path, fmt: str) -> str:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "e911_sip",
            "calls",
            "export",
            "--config",
            str(config_path),
            "--since",
            "2020-01-01",
            "--format",
            fmt,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_failover_call_is_recorded_and_exported(
    tmp_path: Path, processes: list[EdgeProcess], sipp: Sipp, redis_server: RedisServer
) -> None:
    api_port, emulator_port = free_port("tcp"), free_port("tcp")
    first, second = free_port("udp"), free_port("udp")
    trunks = [trunk_uri(first), trunk_uri(second)]
    shared = {"store_url": redis_server.url, "records": {"store_url": redis_server.url}}
    provisioning_config = edge_config(
        sip_port=free_port("both"),
        http_port=free_port("tcp"),
        emergency_trunks=trunks,
        default_trunks=[trunk_uri(free_port("udp"))],
        **shared,
        **provisioning_tables(
            api_port, emulator_port, state_url=redis_server.url, audit_url=redis_server.url
        ),
    )
    serve(tmp_path, processes, provisioning_config, "provisioning")
    edge_only = edge_config(
        sip_port=free_port("both"),
        http_port=free_port("tcp"),
        emergency_trunks=trunks,
        default_trunks=[trunk_uri(free_port("udp"))],
        **shared,
    )
    edge = serve(tmp_path, processes, edge_only, "edge")
    endpoint = provision_customer_and_line(api_port, LINE)

    failing = sipp.uas("uas_503.xml", port=first)
    working = sipp.uas(
        "uas_emergency.xml",
        port=second,
        keys={"expected_endpoint": endpoint, "expected_callback": LINE},
    )
    caller = sipp.uac("uac_911.xml", edge.sip_target, keys={"caller": LINE})
    assert caller.ok, caller.summary()
    assert failing.wait().ok
    assert working.wait().ok

    calls = wait_for_calls(api_port)
    assert len(calls) == 1, calls
    [record] = calls
    assert record["caller"] == LINE and record["callback"] == LINE
    assert record["number"] == "911"
    assert record["provider_endpoint"] == endpoint
    assert record["level"] == "customer"
    assert record["outcome"] == "enriched"
    assert [(t["trunk"], t["attempt"], t["result"]) for t in record["trunks"]] == [
        (trunk_uri(first), 1, "503"),
        (trunk_uri(second), 2, "200"),
    ]
    assert record["status"] == 200 and record["end"] == "bye"
    assert record["invite_at"] and record["answered_at"] and record["bye_at"]
    assert record["invite_at"] <= record["answered_at"] <= record["bye_at"]

    config_path = write_toml(provisioning_config, tmp_path / "export.toml")
    [line] = export(config_path, "jsonl").splitlines()
    assert json.loads(line) == record
    rows = list(csv.reader(io.StringIO(export(config_path, "csv"))))
    assert rows == [list(CSV_COLUMNS), CallRecord.from_dict(record).csv_row()]
    assert dict(zip(CSV_COLUMNS, rows[1], strict=True))["trunks"] == (
        f"{trunk_uri(first)}=503;{trunk_uri(second)}=200"
    )
