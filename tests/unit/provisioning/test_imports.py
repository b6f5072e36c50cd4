"""Bulk import: the file formats, the job stores, and jobs run through the API against the
Bandwidth emulator over real HTTP (fixtures of test_service)."""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
from aiohttp import web
from aiohttp.test_utils import TestServer

from e911_sip.cli import _progress, _run_import
from e911_sip.config import ConfigError, load
from e911_sip.provisioning import imports
from e911_sip.provisioning.api import build_provisioning_app
from e911_sip.provisioning.bandwidth import make_endpoint_id
from e911_sip.provisioning.imports import (
    FileJobStore,
    Format,
    ImportOptions,
    ImportRunner,
    JobInfo,
    JobState,
    JobStoreError,
    MemoryJobStore,
    Row,
    RowResult,
    parse_file,
    sniff_format,
)
from tests.certs import issue, write_ca
from tests.unit.provisioning.test_service import World

TOKEN = {"Authorization": "Bearer s3cret-import-token"}
HEADER = "kind,customer_id,site_id,number,name,line1,line2,city,state,postal_code\n"


def onboarding_csv(customers: int = 2, lines: int = 10, own: int = 2) -> str:
    """Per customer: an address, one site with an address, ``lines`` lines, half on the
    site, ``own`` of them with their own address."""
    out = [HEADER]
    house = 100
    for c in range(customers):
        cid = f"cust{c}"
        house += 1
        out.append(f"customer,{cid},,,Customer {c},{house} Oak Street,,Raleigh,NC,27606\n")
        house += 1
        out.append(f"site,{cid},hq,,HQ,{house} Elm Street,,Cary,NC,27513\n")
        for i in range(lines):
            number = f"13215{c:02d}{i:03d}"
            site = "hq" if i % 2 == 0 else ""
            if i < own:
                house += 1
                out.append(f"account,{cid},{site},{number},,{house} Pine Street,,Cary,NC,27513\n")
            else:
                out.append(f"account,{cid},{site},{number},,,,,,\n")
    return "".join(out)


# --- the file formats -----------------------------------------------------------------------


def test_csv_rows_become_the_api_bodies() -> None:
    text = HEADER + (
        "customer,hd365,,,Helpdesk 365,900 Main Campus Drive,Suite 500,Raleigh,NC,27606\n"
        "site,hd365,cary,,Cary,600 Chatham Street,,Cary,NC,27513\n"
        "account,hd365,cary,3215551234,,,,,,\n"
    )
    rows, failed = parse_file(text.encode(), Format.CSV, max_rows=100)
    assert failed == {}
    assert [(r.line, r.kind) for r in rows] == [(2, "customer"), (3, "site"), (4, "account")]
    assert rows[0].body == {
        "customer_id": "hd365",
        "name": "Helpdesk 365",
        "address": {
            "line1": "900 Main Campus Drive",
            "line2": "Suite 500",
            "city": "Raleigh",
            "state": "NC",
            "postal_code": "27606",
        },
    }
    assert rows[2].body == {"customer_id": "hd365", "site_id": "cary", "number": "3215551234"}


def test_jsonl_rows_are_the_api_bodies_with_a_kind() -> None:
    lines = [
        {"kind": "customer", "customer_id": "hd365", "contacts": {"emails": ["a@b.example"]}},
        {"kind": "account", "customer_id": "hd365", "number": "3215551234", "name": "x"},
    ]
    data = "\n".join(json.dumps(x) for x in lines).encode()
    assert sniff_format(data) is Format.JSONL
    rows, failed = parse_file(data, Format.JSONL, max_rows=100)
    assert failed == {} and [r.kind for r in rows] == ["customer", "account"]
    assert rows[0].body["contacts"] == {"emails": ["a@b.example"]}


def test_bad_rows_fail_alone_with_the_reason() -> None:
    text = HEADER + (
        "customer,hd365,,,,,,,,\n"
        "sofa,hd365,,,,,,,,\n"
        "account,hd365,,12345,,,,,,\n"
        "account,hd365,,3215551234,,,,,,\n"
        "account,hd365,,3215551234,,,,,,\n"
        "site,hd365,cary,,,600 Chatham Street,,,NC,27513\n"
        "account,hd365\n"
    )
    rows, failed = parse_file(text.encode(), Format.CSV, max_rows=100)
    assert [r.line for r in rows] == [2, 5]
    assert {line: r.code for line, r in failed.items()} == {
        3: "invalid_row",
        4: "invalid_request",
        6: "duplicate_row",
        7: "invalid_request",
        8: "invalid_row",
    }
    assert "city is required" in failed[7].message
    assert "line 5" in failed[6].message


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"", "empty_file"),
        (b"kind,colour\nsite,red\n", "invalid_header"),
        (b"\xff\xfe", "invalid_file"),
    ],
)
def test_a_file_that_cannot_be_read_is_refused_whole(data: bytes, code: str) -> None:
    from e911_sip.provisioning.imports import FileRefused

    with pytest.raises(FileRefused) as caught:
        parse_file(data, Format.CSV, max_rows=100)
    assert caught.value.code == code


def test_a_file_longer_than_the_bound_is_refused() -> None:
    from e911_sip.provisioning.imports import FileRefused

    with pytest.raises(FileRefused) as caught:
        parse_file(onboarding_csv(1, 10).encode(), Format.CSV, max_rows=5)
    assert caught.value.status == 413


# --- job stores -------------------------------------------------------------------------------


async def test_the_file_job_store_survives_a_new_instance(tmp_path: Path) -> None:
    store = FileJobStore(tmp_path / "imports")
    info = JobInfo(
        job_id="0123456789abcdef", who="t", created_at="x", state=JobState.RUNNING, total=3
    )
    rows = [Row(2, "customer", {"customer_id": "a"}), Row(3, "customer", {"customer_id": "b"})]
    await store.create(info, rows)
    await store.record(info.job_id, {2: RowResult(True, entity="customer:a")})
    await store.record(info.job_id, {2: RowResult(True), 4: RowResult(False, "invalid_row", "x")})
    again = FileJobStore(tmp_path / "imports")
    loaded = await again.info(info.job_id)
    assert loaded is not None and (loaded.done, loaded.failed, loaded.pending) == (1, 1, 1)
    assert loaded.state is JobState.RUNNING
    assert await again.rows(info.job_id) == rows
    assert set(await again.results(info.job_id)) == {2, 4}


async def test_finished_jobs_beyond_the_bound_are_forgotten() -> None:
    store = MemoryJobStore(keep=2)
    for n in range(4):
        job = f"{n:016x}"
        await store.create(
            JobInfo(job_id=job, who="t", created_at=str(n), state=JobState.QUEUED, total=0), []
        )
        await store.set_state(job, JobState.COMPLETED)
    await store.create(
        JobInfo(job_id="f" * 16, who="t", created_at="9", state=JobState.QUEUED, total=0), []
    )
    assert await store.job_ids() == [f"{2:016x}", f"{3:016x}", "f" * 16]


# --- jobs through the API ---------------------------------------------------------------------


class Client:
    def __init__(self, server: TestServer, session: aiohttp.ClientSession) -> None:
        self.server = server
        self.session = session

    async def post(self, data: str, content_type: str = "text/csv") -> tuple[int, Any]:
        async with self.session.post(
            self.server.make_url("/v1/imports"),
            data=data.encode(),
            headers={**TOKEN, "Content-Type": content_type},
        ) as response:
            return response.status, await response.json()

    async def get(self, path: str) -> tuple[int, Any]:
        async with self.session.get(self.server.make_url(path), headers=TOKEN) as response:
            return response.status, await response.json()

    async def finished(self, path: str) -> dict[str, Any]:
        async with asyncio.timeout(60):
            while True:
                status, view = await self.get(path)
                assert status == 200, view
                if view["state"] == "completed":
                    return dict(view)
                await asyncio.sleep(0.05)


async def serve(runner: ImportRunner, world: World) -> AsyncIterator[Client]:
    app = build_provisioning_app(
        world.service, tokens={"s3cret-import-token": "migration"}, imports=runner
    )
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    session = aiohttp.ClientSession()
    try:
        yield Client(server, session)
    finally:
        await runner.close()
        await session.close()
        await server.close()


@pytest.fixture
async def client(world: World) -> AsyncIterator[Client]:
    runner = ImportRunner(
        service=world.service,
        store=MemoryJobStore(),
        options=ImportOptions(import_concurrency=3, import_batch_size=4, import_retry_delay=0.01),
        metrics=world.metrics,
    )
    async for running in serve(runner, world):
        yield running


async def test_an_import_job_provisions_every_line_and_reports_counts(
    client: Client, world: World
) -> None:
    status, accepted = await client.post(onboarding_csv(customers=2, lines=10, own=2))
    assert status == 202, accepted
    assert accepted["status_url"] == f"/v1/imports/{accepted['id']}"
    assert accepted["total"] == 24
    view = await client.finished(accepted["status_url"])
    assert (view["total"], view["done"], view["failed"], view["pending"]) == (24, 24, 0, 0)
    assert view["failures"] == []
    endpoints = await world.bw.endpoints()
    # customer, site and two own addresses per customer: each ordered once.
    assert len(endpoints) == 8
    assert len(await world.bw.requests("POST", "/addresses")) == 8
    for c in range(2):
        for i in range(10):
            record = await world.record(f"13215{c:02d}{i:03d}")
            assert record is not None
    line = await world.record("1321500004")
    assert line is not None and line.provider_endpoint.endswith(
        make_endpoint_id("site", "cust0/hq")
    )
    _, listing = await client.get("/v1/imports")
    assert [j["id"] for j in listing["imports"]] == [accepted["id"]]
    samples = world.metrics.import_rows.labels("done")._value.get()
    assert samples == 24


async def test_the_same_file_again_creates_nothing_new(client: Client, world: World) -> None:
    data = onboarding_csv(customers=1, lines=6, own=2)
    _, first = await client.post(data)
    await client.finished(first["status_url"])
    endpoints = await world.bw.endpoints()
    posts = len(await world.bw.requests("POST", "/endpoints"))
    _, second = await client.post(data)
    view = await client.finished(second["status_url"])
    assert (view["done"], view["failed"]) == (8, 0)
    assert await world.bw.endpoints() == endpoints
    assert len(await world.bw.requests("POST", "/endpoints")) == posts


async def test_failures_are_reported_with_line_and_reason(client: Client, world: World) -> None:
    data = HEADER + (
        "customer,hd365,,,,900 Main Campus Drive,,Raleigh,NC,27606\n"
        "account,hd365,,3215551234,,1 Nowhere Street,,Cary,NC,27513\n"
        "account,hd365,,3215551235,,,,,,\n"
        "account,hd365,nosite,3215551236,,,,,,\n"
        "account,ghost,,3215551237,,,,,,\n"
        "account,hd365,,123,,,,,,\n"
    )
    _, accepted = await client.post(data)
    view = await client.finished(accepted["status_url"])
    assert (view["total"], view["done"], view["failed"]) == (6, 2, 4)
    assert [(f["line"], f["code"]) for f in view["failures"]] == [
        (3, "address_rejected"),
        (5, "unknown_site"),
        (6, "unknown_customer"),
        (7, "invalid_request"),
    ]
    assert view["failures"][0]["entity"] == "account:3215551234"
    assert await world.record("3215551235") is not None


async def test_a_429_storm_is_waited_out_and_the_job_completes(
    client: Client, world: World
) -> None:
    await world.bw.fault(status=429, retry_after=0.05, count=6, path_prefix="/api/v2/")
    _, accepted = await client.post(onboarding_csv(customers=2, lines=6, own=2))
    view = await client.finished(accepted["status_url"])
    assert (view["done"], view["failed"]) == (16, 0), view
    limited = [r for r in (await world.bw.state())["requests"] if r["status"] == 429]
    assert len(limited) == 6


async def test_a_file_that_cannot_be_read_is_answered_at_once(client: Client) -> None:
    status, body = await client.post("kind,colour\nsite,red\n")
    assert (status, body["error"]["code"]) == (400, "invalid_header")
    status, body = await client.get("/v1/imports/0123456789abcdef")
    assert (status, body["error"]["code"]) == (404, "not_found")


async def test_a_restarted_runner_resumes_the_unfinished_job(world: World, tmp_path: Path) -> None:
    store = FileJobStore(tmp_path / "imports")
    rows, _ = parse_file(onboarding_csv(1, 6, 2).encode(), Format.CSV, max_rows=100)
    info = JobInfo(
        job_id="00000000000000aa", who="t", created_at="x", state=JobState.RUNNING, total=8
    )
    await store.create(info, rows)
    # The customer and its site were done before the "crash".
    await store.record(info.job_id, {2: RowResult(True), 3: RowResult(True)})
    first = ImportRunner(service=world.service, store=store, options=ImportOptions())
    await world.service.apply_batch(first._batch(rows[:2]), who="t")
    runner = ImportRunner(
        service=world.service, store=FileJobStore(tmp_path / "imports"), options=ImportOptions()
    )
    assert await runner.resume() == 1
    await runner.wait(info.job_id)
    resumed = await runner.status(info.job_id)
    assert resumed is not None
    assert (resumed["state"], resumed["done"], resumed["failed"]) == ("completed", 8, 0)
    assert len((await world.customer("cust0")).accounts) == 6


async def test_openapi_documents_the_import_routes(client: Client) -> None:
    async with client.session.get(client.server.make_url("/openapi.json")) as response:
        doc = await response.json()
    assert set(doc["paths"]["/v1/imports"]) == {"post", "get"}
    post = doc["paths"]["/v1/imports"]["post"]
    assert {"text/csv", "application/x-ndjson"} <= set(post["requestBody"]["content"])
    assert "202" in post["responses"]
    assert doc["paths"]["/v1/imports/{import_id}"]["get"]["parameters"][0]["name"] == "import_id"
    assert "ImportJob" in doc["components"]["schemas"]


class FlakyStore(MemoryJobStore):
    """Refuses the first batch's results, as a Redis that drops for a moment would."""

    def __init__(self) -> None:
        super().__init__()
        self.refusals = 1

    async def record(self, job_id: str, results: Any) -> None:
        if self.refusals and results:
            self.refusals -= 1
            raise JobStoreError("redis: connection reset")
        await super().record(job_id, results)


async def test_a_job_that_stops_on_a_store_error_resumes_by_itself(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(imports, "_RESTART_DELAY", 0.01)
    store = FlakyStore()
    runner = ImportRunner(service=world.service, store=store, options=ImportOptions())
    try:
        accepted = await runner.submit(
            onboarding_csv(1, 4, 1).encode(), content_type="text/csv", who="t"
        )
        await runner.wait(accepted["id"])
    finally:
        await runner.close()
    view = await runner.status(accepted["id"])
    assert view is not None and store.refusals == 0
    assert (view["state"], view["done"], view["failed"]) == ("completed", 6, 0)


async def test_a_body_over_the_byte_bound_is_413(world: World) -> None:
    runner = ImportRunner(
        service=world.service, store=MemoryJobStore(), options=ImportOptions(import_max_bytes=64)
    )
    async for client in serve(runner, world):
        status, body = await client.post(onboarding_csv(1, 4, 1))
        assert (status, body["error"]["code"]) == (413, "file_too_large")
        assert await runner.list_jobs() == []


def test_the_import_keys_are_read_from_the_provisioning_section(tmp_path: Path) -> None:
    path = tmp_path / "e911.toml"
    path.write_text(
        "[provisioning]\nimport_concurrency = 3\nimport_batch_size = 50\n"
        "import_retry_delay = 0.5\nimport_retries = 0\n",
        encoding="utf-8",
    )
    options = load(path, {}).provisioning.imports
    assert (options.import_concurrency, options.import_batch_size) == (3, 50)
    assert (options.import_retry_delay, options.import_retries) == (0.5, 0)
    assert options.import_keep_jobs == ImportOptions().import_keep_jobs
    path.write_text("[provisioning]\nimport_concurrency = 0\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"\[provisioning\] import_concurrency"):
        load(path, {})


def test_the_cli_draws_a_bar_on_a_terminal_and_plain_counts_elsewhere() -> None:
    view = {"id": "ab" * 8, "state": "running", "total": 10, "done": 4, "failed": 1, "pending": 5}
    bar = _progress(view, True)
    assert bar.startswith("\r[###############...............] 5/10")
    assert "failed 1" in bar
    plain = _progress(view, False)
    assert plain == f"import {'ab' * 8}: running 5/10 (done 4, failed 1, pending 5)"


async def test_the_cli_imports_over_mutual_tls(
    world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ca = trustme.CA()
    server_pem = issue(ca, tmp_path, "server")
    client_pem = issue(ca, tmp_path, "client", "importer.example")
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(server_pem.cert, server_pem.key)
    server_context.verify_mode = ssl.CERT_REQUIRED
    ca.configure_trust(server_context)
    runner = ImportRunner(service=world.service, store=MemoryJobStore(), options=ImportOptions())
    app = build_provisioning_app(
        world.service, tokens={"s3cret-import-token": "migration"}, imports=runner
    )
    web_runner = web.AppRunner(app)
    await web_runner.setup()
    site = web.TCPSite(web_runner, "127.0.0.1", 0, ssl_context=server_context)
    await site.start()
    port = web_runner.addresses[0][1]
    data = tmp_path / "lines.csv"
    data.write_text(onboarding_csv(1, 4, 1), encoding="utf-8")
    args = argparse.Namespace(
        job=None,
        file=data,
        format=None,
        interval=0.05,
        cafile=write_ca(ca, tmp_path / "ca.pem"),
        cert=client_pem.cert,
        key=client_pem.key,
    )
    try:
        code = await _run_import(args, f"https://127.0.0.1:{port}", "s3cret-import-token")
    finally:
        await runner.close()
        await web_runner.cleanup()
    out = capsys.readouterr().out
    assert code == 0, out
    assert "completed: 6 done, 0 failed of 6" in out
    assert await world.record("1321500003") is not None


async def test_an_import_of_another_media_type_is_refused_before_it_is_read(
    client: Client,
) -> None:
    status, body = await client.post('{"kind": "customer"}', content_type="application/xml")
    assert status == 415
    assert body["error"]["code"] == "unsupported_media_type"
    _, listing = await client.get("/v1/imports")
    assert listing["imports"] == []
