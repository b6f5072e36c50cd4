"""Two provisioning processes on one Redis, and the data schema version, with real processes.

- The Redis lease itself (acquire, busy, renew, release only one's own) against a real
  redis-server.
- ONE redis-server, a Bandwidth emulator process and TWO ``serve --role provisioning``
  processes: merge-PATCHes that each set a distinct field of one customer, one of its sites
  and its accounts, address changes among them, fired concurrently and interleaved over both
  APIs. Afterwards every update is in the stored state, the ``e911:line:*`` records say what
  that state says, and Bandwidth was asked for each distinct address exactly once.
- An edge refuses to start against data whose schema major is newer (exit code and one
  stderr line), and starts on an older minor; provisioning raises the minor.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from e911_sip.provisioning import cascade
from e911_sip.provisioning.lease import LeaseBusy, LeaseOptions, RedisLeases
from e911_sip.provisioning.model import CustomerState
from e911_sip.store.redis import connect
from e911_sip.store.schema import CURRENT, SCHEMA_KEY
from tests.integration.harness import (
    BandwidthEmulator,
    EdgeProcess,
    EdgeStartError,
    RedisServer,
    edge_config_on_free_ports,
    free_port,
    run_cli,
    serve,
    serve_command,
    wait_until,
)
from tests.integration.test_import import (
    api,
    assert_every_line_recorded,
    expected_endpoints,
    kill_midway,
    onboarding_file,
    provisioning_config,
    start_import,
    wait_completed,
)

CID = "acme"
L1, L2, L3, L4 = "9195551001", "9195551002", "9195551003", "9195551004"


# --- the lease on a real Redis ---------------------------------------------------------------


async def test_a_lease_is_exclusive_renewed_and_released_only_by_its_holder(
    redis_server: RedisServer,
) -> None:
    one = connect(redis_server.url, socket_timeout=2.0)
    two = connect(redis_server.url, socket_timeout=2.0)
    options = LeaseOptions(ttl=30.0, wait=0.2, poll=0.01, max_poll=0.05)
    first = RedisLeases(one, prefix="t:", options=options)
    second = RedisLeases(two, prefix="t:", options=options)
    raw = redis_server.client()
    try:
        held = await first.acquire("customer:a")
        assert not held.contended and not held.lost
        assert raw.get("t:lease:customer:a") == held.token
        assert await second.try_acquire("customer:a") is None
        with pytest.raises(LeaseBusy) as busy:
            await second.acquire("customer:a")
        assert busy.value.waited >= 0.2
        # Another name is another lease.
        other = await second.acquire("customer:b")
        assert await second.release(other)

        # Renewal puts the time to live back; a lease whose key is gone (expired) is lost.
        raw.pexpire("t:lease:customer:a", 5000)
        assert await first.renew(held)
        assert raw.pttl("t:lease:customer:a") > 5000
        raw.delete("t:lease:customer:a")
        assert not await first.renew(held)
        assert held.lost

        # Its successor's lease survives the old holder's release.
        successor = await second.acquire("customer:a")
        assert not await first.release(held)
        assert raw.get("t:lease:customer:a") == successor.token
        assert await second.release(successor)
        assert raw.exists("t:lease:customer:a") == 0

        # hold(): released on the way out, also when the block fails.
        with pytest.raises(RuntimeError):
            async with first.hold("customer:c") as lease:
                assert raw.get("t:lease:customer:c") == lease.token
                raise RuntimeError("the change failed")
        assert raw.exists("t:lease:customer:c") == 0
        # A waiter gets the lease as soon as the holder lets go.
        async with first.hold("customer:d"):
            assert await second.try_acquire("customer:d") is None
        waited = await second.acquire("customer:d")
        assert not waited.lost
        await second.release(waited)
    finally:
        await one.aclose()
        await two.aclose()


# --- two provisioning processes -------------------------------------------------------------


def second_config(first: dict[str, Any], api_port: int) -> dict[str, Any]:
    """The first process's configuration on other ports (same Redis, same emulator)."""
    config = json.loads(json.dumps(first))
    config["sip"]["listen"] = [f"{t}:127.0.0.1:{free_port('both')}" for t in ("udp", "tcp")]
    config["http"]["listen"] = f"127.0.0.1:{free_port('tcp')}"
    config["provisioning"]["listen"] = f"127.0.0.1:{api_port}"
    config["notify"] = {"consumer": "notifier-2"}
    return config


class TwoProcesses(NamedTuple):
    first: EdgeProcess
    first_port: int
    second: EdgeProcess
    second_port: int


def start_two(
    tmp_path: Path,
    processes: list[EdgeProcess],
    redis_server: RedisServer,
    emulator: BandwidthEmulator,
) -> TwoProcesses:
    """Two provisioning processes on one Redis and one emulator, each with its API port."""
    first_port, second_port = free_port("tcp"), free_port("tcp")
    config = provisioning_config(redis_server.url, first_port, emulator)
    config["notify"] = {"consumer": "notifier-1"}
    first = serve(tmp_path, processes, config, "provisioning")
    second = serve(tmp_path, processes, second_config(config, second_port), "provisioning")
    return TwoProcesses(first, first_port, second, second_port)


def address(line1: str, city: str = "Cary", postal_code: str = "27513") -> dict[str, str]:
    return {"line1": line1, "city": city, "state": "NC", "postal_code": postal_code}


def address_orders(emulator: BandwidthEmulator) -> int:
    return sum(
        1
        for r in emulator.state()["requests"]
        if r["method"] == "POST" and r["path"].endswith("/addresses") and r["status"] == 201
    )


CHANGES: list[tuple[str, dict[str, Any]]] = [
    # The customer: each PATCH sets another field; two change different address members.
    (f"/v1/customers/{CID}", {"name": "Acme Holdings"}),
    (f"/v1/customers/{CID}", {"callback_number": "9195550001"}),
    (f"/v1/customers/{CID}", {"contacts": {"emails": ["noc@acme.example"]}}),
    (f"/v1/customers/{CID}", {"contacts": {"sms": ["9195550002"]}}),
    (f"/v1/customers/{CID}", {"contacts": {"webhooks": ["https://hooks.acme.example/c"]}}),
    (f"/v1/customers/{CID}", {"address": {"line2": "Suite 200"}}),
    (f"/v1/customers/{CID}", {"address": {"line1": "101 Oak Street"}}),
    # Its site.
    (f"/v1/customers/{CID}/sites/hq", {"name": "Head office"}),
    (f"/v1/customers/{CID}/sites/hq", {"callback_number": "9195550003"}),
    (f"/v1/customers/{CID}/sites/hq", {"contacts": {"emails": ["hq@acme.example"]}}),
    (f"/v1/customers/{CID}/sites/hq", {"contacts": {"sms": ["9195550004"]}}),
    (f"/v1/customers/{CID}/sites/hq", {"address": {"line2": "Suite 300"}}),
    # Its accounts.
    (f"/v1/accounts/{L1}", {"name": "Reception"}),
    (f"/v1/accounts/{L1}", {"callback_number": "9195550005"}),
    (f"/v1/accounts/{L1}", {"contacts": {"emails": ["desk@acme.example"]}}),
    (f"/v1/accounts/{L1}", {"address": {"line2": "Suite 12"}}),
    (f"/v1/accounts/{L2}", {"name": "Lobby"}),
    (f"/v1/accounts/{L2}", {"contacts": {"webhooks": ["https://hooks.acme.example/l2"]}}),
    (f"/v1/accounts/{L3}", {"name": "Warehouse"}),
    (f"/v1/accounts/{L3}", {"callback_number": "9195550006"}),
]
ADDRESS_CHANGES = 4
"""Changes above that each give an entity a new address (so one order each), plus the
new account below."""


def test_concurrent_updates_through_two_processes_all_land_and_order_each_address_once(
    tmp_path: Path,
    processes: list[EdgeProcess],
    redis_server: RedisServer,
    emulator: BandwidthEmulator,
) -> None:
    first, first_port, second, second_port = start_two(tmp_path, processes, redis_server, emulator)

    # The customer with an address, a site with another, a line with its own, a line on the
    # site and one that inherits the customer's.
    for path, body in (
        (f"/v1/customers/{CID}", {"name": "Acme", "address": address("100 Oak Street")}),
        (f"/v1/customers/{CID}/sites/hq", {"name": "HQ", "address": address("200 Elm Street")}),
        (f"/v1/accounts/{L1}", {"customer_id": CID, "address": address("300 Pine Street")}),
        (f"/v1/accounts/{L2}", {"customer_id": CID, "site_id": "hq"}),
        (f"/v1/accounts/{L3}", {"customer_id": CID}),
    ):
        status, answer = api(first_port, "PUT", path, body)
        assert status in (200, 201), answer
    initial_orders = address_orders(emulator)
    assert initial_orders == 3  # customer, site (first used by L2), L1

    # Slow Bandwidth a little so that changes overlap for real.
    emulator.fault({"delay": 0.05, "count": 10_000, "path_prefix": "/api/v2/"})
    work: list[tuple[int, str, str, dict[str, Any]]] = [
        (first_port if i % 2 == 0 else second_port, "PATCH", path, body)
        for i, (path, body) in enumerate(CHANGES)
    ]
    work.insert(
        len(work) // 2,
        (second_port, "PUT", f"/v1/accounts/{L4}", {"customer_id": CID, **_own("400 Birch")}),
    )
    with ThreadPoolExecutor(max_workers=len(work)) as pool:
        results = list(pool.map(lambda w: (w, api(w[0], w[1], w[2], w[3])), work))
    emulator.clear_faults()
    failed = [(w[2], w[3], status, body) for w, (status, body) in results if status >= 300]
    assert failed == [], failed

    # Every update is in the stored state, whichever process applied it.
    raw = redis_server.client()
    text = raw.get(f"e911:prov:customer:{CID}")
    assert text is not None
    state = CustomerState.from_dict(json.loads(text))
    assert state.outbox is None
    customer, site = state.customer, state.sites["hq"]
    assert customer.name == "Acme Holdings" and customer.callback_number == "9195550001"
    assert customer.contacts is not None
    assert customer.contacts.emails == ("noc@acme.example",)
    assert customer.contacts.sms == ("9195550002",)
    assert customer.contacts.webhooks == ("https://hooks.acme.example/c",)
    assert customer.address is not None
    assert (customer.address.line1, customer.address.line2) == ("101 Oak Street", "Suite 200")
    assert site.name == "Head office" and site.callback_number == "9195550003"
    assert site.contacts is not None
    assert (site.contacts.emails, site.contacts.sms) == (("hq@acme.example",), ("9195550004",))
    assert site.address is not None and site.address.line2 == "Suite 300"
    one, two, three = state.accounts[L1], state.accounts[L2], state.accounts[L3]
    assert (one.name, one.callback_number) == ("Reception", "9195550005")
    assert one.contacts is not None and one.contacts.emails == ("desk@acme.example",)
    assert one.address is not None and one.address.line2 == "Suite 12"
    assert two.name == "Lobby" and two.site_id == "hq"
    assert two.contacts is not None and two.contacts.webhooks == ("https://hooks.acme.example/l2",)
    assert (three.name, three.callback_number) == ("Warehouse", "9195550006")
    assert L4 in state.accounts
    # The other process serves the same state.
    for port in (first_port, second_port):
        status, view = api(port, "GET", f"/v1/accounts/{L1}")
        assert status == 200 and view["name"] == "Reception", view

    # The line records say what the state says, and each endpoint at Bandwidth points at
    # the address its entity holds now.
    bandwidth = emulator.state()
    endpoints = {e["id"]: e for e in bandwidth["endpoints"]}
    for number, account in state.accounts.items():
        effective = cascade.effective(state, account)
        assert effective.provider_endpoint is not None, number
        stored = raw.hgetall(f"e911:line:{number}")
        assert stored["provider_endpoint"] == effective.provider_endpoint, number
    entities = [customer, site, *state.accounts.values()]
    held = {e.endpoint.endpoint_id: e for e in entities if e.endpoint is not None}
    assert set(endpoints) == set(held)
    for endpoint_id, entity in held.items():
        assert entity.standardized is not None
        assert endpoints[endpoint_id]["addressId"] == entity.standardized.address_id
    # Each distinct address was ordered exactly once: one order per address a change gave an
    # entity (a second order for any of them would show here), and none is left over.
    assert address_orders(emulator) == initial_orders + ADDRESS_CHANGES + 1
    in_use = {e.standardized.address_id for e in entities if e.standardized is not None}
    assert {a["id"] for a in bandwidth["addresses"]} == in_use

    # Each change took the customer's lease once, in one process or the other.
    taken = sum(
        process.metric("e911_sip_provisioning_leases_total", kind="customer", outcome=outcome)
        or 0.0
        for process in (first, second)
        for outcome in ("free", "waited")
    )
    assert taken >= 5 + len(work)
    for process in (first, second):
        busy = process.metric("e911_sip_provisioning_leases_total", outcome="busy")
        assert busy == 0.0
    waited = sum(
        process.metric("e911_sip_provisioning_leases_total", kind="customer", outcome="waited")
        or 0.0
        for process in (first, second)
    )
    print(f"leases taken {taken:.0f}, of which after waiting for the other process {waited:.0f}")


def _own(line1: str) -> dict[str, Any]:
    return {"address": address(f"{line1} Street")}


def test_an_import_runs_in_one_process_and_the_other_takes_it_over_when_it_dies(
    tmp_path: Path,
    processes: list[EdgeProcess],
    redis_server: RedisServer,
    emulator: BandwidthEmulator,
) -> None:
    first, first_port, second, second_port = start_two(tmp_path, processes, redis_server, emulator)
    path = tmp_path / "lines.csv"
    onboarding_file(path, customers=4, lines=50, own=3)
    # Slow Bandwidth (40 orders, 4 at a time: 10 s at least) so that the second process's
    # first look (every 5 s) and the kill both land with work done and work pending.
    emulator.fault({"delay": 1.0, "count": 1000, "path_prefix": "/api/v2/", "method": "POST"})
    job = start_import(first_port, path)["id"]
    status_path = f"/v1/imports/{job}"

    # The second process finds the job and leaves it to the first, which holds its lease.
    wait_until(
        lambda: "is run by another provisioning process" in second.log_text(),
        "the second process to find the job held by the first",
        timeout=60,
    )
    assert redis_server.client().get(f"e911:prov:lease:import:{job}") is not None
    kill_midway(first, second_port, status_path)
    emulator.clear_faults()

    # Without any restart, the second process takes the job over once the lease expires.
    wait_completed(second_port, status_path, 180, "the job to complete in the second process")
    assert "taken over" in second.log_text()
    assert second.metric("e911_sip_provisioning_leases_total", kind="import_job", outcome="busy")
    endpoints = [e["id"] for e in emulator.state()["endpoints"]]
    assert sorted(endpoints) == sorted(expected_endpoints(4, 50, 3))
    assert_every_line_recorded(redis_server, 4, 50)


# --- the data schema ----------------------------------------------------------------------------


def edge_on(redis_server: RedisServer) -> dict[str, Any]:
    return edge_config_on_free_ports(store_url=redis_server.url)


def test_an_edge_refuses_a_newer_schema_major_and_runs_on_an_older_minor(
    tmp_path: Path,
    redis_server: RedisServer,
    emulator: BandwidthEmulator,
    processes: list[EdgeProcess],
) -> None:
    raw = redis_server.client()
    raw.set(SCHEMA_KEY, f"{CURRENT.major + 1}.0")
    refused = EdgeProcess(tmp_path, edge_on(redis_server), command=serve_command("edge"))
    processes.append(refused)
    with pytest.raises(EdgeStartError):
        refused.start(timeout=30)
    assert refused.returncode == 2
    stderr = refused.log_text()
    line = next(x for x in stderr.splitlines() if x.startswith("e911-sip: "))
    assert line.startswith("e911-sip: configuration error: [store] url: the data is schema 2.0")
    assert "upgrade this host" in line
    assert raw.get(SCHEMA_KEY) == "2.0"  # left alone

    # check-config says the same, and exits 1.
    done = run_cli("check-config", "--config", str(refused.config_path), timeout=60)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "data schema:            REFUSED: [store] url: the data is schema 2.0" in done.stdout

    # An older minor of the same major: the edge runs and leaves the key as it is.
    older = f"{CURRENT.major}.{CURRENT.minor - 1}"
    raw.set(SCHEMA_KEY, older)
    edge = serve(tmp_path, processes, edge_on(redis_server), "edge")
    assert raw.get(SCHEMA_KEY) == older
    assert "data schema" in edge.log_text()

    # Provisioning raises it to this release's minor; an absent key is written the same way.
    port = free_port("tcp")
    serve(
        tmp_path, processes, provisioning_config(redis_server.url, port, emulator), "provisioning"
    )
    assert raw.get(SCHEMA_KEY) == str(CURRENT)
    done = run_cli("check-config", "--config", str(edge.config_path), timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"[store] url {redis_server.url}: schema {CURRENT}" in done.stdout


def test_provisioning_writes_the_schema_where_there_is_none(
    tmp_path: Path,
    redis_server: RedisServer,
    emulator: BandwidthEmulator,
    processes: list[EdgeProcess],
) -> None:
    raw = redis_server.client()
    assert raw.get(SCHEMA_KEY) is None
    port = free_port("tcp")
    serve(
        tmp_path, processes, provisioning_config(redis_server.url, port, emulator), "provisioning"
    )
    assert raw.get(SCHEMA_KEY) == str(CURRENT)
