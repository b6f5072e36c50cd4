"""The Redis URL forms, redis+sentinel:// above all: parsed in store/sentinel.py, and a
malformed one refused by config.py naming its section and key."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import pytest
import trustme

from e911_sip.config import ConfigError, from_mapping
from e911_sip.store.redis import RedisStore, _Address, _Connection
from e911_sip.store.sentinel import (
    SentinelUrl,
    check_redis_url,
    is_sentinel_url,
    note_master,
    parse_sentinel_url,
    tls_context,
)
from tests.certs import issue, write_ca
from tests.unit.store.transport_double import made_ready


def test_hosts_service_and_db() -> None:
    url = "redis+sentinel://10.0.0.1:26379,10.0.0.2:26380,sentinel-3/e911/2"
    assert parse_sentinel_url(url) == SentinelUrl(
        sentinels=(("10.0.0.1", 26379), ("10.0.0.2", 26380), ("sentinel-3", 26379)),
        service="e911",
        db=2,
    )


def test_credentials_and_parameters() -> None:
    parsed = parse_sentinel_url(
        "redis+sentinel://edge:p%40ss%2Fword@[::1]:26379,[fd00::2]/mymaster"
        "?sentinel_password=s3cret&min_replicas_ack=1&replica_ack_timeout=0.25"
    )
    assert parsed.sentinels == (("::1", 26379), ("fd00::2", 26379))
    assert (parsed.username, parsed.password) == ("edge", "p@ss/word")
    assert parsed.service == "mymaster" and parsed.db == 0
    assert parsed.sentinel_password == "s3cret"
    assert (parsed.min_replicas_ack, parsed.replica_ack_timeout) == (1, 0.25)


def test_a_lone_userinfo_is_the_password_as_in_redis_urls() -> None:
    parsed = parse_sentinel_url("redis+sentinel://:secret@h:1/s")
    assert (parsed.username, parsed.password) == (None, "secret")
    parsed = parse_sentinel_url("redis+sentinel://secret@h:1/s")
    assert (parsed.username, parsed.password) == (None, "secret")


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis+sentinel://h1:1,h2:2", "names no service"),
        ("redis+sentinel://h1:1/", "names no service"),
        ("redis+sentinel://h1:1/svc/x", "database must be a number"),
        ("redis+sentinel://h1:1/svc/0/extra", "SERVICE or .../SERVICE/DB"),
        ("redis+sentinel://h1:1,,h2:2/svc", "empty sentinel address"),
        ("redis+sentinel:///svc", "empty sentinel address"),
        ("redis+sentinel://h1:port/svc", "port must be 1-65535"),
        ("redis+sentinel://h1:70000/svc", "port must be 1-65535"),
        ("redis+sentinel://h1:/svc", "empty port"),
        ("redis+sentinel://:26379/svc", "has no host"),
        ("redis+sentinel://fd00::1:26379/svc", "IPv6 address in brackets"),
        ("redis+sentinel://[::1/svc", "unterminated IPv6"),
        ("redis+sentinel://h1/svc?password=x", "unknown parameter 'password'"),
        ("redis+sentinel://h1/svc?min_replicas_ack=one", "min_replicas_ack must be"),
        ("redis+sentinel://h1/svc?replica_ack_timeout=0", "replica_ack_timeout must be"),
        ("redis+sentinel://h1/svc?replica_ack_timeout=soon", "replica_ack_timeout must be"),
        ("redis+sentinel://h1/svc?min_replicas_ack=1&min_replicas_ack=2", "given 2 times"),
        ("redis+sentinel://h1/svc#frag", "no #fragment"),
    ],
)
def test_malformed_sentinel_urls(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_sentinel_url(url)


def test_an_error_never_shows_the_password() -> None:
    with pytest.raises(ValueError) as caught:
        parse_sentinel_url("redis+sentinel://u:hunter2@h1:x/svc?sentinel_password=hunter3")
    assert "hunter" not in str(caught.value)


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:6379/0",
        "rediss://user:pw@redis.example:6380/1",
        "unix:///run/redis.sock?db=2",
        "redis+sentinel://a:1,b:2,c:3/e911",
        "rediss+sentinel://a:1,b:2,c:3/e911?ssl_cert_reqs=none",
    ],
)
def test_every_supported_form_passes(url: str) -> None:
    check_redis_url(url)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("mysql://x", "expected redis://"),
        ("redis:/x", "expected redis://"),
        ("redis+sentinel://a:1/e911?ssl_ca_certs=/x", "unknown parameter 'ssl_ca_certs'"),
        ("rediss+sentinel://a:1/e911?ssl_cert_reqs=maybe", "ssl_cert_reqs: expected"),
        ("redis://127.0.0.1:port/0", "Port could not be cast"),
    ],
)
def test_other_forms_fail(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_redis_url(url)


def test_is_sentinel_url() -> None:
    assert is_sentinel_url("redis+sentinel://a/b")
    assert not is_sentinel_url("redis://a/0")


def config(**sections: dict[str, Any]) -> Any:
    return from_mapping(sections)


@pytest.mark.parametrize(
    ("sections", "key"),
    [
        ({"store": {"url": "redis+sentinel://a:1,b:2"}}, "[store] url"),
        ({"provisioning": {"state_url": "redis+sentinel://a:x/e911"}}, "[provisioning] state_url"),
        ({"provisioning": {"audit_url": "redis+sentinel:///e911"}}, "[provisioning] audit_url"),
        ({"records": {"store_url": "redis+sentinel://a/e911/db"}}, "[records] store_url"),
    ],
)
def test_config_names_the_key_of_a_malformed_url(sections: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config(**sections)
    assert str(caught.value).startswith(f"{key}: ")


def test_config_takes_sentinel_urls_everywhere() -> None:
    url = "redis+sentinel://10.0.0.1:26379,10.0.0.2:26379,10.0.0.3:26379/e911?min_replicas_ack=1"
    loaded = config(
        store={"url": url},
        provisioning={"state_url": url, "audit_url": url},
        records={"store_url": url},
    )
    assert loaded.store.url == url
    assert loaded.provisioning.state_url == loaded.provisioning.audit_url == url
    assert loaded.records.store_url == url


def test_lookup_connections_ask_for_the_role_behind_sentinel() -> None:
    address = _Address("redis+sentinel://u:pw@a:1/e911/3")
    assert address.sentinel is not None and address.sentinel.service == "e911"
    assert address.setup() == [
        b"*3\r\n$4\r\nAUTH\r\n$1\r\nu\r\n$2\r\npw\r\n",
        b"*2\r\n$6\r\nSELECT\r\n$1\r\n3\r\n",
        b"*1\r\n$4\r\nROLE\r\n",
    ]
    assert _Address("redis://a:1/0").setup() == []


def test_a_master_switch_is_counted_once_per_process() -> None:
    target = parse_sentinel_url("redis+sentinel://unit-test-a:1/switch-count")
    assert note_master(target, ("10.0.0.1", 6379)) is False  # the first one is no switch
    assert note_master(target, ("10.0.0.1", 6379)) is False  # another client, same master
    assert note_master(target, ("10.0.0.2", 6379)) is True
    assert note_master(target, ("10.0.0.2", 6379)) is False


async def test_connections_to_an_old_master_are_retired_once_they_have_answered() -> None:
    store = RedisStore(url="redis+sentinel://127.0.0.1:1/e911", pool_size=3)
    connections = []
    transports = []
    for address in (("10.0.0.1", 6379), ("10.0.0.1", 6379), ("10.0.0.2", 6379)):
        connection = _Connection(store, silence=60.0)
        transports.append(made_ready(connection, address))
        connections.append(connection)
    store._slots = list(connections)
    idle, busy, current = connections
    reply = asyncio.get_running_loop().create_future()
    busy.send(b"*1\r\n$4\r\nPING\r\n", reply)

    store._retire(("10.0.0.2", 6379))

    assert transports[0].aborted and store._slots[0] is None  # idle: closed at once
    assert busy.retired and not transports[1].aborted  # busy: finishes what it carries
    assert store._pick() is current  # and takes nothing new
    busy.data_received(b"+PONG\r\n")
    assert reply.result() == b"PONG"
    assert transports[1].aborted and store._slots[1] is None
    assert not transports[2].aborted and store._slots[2] is current
    store._closed = True
    await store._client.aclose()


def test_a_tls_url_names_its_ca_client_certificate_and_checks(tmp_path: Path) -> None:
    ca = trustme.CA()
    ca_file = write_ca(ca, tmp_path / "ca.pem")
    client = issue(ca, tmp_path, "client")
    context = tls_context(
        parse_qs(f"ssl_ca_certs={ca_file}&ssl_certfile={client.cert}&ssl_keyfile={client.key}")
    )
    assert (context.verify_mode, context.check_hostname) == (ssl.CERT_REQUIRED, True)
    assert len(context.get_ca_certs()) == 1  # the URL's CA, not the system's
    relaxed = tls_context(parse_qs("ssl_cert_reqs=none"))
    assert (relaxed.verify_mode, relaxed.check_hostname) == (ssl.CERT_NONE, False)
    named = tls_context(parse_qs(f"ssl_ca_certs={ca_file}&ssl_check_hostname=false"))
    assert (named.verify_mode, named.check_hostname) == (ssl.CERT_REQUIRED, False)
    check_redis_url(f"rediss://10.0.0.5:6380/0?ssl_ca_certs={ca_file}")


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("ssl_cert_reqs=maybe", "ssl_cert_reqs: expected none, optional or required"),
        ("ssl_check_hostname=yes", "ssl_check_hostname: expected true or false"),
        ("ssl_ca_certs=/nonexistent/ca.pem", "the TLS files of the Redis URL"),
    ],
)
def test_bad_tls_parameters_are_config_errors(query: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_redis_url(f"rediss://10.0.0.5:6380/0?{query}")


def test_a_tls_sentinel_url_carries_its_tls_parameters_to_every_connection(
    tmp_path: Path,
) -> None:
    ca_file = write_ca(trustme.CA(), tmp_path / "ca.pem")
    url = f"rediss+sentinel://a:1,b:2/e911/1?ssl_ca_certs={ca_file}&ssl_check_hostname=false"
    assert is_sentinel_url(url)
    target = parse_sentinel_url(url)
    assert (target.service, target.db) == ("e911", 1)
    assert target.tls_kwargs() == {
        "ssl": True,
        "ssl_ca_certs": str(ca_file),
        "ssl_check_hostname": False,
    }
    assert parse_sentinel_url("redis+sentinel://a:1/e911").tls_kwargs() == {}
    # The edge's own lookup connections to the master speak TLS with the same trust.
    address = _Address(url)
    assert address.tls is not None and address.tls.check_hostname is False
    assert len(address.tls.get_ca_certs()) == 1
