"""Redis over TLS (``rediss://``) with a private CA: the edge's lookups, its mirror and
provisioning's writes all trust the CA the URL names (``ssl_ca_certs``), against a real
redis-server serving TLS only."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import require_tool
from tests.integration.harness import (
    DEFAULT_CALLER,
    DEFAULT_ENDPOINT,
    EdgeProcess,
    RedisServer,
    Sipp,
    edge_config,
    free_port,
    free_port_pair,
    trunk_uri,
)

EdgeFactory = Callable[..., EdgeProcess]


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[RedisServer]:
    require_tool("redis-server")
    server = RedisServer(tmp_path, tls=True)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.mark.parametrize("mirror", [True, False], ids=["mirror", "direct"])
def test_911_is_enriched_from_redis_over_tls(
    edge_factory: EdgeFactory, sipp: Sipp, tls_redis: RedisServer, mirror: bool
) -> None:
    assert tls_redis.url.startswith("rediss://")
    tls_redis.client().hset(
        f"e911:line:{DEFAULT_CALLER}",
        mapping={"provider_endpoint": DEFAULT_ENDPOINT, "updated_at": "2026-11-01T12:00:00Z"},
    )
    trunk = free_port("udp")
    uas = sipp.uas("uas_emergency.xml", port=trunk, calls=1, timeout=60)
    edge = edge_factory(
        edge_config(
            sip_port=free_port_pair(),
            http_port=free_port("tcp"),
            emergency_trunks=[trunk_uri(trunk)],
            default_trunks=[trunk_uri(free_port("udp"))],
            store_url=tls_redis.url,
            store={"mirror": mirror},
            # Without the mirror each lookup is a round trip over TLS: the default 50 ms bound
            # is for a production host, not for a loaded 2-core test machine, where it made
            # the call go out unenriched (as designed) and the test fail.
            emergency={"lookup_timeout": 1.0},
        )
    )
    if mirror:
        deadline = time.monotonic() + 30
        while (edge.metric("e911_sip_location_records") or 0) < 1:
            assert time.monotonic() < deadline, "the mirror did not load over TLS"
            time.sleep(0.1)
    result = sipp.uac("uac_911.xml", edge.sip_target)
    assert result.ok, result.summary()
    # uas_emergency.xml fails the call unless the INVITE carries this line's location.
    checked = uas.wait(timeout=30)
    assert checked.ok, checked.summary()
    assert edge.metric("e911_sip_emergency_calls_total", outcome="enriched") == 1
