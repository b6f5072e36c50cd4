"""Redis behind Sentinel: a real master, two replicas and three sentinels on loopback.

The master is SIGKILLed while the clients are busy; Sentinel promotes a replica and every
client follows it without a restart: the lookup connections of ``RedisStore``, the mirror's
tracking connection (which then reloads everything), and the redis-py clients of
provisioning. Writes made with ``min_replicas_ack=1`` are acknowledged only once a replica
holds them, so every one acknowledged before the kill is found on the new master.

Two replicas, not one: with ``min_replicas_ack=1`` a write after the failover needs a replica
of the new master, and the second replica becomes one (Sentinel re-points it) without the
test restarting anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import redis
import trustme

from e911_sip.batching import WriteError
from e911_sip.store.base import LocationRecord, StoreError
from e911_sip.store.mirror import MirroredRedisStore, MirrorOptions
from e911_sip.store.redis import RedisStore, connect
from e911_sip.store.sentinel import ReplicationLag, master_changes
from tests.certs import write_ca
from tests.integration.conftest import require_tool
from tests.integration.harness import (
    LOOPBACK,
    EdgeProcess,
    HarnessError,
    RedisServer,
    Sipp,
    api,
    call_and_check,
    edge_config_on_free_ports,
    free_port,
    serve_command,
)
from tests.integration.test_end_to_end import provisioning_tables
from tests.integration.test_resp import opened_writer

T = TypeVar("T")

SERVICE = "e911"
BOUND = 30.0
"""Seconds any wait in these tests may take at most (failover is ~2-4 s on loopback)."""


class Replica(RedisServer):
    """A redis-server that starts as a replica of ``master_port``."""

    def __init__(self, workdir: Path, master_port: int, tls: trustme.CA | None = None) -> None:
        super().__init__(workdir, tls=tls or False)
        self.master_port = master_port

    def _write_config(self) -> None:
        super()._write_config()
        with self.config_path.open("a", encoding="utf-8") as config:
            config.write(f"replicaof {LOOPBACK} {self.master_port}\n")


class SentinelProcess(RedisServer):
    """``redis-server sentinel.conf --sentinel`` in its own directory, stopped by PID."""

    kind = "sentinel"

    def __init__(self, workdir: Path, master_port: int, tls: trustme.CA | None = None) -> None:
        super().__init__(workdir, tls=tls or False)
        self.master_port = master_port

    def _write_config(self) -> None:
        # Sentinel rewrites its file as it learns: it must be its own and writable.
        # With TLS, to clients and to the master and replicas it watches.
        self.config_path.write_text(
            "\n".join(
                [
                    f"bind {LOOPBACK}",
                    *self._listen_lines(),
                    "daemonize no",
                    f'dir "{self.dir}"',
                    f'logfile "{self.log_path}"',
                    f"sentinel monitor {SERVICE} {LOOPBACK} {self.master_port} 2",
                    f"sentinel down-after-milliseconds {SERVICE} 1000",
                    f"sentinel failover-timeout {SERVICE} 3000",
                    f"sentinel parallel-syncs {SERVICE} 2",
                    "",
                ]
            ),
            encoding="utf-8",
        )

    def _command(self, binary: str) -> list[str]:
        return [*super()._command(binary), "--sentinel"]

    def client(self) -> redis.Redis:
        """A client of its own (closed by the caller, not by ``stop()``)."""
        tls: dict[str, Any] = (
            {"ssl": True, "ssl_ca_certs": str(self.ca_file)} if self.ca_file is not None else {}
        )
        return redis.Redis(
            host=LOOPBACK, port=self.port, decode_responses=True, socket_timeout=2.0, **tls
        )

    def master(self) -> dict[str, Any]:
        with self.client() as client:
            state: dict[str, Any] = client.sentinel_master(SERVICE)
            return state


class SentinelCluster:
    """A master, two replicas of it and three sentinels watching it as ``e911``."""

    def __init__(self, workdir: Path, *, tls: bool = False) -> None:
        self.workdir = workdir
        self.ca = trustme.CA() if tls else None
        """With ``tls``, the CA of every server and sentinel, which serve TLS only."""
        self.ca_file = write_ca(self.ca, workdir / "cluster-ca.pem") if self.ca else None
        self.master = RedisServer(workdir / "master", tls=self.ca or False)
        self.replicas: list[Replica] = []
        self.sentinels: list[SentinelProcess] = []
        self._clients: dict[int, redis.Redis] = {}

    def client(self, server: RedisServer) -> redis.Redis:
        """One client per server for all the polling (closed when the server stops)."""
        if server.port not in self._clients:
            self._clients[server.port] = server.client()
        return self._clients[server.port]

    def start(self) -> None:
        self.master.start()
        self.replicas = [
            Replica(self.workdir / f"replica{i}", self.master.port, self.ca) for i in (1, 2)
        ]
        for replica in self.replicas:
            replica.start()
        self.sentinels = [
            SentinelProcess(self.workdir, self.master.port, self.ca) for _ in range(3)
        ]
        for sentinel in self.sentinels:
            sentinel.start()
        # A failover needs a majority of sentinels that know each other (hello messages
        # every 2 s) and replicas they have seen; wait for both, bounded.
        self.wait_for(
            lambda: all(
                int(s.master()["num-other-sentinels"]) == 2 and int(s.master()["num-slaves"]) == 2
                for s in self.sentinels
            ),
            "three sentinels that see each other and both replicas",
        )
        self.wait_for(
            lambda: all(
                self.client(r).info("replication").get("master_link_status") == "up"
                for r in self.replicas
            ),
            "both replicas in sync",
        )

    def url(self, db: int = 0, **query: str) -> str:
        hosts = ",".join(f"{LOOPBACK}:{s.port}" for s in self.sentinels)
        scheme = "redis+sentinel"
        if self.ca_file is not None:
            scheme = "rediss+sentinel"
            query = {**query, "ssl_ca_certs": str(self.ca_file)}
        text = "&".join(f"{k}={v}" for k, v in query.items())
        return f"{scheme}://{hosts}/{SERVICE}/{db}" + (f"?{text}" if text else "")

    def master_port(self) -> int:
        """The master's port as the first sentinel that answers names it."""
        for sentinel in self.sentinels:
            with contextlib.suppress(redis.RedisError, OSError), sentinel.client() as client:
                address = client.sentinel_get_master_addr_by_name(SERVICE)
                if address:
                    return int(address[1])
        raise HarnessError("no sentinel named a master")

    def server(self, port: int) -> RedisServer:
        for server in (self.master, *self.replicas):
            if server.port == port:
                return server
        raise HarnessError(f"no redis-server of the cluster on port {port}")

    def kill_master(self) -> int:
        """SIGKILL the current master; returns its port."""
        port = self.master_port()
        self.server(port).kill()
        return port

    def wait_for_new_master(self, old_port: int) -> RedisServer:
        """The promoted replica, once it says it is master and has a replica in sync."""
        found: list[RedisServer] = []

        def promoted() -> bool:
            with contextlib.suppress(redis.RedisError, OSError, HarnessError):
                port = self.master_port()
                if port == old_port:
                    return False
                server = self.server(port)
                info = self.client(server).info("replication")
                if info.get("role") == "master" and int(info.get("connected_slaves", 0)) >= 1:
                    found[:] = [server]
                    return True
            return False

        self.wait_for(promoted, "a promoted replica with a replica of its own")
        return found[0]

    def wait_for(self, condition: Callable[[], bool], what: str, timeout: float = BOUND) -> None:
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(redis.RedisError, OSError, KeyError):
                if condition():
                    return
            if time.monotonic() > deadline:
                logs = "\n".join(
                    s.log_path.read_text(errors="replace")[-1500:] for s in self.sentinels
                )
                raise HarnessError(f"no {what} within {timeout} s\n{logs}")
            time.sleep(0.05)

    def stop(self) -> None:
        for sentinel in self.sentinels:
            sentinel.stop()
        for server in (*self.replicas, self.master):
            server.stop()


@pytest.fixture
def cluster(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[SentinelCluster]:
    """The cluster; ``@pytest.mark.parametrize("cluster", [...], indirect=True)`` with True
    makes it speak TLS only."""
    require_tool("redis-server")
    cluster = SentinelCluster(tmp_path, tls=bool(getattr(request, "param", False)))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


async def until(condition: Callable[[], bool], what: str, timeout: float = BOUND) -> None:
    """Wait (in the event loop, so the clients under test keep running) for ``condition``."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout} s")
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def store_and_mirror(url: str) -> AsyncIterator[tuple[RedisStore, MirroredRedisStore]]:
    """The edge's two ways to the store on ``url``: direct lookups, and the mirror, which
    follows the store in a task until the block ends."""
    direct = RedisStore(url=url, pool_size=2)
    mirror = MirroredRedisStore(
        url=url, direct=RedisStore(url=url, pool_size=2), options=MirrorOptions()
    )
    stop = asyncio.Event()
    follower = asyncio.create_task(mirror.run(stop))
    try:
        yield direct, mirror
    finally:
        stop.set()
        await follower
        await mirror.close()
        await direct.close()


async def retried(step: Callable[[], Awaitable[T]]) -> T:
    """``step()``, tried again every 0.1 s while it raises StoreError, for at most BOUND."""
    deadline = time.monotonic() + BOUND
    while True:
        try:
            return await step()
        except StoreError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


def record(i: int) -> LocationRecord:
    return LocationRecord(f"555555/sentinel{i:05d}", None)


def line(i: int) -> str:
    return f"321{4000000 + i:07d}"


@pytest.mark.parametrize("cluster", [False, True], ids=["tcp", "tls"], indirect=True)
async def test_store_mirror_and_writes_follow_a_failover(cluster: SentinelCluster) -> None:
    url = cluster.url(min_replicas_ack="1", replica_ack_timeout="2")
    changes_before = master_changes()
    async with store_and_mirror(url) as (direct, mirror):
        await direct.put_records({line(i): record(i) for i in range(50)})
        await until(lambda: mirror.state().in_sync, "mirror in sync")
        assert await direct.lookup(line(7)) == record(7)
        await until(lambda: mirror.lookup_now(line(49)) == record(49), "mirror has the records")

        # Writes keep going until the kill; each one returned was confirmed by a replica.
        acknowledged: list[int] = []
        killed = threading.Event()

        async def writer() -> None:
            i = 50
            while not killed.is_set():
                try:
                    await direct.put_records({line(i): record(i)})
                except StoreError:
                    return  # the kill: this one is not acknowledged
                if not killed.is_set():
                    acknowledged.append(i)
                i += 1

        writing = asyncio.create_task(writer())
        await until(lambda: len(acknowledged) >= 20, "writes before the kill")
        old_port = await asyncio.to_thread(cluster.kill_master)
        killed.set()
        await writing

        # The mirror serves from memory all through the failover.
        assert mirror.lookup_now(line(3)) == record(3)
        new_master = await asyncio.to_thread(cluster.wait_for_new_master, old_port)
        on_new = new_master.client()
        missing = [i for i in acknowledged if not on_new.exists(f"e911:line:{line(i)}")]
        assert missing == [], f"acknowledged writes lost in the failover: {missing}"

        # Lookups reconnect to the new master (bounded retries: the sentinels may take a
        # moment to stop naming the dead one in every answer).
        last = acknowledged[-1]
        assert await retried(lambda: direct.lookup(line(last))) == record(last)

        # A write after the failover, on the new master, reaches the mirror.
        await retried(lambda: direct.put_records({line(3): record(9999)}))
        await until(lambda: mirror.lookup_now(line(3)) == record(9999), "the new write mirrored")
        assert on_new.hget(f"e911:line:{line(3)}", "provider_endpoint") == "555555/sentinel09999"
        assert master_changes() > changes_before
        assert await direct.ping()


async def test_a_planned_switch_is_followed_while_the_old_master_lives_on(
    cluster: SentinelCluster,
) -> None:
    # SENTINEL FAILOVER: the old master stays up and becomes a replica (read-only, and still
    # answering lookups with what it has), so nothing breaks by itself the way a crash does.
    url = cluster.url()
    changes_before = master_changes()
    async with store_and_mirror(url) as (direct, mirror):
        await direct.put_records({line(1): record(1)})
        assert await direct.lookup(line(1)) == record(1)
        await until(lambda: mirror.state().in_sync, "mirror in sync")
        new_master = await planned_switch(cluster)

        await retried(lambda: direct.put_records({line(1): record(2)}))
        assert new_master.client().hget(f"e911:line:{line(1)}", "provider_endpoint") == (
            "555555/sentinel00002"
        )
        await until(lambda: mirror.lookup_now(line(1)) == record(2), "the write mirrored")
        assert await direct.ping()
        assert master_changes() > changes_before
        assert await direct.lookup(line(1)) == record(2)

        # With every sentinel gone the master still answers on the open connections: the
        # store is not reported down for it.
        for sentinel in cluster.sentinels:
            await asyncio.to_thread(sentinel.stop)
        assert await direct.ping()
        assert await direct.lookup(line(1)) == record(2)


@pytest.mark.parametrize("batch", [["c"], ["c", "d"]], ids=["xadd", "script"])
async def test_the_stream_writer_follows_a_planned_switch(
    cluster: SentinelCluster, batch: list[str]
) -> None:
    # The old master lives on as a replica: the writer's connection to it is closed by the
    # sentinels' reconfiguration (or, were it not, answers READONLY and is retired), and a
    # write after that goes to the master the sentinels name.
    async with opened_writer(cluster.url()) as writer:
        await writer.xadd_all("w:calls", "record", ["a", "b"])
        new_master = await planned_switch(cluster)
        deadline = time.monotonic() + BOUND
        while True:
            try:
                await writer.xadd_all("w:calls", "record", batch)
                break
            except WriteError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)
        written = [fields["record"] for _id, fields in new_master.client().xrange("w:calls")]
        assert written == ["a", "b", *batch]


async def planned_switch(cluster: SentinelCluster) -> RedisServer:
    """``SENTINEL FAILOVER`` and its end: the old master demoted to a replica, where it lives
    on; the new master."""
    old_port = cluster.master_port()
    with cluster.sentinels[0].client() as client:
        assert client.execute_command("SENTINEL", "FAILOVER", SERVICE)
    new_master = await asyncio.to_thread(cluster.wait_for_new_master, old_port)
    old = cluster.server(old_port)
    await asyncio.to_thread(
        cluster.wait_for,
        lambda: cluster.client(old).info("replication").get("role") == "slave",
        "the old master demoted",
    )
    return new_master


async def test_a_write_no_replica_confirms_is_reported_failed(cluster: SentinelCluster) -> None:
    # Three replicas asked, two exist: the write is applied but never acknowledged. On a busy
    # host a replica may also miss the 0.2 s window, so fewer than two may have confirmed.
    client = connect(cluster.url(min_replicas_ack="3", replica_ack_timeout="0.2"), socket_timeout=2)
    try:
        with pytest.raises(ReplicationLag, match="[0-2] of the 3 replicas"):
            async with client.pipeline(transaction=True) as pipe:
                pipe.set("e911:test:acked", "1")
                await pipe.execute()
        assert await client.get("e911:test:acked") == "1"
    finally:
        await client.aclose()


# -- the edge ---------------------------------------------------------------------------------

ADDRESS_A = {
    "line1": "900 Main Campus Drive",
    "city": "Raleigh",
    "state": "NC",
    "postal_code": "27606",
    "country": "US",
}
ADDRESS_B = {
    "line1": "1 Fayetteville Street",
    "city": "Raleigh",
    "state": "NC",
    "postal_code": "27601",
    "country": "US",
}


def test_911_calls_keep_their_location_through_a_failover(
    tmp_path: Path, cluster: SentinelCluster, sipp: Sipp, edge_factory: Callable[..., EdgeProcess]
) -> None:
    url = cluster.url(min_replicas_ack="1", replica_ack_timeout="2")
    api_port, emulator_port, trunk = free_port("tcp"), free_port("tcp"), free_port("udp")
    config = edge_config_on_free_ports(
        trunk=trunk,
        store_url=url,
        **provisioning_tables(api_port, emulator_port, state_url=url, audit_url=url),
    )
    edge = edge_factory(config, timeout=30, command=serve_command("all"))

    caller = "1321551234"
    status, body = api(
        api_port, "PUT", "/v1/customers/campus", {"name": "campus", "address": ADDRESS_A}
    )
    assert status == 201, body
    status, account = api(api_port, "PUT", f"/v1/accounts/{caller}", {"customer_id": "campus"})
    assert status == 201, account
    endpoint_a = account["effective"]["provider_endpoint"]

    # Provisioning writes until the kill, from another thread: each one answered 2xx before
    # the kill must be on the new master.
    acknowledged: list[str] = []
    killed = threading.Event()

    def provision() -> None:
        i = 0
        while not killed.is_set():
            number = f"32155{i:05d}"
            try:
                status, _ = api(
                    api_port, "PUT", f"/v1/accounts/{number}", {"customer_id": "campus"}
                )
            except OSError:
                return
            if status in (200, 201) and not killed.is_set():
                acknowledged.append(number)
            i += 1

    writer = threading.Thread(target=provision, daemon=True)
    writer.start()

    calls = 60
    uas = sipp.uas(
        "uas_emergency.xml",
        port=trunk,
        calls=calls,
        keys={"expected_endpoint": endpoint_a, "expected_callback": caller},
    )
    uac = sipp.start_uac(
        "uac_911.xml", edge.sip_target, keys={"caller": caller}, calls=calls, rate=10
    )
    edge.wait_metric(
        "e911_sip_emergency_calls_total",
        lambda v: v >= 10,
        "calls before the kill",
        outcome="enriched",
    )
    assert len(acknowledged) >= 1, "no provisioning write was acknowledged before the kill"
    old_port = cluster.kill_master()
    killed.set()
    writer.join(timeout=BOUND)
    new_master = cluster.wait_for_new_master(old_port)

    # Every call, during the failover too, left with the caller's location.
    caller_result = uac.wait(timeout=BOUND + 30)
    assert caller_result.ok, caller_result.summary()
    trunk_result = uas.wait(timeout=BOUND)
    assert trunk_result.ok, trunk_result.summary()
    # ... and each was counted once, enriched: none cached, none without a location.
    assert edge.metric("e911_sip_emergency_calls_total", outcome="enriched") == calls
    assert edge.metric("e911_sip_emergency_calls_total") == calls

    on_new = new_master.client()
    missing = [
        n for n in acknowledged if on_new.hget(f"e911:line:{n}", "provider_endpoint") != endpoint_a
    ]
    assert missing == [], f"acknowledged writes lost in the failover: {missing}"
    # The provisioning state too, as the service reads it back (from the new master).
    unknown = [n for n in acknowledged if api(api_port, "GET", f"/v1/accounts/{n}")[0] != 200]
    assert unknown == [], f"acknowledged accounts lost in the failover: {unknown}"

    # The edge noticed the switch and its mirror follows the new master again.
    edge.wait_metric("e911_sip_store_master_changes_total", lambda v: v >= 1, "master switch")
    edge.wait_metric("e911_sip_location_sync_age_seconds", lambda v: v == 0, "mirror in sync")
    updates = edge.metric("e911_sip_location_updates_total") or 0.0

    # A provisioning write after the failover reaches the edge: the caller gets an address
    # (and an endpoint) of its own. Retried while the second replica is not yet re-pointed
    # at the new master: until then no replica can confirm the write.
    deadline = time.monotonic() + BOUND
    while True:
        status, account = api(
            api_port,
            "PUT",
            f"/v1/accounts/{caller}",
            {"customer_id": "campus", "address": ADDRESS_B},
        )
        if status in (200, 201) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert status in (200, 201), account
    assert account["effective"]["level"] == "account"
    endpoint_b = account["effective"]["provider_endpoint"]
    assert endpoint_b != endpoint_a
    assert on_new.hget(f"e911:line:{caller}", "provider_endpoint") == endpoint_b
    # Counted as the re-read is sent; it is answered (one loopback round trip) long before
    # the SIPp processes below have started and sent the INVITE.
    edge.wait_metric(
        "e911_sip_location_updates_total", lambda v: v > updates, "the change mirrored"
    )
    call_and_check(sipp, edge, trunk, caller, endpoint_b)
    assert "redis master changed" in edge.log_text()
