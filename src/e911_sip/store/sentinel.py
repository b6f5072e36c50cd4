"""Redis URLs, and Redis behind Sentinel: one parser and one pool for every Redis user.

Every Redis connection the product makes starts from a URL: ``redis://``, ``rediss://``,
``unix://`` or, for a master watched by Redis Sentinel,

    redis+sentinel://[user:password@]host1:port1,host2:port2,host3:port3/SERVICE[/DB]
        [?sentinel_password=...&min_replicas_ack=N&replica_ack_timeout=SECONDS]

``user:password`` authenticate to the master (the data node); ``sentinel_password`` to the
sentinels (Redis 6 ``requirepass`` on a sentinel). A sentinel's port defaults to 26379.

With the Sentinel form, a connection asks the sentinels for the current master of SERVICE
each time it opens (``SENTINEL MASTERS``, a master in subjective or objective down state is
not taken), so a connection lost with the old master reconnects to the new one without a
restart. A connection still open to a demoted master sees ``READONLY`` on its next write and
is dropped by redis-py (``SentinelManagedConnection``), and the store's health check asks the
sentinels every interval, so a switch is noticed even while no connection breaks. A switch is
logged once per process and counted (:func:`master_changes`, exported as
``e911_sip_store_master_changes_total``).

``min_replicas_ack``: every MULTI/EXEC a client from :func:`connection_pool` runs is followed,
on the same connection, by ``WAIT N ms``; fewer replicas than N confirming within
``replica_ack_timeout`` fails the write with :class:`ReplicationLag` (it is applied on the
master all the same: WAIT cannot undo it). docs/decisions.md says why and what it costs.
"""

from __future__ import annotations

import asyncio
import logging
import math
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import parse_qs, unquote, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline
from redis.asyncio.connection import BlockingConnectionPool, ConnectionPool
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool, SentinelManagedSSLConnection
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

log = logging.getLogger("e911_sip.store.sentinel")

SENTINEL_SCHEME = "redis+sentinel"
TLS_SENTINEL_SCHEME = "rediss+sentinel"
"""Sentinels, master and replicas all spoken to over TLS (the ``ssl_*`` parameters as for
``rediss://``)."""
DEFAULT_SENTINEL_PORT = 26379
_PLAIN_SCHEMES = ("redis", "rediss", "unix")
_SENTINEL_QUERY = frozenset({"sentinel_password", "min_replicas_ack", "replica_ack_timeout"})
TLS_QUERY = frozenset(
    {"ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs", "ssl_check_hostname"}
)
"""The TLS parameters of a Redis URL, as redis-py names them."""


class ReplicationLag(RedisError):
    """A write was applied on the master, but fewer replicas than asked confirmed it in time.

    A RedisError, so every caller that maps Redis failures to its own error maps this one
    too: the write is reported as failed and may be retried (every product write is a whole
    replacement or carries an id, so a retry applies it once more, not twice over)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SentinelUrl:
    """A parsed ``redis+sentinel://`` URL."""

    sentinels: tuple[tuple[str, int], ...]
    """(host, port) of each sentinel, in the order given."""
    service: str
    """The master's name in the sentinels' configuration (``sentinel monitor NAME ...``)."""
    db: int = 0
    """Database number on the master."""
    username: str | None = None
    """ACL user on the master (and its replicas)."""
    password: str | None = None
    """Password on the master."""
    sentinel_password: str | None = None
    """Password on the sentinels (``requirepass`` in sentinel.conf)."""
    min_replicas_ack: int = 0
    """Replicas that must confirm each MULTI/EXEC (``WAIT``); 0: none asked."""
    replica_ack_timeout: float = 0.5
    """Seconds ``WAIT`` may block for those confirmations."""
    tls: tuple[tuple[str, str], ...] | None = None
    """``rediss+sentinel://``: the URL's TLS parameters (:data:`TLS_QUERY`), for the
    sentinels and the master alike; None: plain TCP."""

    def tls_kwargs(self) -> dict[str, Any]:
        """redis-py connection arguments for TLS (empty for plain TCP)."""
        if self.tls is None:
            return {}
        out: dict[str, Any] = {"ssl": True}
        for name, value in self.tls:
            out[name] = value.lower() == "true" if name == "ssl_check_hostname" else value
        return out


def is_sentinel_url(url: str) -> bool:
    """True for the ``redis+sentinel://`` and ``rediss+sentinel://`` forms."""
    return url.startswith((f"{SENTINEL_SCHEME}://", f"{TLS_SENTINEL_SCHEME}://"))


def check_redis_url(url: str) -> None:
    """Raise ValueError, saying what is wrong, unless ``url`` is a Redis URL the product can
    connect to (``redis://``, ``rediss://``, ``unix://`` or ``redis+sentinel://``)."""
    if is_sentinel_url(url):
        parse_sentinel_url(url)
        return
    scheme = url.partition("://")[0]
    if scheme not in _PLAIN_SCHEMES or "://" not in url:
        raise ValueError(
            "expected redis://HOST:PORT/DB, rediss://, unix:///PATH or "
            f"redis+sentinel://HOST:PORT,.../SERVICE, got {url!r}"
        )
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError as exc:
        raise ValueError(f"{exc} in {url!r}") from None
    if scheme == "rediss":
        tls_context(parse_qs(parts.query))


_CERT_REQS = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}


def tls_context(query: Mapping[str, list[str]]) -> ssl.SSLContext:
    """The client TLS context a ``rediss://`` URL asks for, with the query parameters
    redis-py reads (so the lookup connections and every redis-py client agree):
    ``ssl_ca_certs`` (a CA file; default: the system's), ``ssl_certfile`` and
    ``ssl_keyfile`` (a client certificate, for ``tls-auth-clients yes``),
    ``ssl_cert_reqs`` (``required``, the default, ``optional`` or ``none``) and
    ``ssl_check_hostname`` (``true`` by default).

    Raises:
        ValueError: a value is not one of those, or a file cannot be read.
    """

    def one(name: str) -> str | None:
        values = query.get(name)
        return values[-1] if values else None

    reqs = (one("ssl_cert_reqs") or "required").lower()
    if reqs not in _CERT_REQS:
        raise ValueError(f"ssl_cert_reqs: expected none, optional or required, got {reqs!r}")
    check = (one("ssl_check_hostname") or "true").lower()
    if check not in ("true", "false"):
        raise ValueError(f"ssl_check_hostname: expected true or false, got {check!r}")
    try:
        context = ssl.create_default_context(cafile=one("ssl_ca_certs"))
        certfile = one("ssl_certfile")
        if certfile is not None:
            context.load_cert_chain(certfile, one("ssl_keyfile"))
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"the TLS files of the Redis URL: {exc}") from None
    context.check_hostname = check == "true" and reqs != "none"
    context.verify_mode = _CERT_REQS[reqs]
    return context


def parse_sentinel_url(url: str) -> SentinelUrl:
    """The parts of a ``redis+sentinel://`` URL.

    Raises:
        ValueError: the URL is malformed; the message says how, and never holds a password.
    """
    scheme, sep, rest = url.partition("://")
    if scheme not in (SENTINEL_SCHEME, TLS_SENTINEL_SCHEME) or not sep:
        raise ValueError(f"expected {SENTINEL_SCHEME}://HOST:PORT,.../SERVICE")
    tls = scheme == TLS_SENTINEL_SCHEME
    rest, _, query_text = rest.partition("?")
    rest, _, fragment = rest.partition("#")
    if fragment:
        raise ValueError("a sentinel URL has no #fragment")
    netloc, slash, path = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    if not at:
        hosts, userinfo = netloc, ""
    username: str | None = None
    password: str | None = None
    if userinfo:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
        if not colon:
            # redis:// reads a lone userinfo as the password (AUTH password); so do we.
            username, password = None, unquote(user)
    sentinels = tuple(_host_port(part) for part in hosts.split(","))
    segments = path.split("/") if slash else []
    if not segments or not segments[0]:
        raise ValueError("the sentinel URL names no service: .../SERVICE after the hosts")
    if len(segments) > 2:
        raise ValueError("expected .../SERVICE or .../SERVICE/DB after the hosts")
    service = unquote(segments[0])
    db = 0
    if len(segments) == 2:
        if not segments[1].isdigit():
            raise ValueError(f"database must be a number, got {segments[1]!r}")
        db = int(segments[1])
    query = parse_qs(query_text, keep_blank_values=True, strict_parsing=False)
    known = _SENTINEL_QUERY | TLS_QUERY if tls else _SENTINEL_QUERY
    unknown = sorted(set(query) - known)
    if unknown:
        raise ValueError(f"unknown parameter {unknown[0]!r} (known: {', '.join(sorted(known))})")
    tls_params: tuple[tuple[str, str], ...] | None = None
    if tls:
        tls_params = tuple(
            (name, value) for name in sorted(TLS_QUERY) if (value := _single(query, name))
        )
        tls_context({name: [value] for name, value in tls_params})  # raises on a bad one
    acks = _single(query, "min_replicas_ack")
    timeout = _single(query, "replica_ack_timeout")
    min_replicas_ack = 0
    if acks is not None:
        if not acks.isdigit():
            raise ValueError(f"min_replicas_ack must be a whole number >= 0, got {acks!r}")
        min_replicas_ack = int(acks)
    replica_ack_timeout = 0.5
    if timeout is not None:
        try:
            replica_ack_timeout = float(timeout)
        except ValueError:
            replica_ack_timeout = math.nan
        if not (0.001 <= replica_ack_timeout <= 60.0):
            raise ValueError(
                f"replica_ack_timeout must be seconds between 0.001 and 60, got {timeout!r}"
            )
    return SentinelUrl(
        sentinels=sentinels,
        service=service,
        db=db,
        username=username,
        password=password,
        sentinel_password=_single(query, "sentinel_password"),
        min_replicas_ack=min_replicas_ack,
        replica_ack_timeout=replica_ack_timeout,
        tls=tls_params,
    )


def _single(query: dict[str, list[str]], name: str) -> str | None:
    values = query.get(name)
    if values is None:
        return None
    if len(values) != 1:
        raise ValueError(f"parameter {name!r} is given {len(values)} times")
    return values[0]


def _host_port(text: str) -> tuple[str, int]:
    """``host``, ``host:port``, ``[v6]`` or ``[v6]:port`` of one sentinel."""
    if not text:
        raise ValueError("empty sentinel address (expected HOST:PORT,HOST:PORT,...)")
    if text.startswith("["):
        host, bracket, after = text[1:].partition("]")
        if not bracket or not host:
            raise ValueError(f"unterminated IPv6 address in sentinel {text!r}")
        if after and not after.startswith(":"):
            raise ValueError(f"unexpected {after!r} after the IPv6 address {host!r}")
        port_text = after[1:] if after else ""
    else:
        host, colon, port_text = text.partition(":")
        if not host:
            raise ValueError(f"sentinel {text!r} has no host")
        if colon and not port_text:
            raise ValueError(f"sentinel {text!r} has an empty port")
        if ":" in port_text:
            raise ValueError(f"sentinel {text!r}: put an IPv6 address in brackets")
    if not port_text:
        return host, DEFAULT_SENTINEL_PORT
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"sentinel {text!r}: port must be 1-65535")
    return host, int(port_text)


# -- master switches --------------------------------------------------------------------------

_masters: dict[tuple[tuple[tuple[str, int], ...], str], tuple[str, int]] = {}
_changes = 0


def note_master(target: SentinelUrl, address: tuple[str, int]) -> bool:
    """Record the master the sentinels named for ``target``; True (and logged, counted) when
    it differs from the last one any client of this process was given.

    Per process, not per client: every Redis user of a process sees the same failover, and it
    is counted once."""
    global _changes
    key = (target.sentinels, target.service)
    address = (str(address[0]), int(address[1]))
    previous = _masters.get(key)
    _masters[key] = address
    if previous is None or previous == address:
        return False
    _changes += 1
    log.warning(
        "redis master changed",
        extra={
            "service": target.service,
            "old_master": f"{previous[0]}:{previous[1]}",
            "new_master": f"{address[0]}:{address[1]}",
        },
    )
    return True


def master_changes() -> int:
    """Master switches this process has seen (``e911_sip_store_master_changes_total``)."""
    return _changes


# -- redis-py pools ---------------------------------------------------------------------------


def sentinel_manager(target: SentinelUrl, *, socket_timeout: float) -> Sentinel:
    """A redis-py Sentinel client for ``target``'s sentinels: no retries (a sentinel that
    does not answer is skipped for the next), each bounded by ``socket_timeout``."""
    sentinel_kwargs: dict[str, Any] = {
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": socket_timeout,
        "retry": Retry(NoBackoff(), 0),
        "decode_responses": True,
    }
    if target.sentinel_password is not None:
        sentinel_kwargs["password"] = target.sentinel_password
    sentinel_kwargs.update(target.tls_kwargs())
    # redis-py annotates Sentinel's constructor from 8.x on, not before: through a typed
    # name the call checks the same under both, with no ignore that one of them calls unused.
    make: Callable[..., Sentinel] = Sentinel
    return make(list(target.sentinels), sentinel_kwargs=sentinel_kwargs)


class SentinelPool(SentinelConnectionPool):
    """redis-py's Sentinel pool that notes each master it is given and closes its sentinel
    clients with itself."""

    def __init__(self, target: SentinelUrl, manager: Sentinel, **kwargs: Any) -> None:
        self.target = target
        self._discovering = asyncio.Lock()
        super().__init__(target.service, manager, **kwargs)  # type: ignore[no-untyped-call]

    async def get_master_address(self) -> tuple[str, int]:
        # One discovery at a time: redis-py's discover_master moves the sentinel that
        # answered to the front of its list by index, and two at once can drop a sentinel
        # client from the list (its open connection is then never closed).
        async with self._discovering:
            address = await super().get_master_address()  # type: ignore[no-untyped-call]
        note_master(self.target, address)
        return (str(address[0]), int(address[1]))

    async def aclose(self) -> None:
        try:
            await super().aclose()
        finally:
            manager: Sentinel = self.sentinel_manager
            await manager.aclose()


class _BlockingSentinelPool(SentinelPool, BlockingConnectionPool):
    """The Sentinel pool that waits for a free connection, like BlockingConnectionPool."""


def connection_pool(
    url: str, *, blocking: bool = False, **kwargs: Any
) -> ConnectionPool | SentinelPool:
    """A redis-py connection pool for any Redis URL; ``kwargs`` as for
    ``ConnectionPool.from_url`` (and ``max_connections``/``timeout`` when ``blocking``).

    For ``redis+sentinel://`` the pool's connections find the master through the sentinels
    each time they open, and the pool owns (and closes) its sentinel clients.

    Raises:
        ValueError: a malformed URL.
    """
    if not is_sentinel_url(url):
        cls = BlockingConnectionPool if blocking else ConnectionPool
        return cls.from_url(url, **kwargs)
    target = parse_sentinel_url(url)
    timeout = kwargs.get("socket_connect_timeout") or kwargs.get("socket_timeout") or 1.0
    manager = sentinel_manager(target, socket_timeout=float(timeout))
    kwargs["db"] = target.db
    if target.username is not None:
        kwargs["username"] = target.username
    if target.password is not None:
        kwargs["password"] = target.password
    if target.tls is not None:
        kwargs["connection_class"] = SentinelManagedSSLConnection
        kwargs.update(target.tls_kwargs())
        del kwargs["ssl"]  # the connection class is what makes it TLS
    cls_ = _BlockingSentinelPool if blocking else SentinelPool
    return cls_(target, manager, **kwargs)


class _AckedPipeline(Pipeline):
    """A pipeline whose MULTI/EXEC is followed by ``WAIT`` on the same connection."""

    replicas: int = 0
    ack_timeout: float = 0.5

    async def _execute_transaction(
        self, connection: Any, commands: Any, raise_on_error: bool
    ) -> list[Any]:
        # redis-py's hook for MULTI/EXEC on a checked-out connection (5.x to 8.x): the WAIT
        # must go on that connection, which counts only the writes it made itself.
        result: list[Any] = await super()._execute_transaction(connection, commands, raise_on_error)
        await connection.send_command("WAIT", self.replicas, int(self.ack_timeout * 1000))
        extra = connection.socket_timeout or 1.0
        acked = int(await connection.read_response(timeout=self.ack_timeout + extra))
        if acked < self.replicas:
            raise ReplicationLag(
                f"applied on the master, but {acked} of the {self.replicas} replicas asked "
                f"confirmed it within {self.ack_timeout:g} s"
            )
        return result


class AckedRedis(aioredis.Redis):
    """A client whose transactions (``pipeline(transaction=True)``) wait for replicas."""

    replicas: int = 0
    ack_timeout: float = 0.5

    def pipeline(self, transaction: bool = True, shard_hint: Any = None) -> Pipeline:
        pipe = _AckedPipeline(
            self.connection_pool, self.response_callbacks, transaction, shard_hint
        )
        pipe.replicas = self.replicas
        pipe.ack_timeout = self.ack_timeout
        return pipe


def client_from_pool(
    url: str, pool: ConnectionPool, *, replica_acks: bool = True
) -> aioredis.Redis:
    """A client owning ``pool``; one that waits for replicas when the URL asks for it and
    ``replica_acks`` allows."""
    if replica_acks and is_sentinel_url(url):
        target = parse_sentinel_url(url)
        if target.min_replicas_ack > 0:
            client = cast(AckedRedis, AckedRedis.from_pool(pool))
            client.replicas = target.min_replicas_ack
            client.ack_timeout = target.replica_ack_timeout
            return client
    return aioredis.Redis.from_pool(pool)
