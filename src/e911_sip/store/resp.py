"""Pipelined RESP connections to Redis, for the commands the edge sends on every call.

Hand-written, not redis-py: its asyncio client spends a few hundred microseconds of CPU per
command (a task for every socket-timeout wait on Python 3.11, a pool checkout with its own
timeout, packing and parsing in Python), and the edge sends a lookup and, for an emergency
call, two stream writes per call. Here a command is packed once into one ``bytes``, written
at once on the connection of a pool with the fewest replies outstanding, and resolved by its
reply in the turn of the loop that reads it; hiredis (C) parses the replies. A burst shares
a few connections and costs no pool checkout and no extra turn of the event loop per
command (see docs/decisions.md).

:class:`RespPool` connects to every URL form the product takes (``redis://``,
``rediss://``, ``unix://``, ``redis+sentinel://`` with the master found through the
sentinels and checked with ``ROLE``), sending ``AUTH`` and ``SELECT`` on each new
connection. A command that finds no connection able to take it (all opening, or
:data:`MAX_IN_FLIGHT` outstanding on each) waits for one within its own bound. Failures are
the store's errors: :class:`ReplyError` for an error reply (the command reached Redis),
:class:`~e911_sip.store.base.StoreUnreachable` for a connection that could not open or
broke, :class:`~e911_sip.store.base.StoreTimeout` and
:class:`~e911_sip.store.base.PoolExhausted` for a command out of time.

:class:`RespStreamWriter` writes batches of stream entries through a pool (the
:class:`~e911_sip.batching.StreamWriter` of the call records and the notification events).
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from collections.abc import Awaitable, Iterable, Sequence
from typing import Any, cast
from urllib.parse import parse_qs, unquote, urlsplit

import hiredis
from redis.exceptions import RedisError

from e911_sip.batching import StoredScript, WriteError, write_batch
from e911_sip.store.base import (
    PoolExhausted,
    StoreError,
    StoreTimeout,
    StoreUnreachable,
)
from e911_sip.store.sentinel import (
    SentinelPool,
    SentinelUrl,
    connection_pool,
    is_sentinel_url,
    parse_sentinel_url,
    tls_context,
)

MAX_IN_FLIGHT = 256
"""Commands outstanding on one connection at most; beyond that a command waits for room."""

Arg = str | bytes | int
"""A command argument: text is sent as UTF-8, an int as its decimal digits."""


class ReplyError(StoreError):
    """Redis answered the command with an error reply (``-ERR ...``, ``-NOSCRIPT ...``): it
    reached the server, and the connection is fine."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text
        """The reply as Redis wrote it, its code first (``NOSCRIPT No matching script``)."""

    @property
    def code(self) -> str:
        """The error's code: the reply's first word (``ERR``, ``NOSCRIPT``, ``WRONGTYPE``)."""
        return self.text.partition(" ")[0]


class _Pending:
    """One command waiting for its reply."""

    __slots__ = ("command", "future", "sent", "timer")

    def __init__(self, command: bytes, future: asyncio.Future[Any]) -> None:
        self.command = command
        self.future = future
        self.sent = False
        self.timer: asyncio.TimerHandle | None = None


class Address:
    """Where and how a pool's connections connect, read from its URL.

    With ``redis+sentinel://``, ``host``/``port`` are the master's as the sentinels last named
    it (:meth:`RespPool.master`), and ``setup`` ends with ``ROLE`` so a connection opened to an
    instance that is no longer the master is refused before it carries a command."""

    def __init__(self, url: str) -> None:
        self.unix_path: str | None = None
        self.tls: ssl.SSLContext | None = None
        self.sentinel: SentinelUrl | None = None
        if is_sentinel_url(url):
            self.sentinel = parse_sentinel_url(url)
            self.host, self.port = "", 0
            self.db = self.sentinel.db
            self.username = self.sentinel.username
            self.password = self.sentinel.password
            if self.sentinel.tls is not None:
                self.tls = tls_context({name: [value] for name, value in self.sentinel.tls})
            return
        parts = urlsplit(url)
        query = parse_qs(parts.query)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 6379
        if parts.scheme == "unix":
            self.unix_path = parts.path
            db = query.get("db", ["0"])[0]
        else:
            db = parts.path.lstrip("/") or query.get("db", ["0"])[0]
            if parts.scheme == "rediss":
                self.tls = tls_context(query)
        self.db = int(db or 0)
        self.username = unquote(parts.username) if parts.username else None
        self.password = unquote(parts.password) if parts.password else None

    def setup(self) -> list[bytes]:
        """The commands a new connection sends before its first command."""
        commands: list[bytes] = []
        if self.password is not None:
            auth = ("AUTH", self.username, self.password) if self.username else None
            commands.append(pack(*(auth or ("AUTH", self.password))))
        if self.db:
            commands.append(pack("SELECT", str(self.db)))
        if self.sentinel is not None:
            commands.append(pack("ROLE"))
        return commands


def pack(*args: Arg | None) -> bytes:
    """A command in RESP (an array of bulk strings); None arguments are left out."""
    out = []
    for arg in args:
        if arg is None:
            continue
        item = (
            arg.encode() if isinstance(arg, str) else b"%d" % arg if isinstance(arg, int) else arg
        )
        out.append(b"$%d\r\n%b\r\n" % (len(item), item))
    return b"*%d\r\n%b" % (len(out), b"".join(out))


class Connection(asyncio.Protocol):
    """One connection of a pool: commands written as they come, replies matched in order.

    Replies resolve their futures as they are parsed, error replies included (as
    ``hiredis.ReplyError`` values: the pool turns them into :class:`ReplyError`). A
    connection that stays silent for ``silence`` seconds while replies are outstanding is
    closed, and what it carried fails. Behind Sentinel a ``READONLY`` reply (a write to a
    master that was demoted and stayed up) retires the connection, as redis-py's Sentinel
    connections are dropped on one.
    """

    def __init__(self, owner: RespPool, *, silence: float) -> None:
        self._owner = owner
        self._silence = silence
        self._reader = hiredis.Reader()
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._last_data = 0.0
        self.waiting: deque[asyncio.Future[Any]] = deque()
        self.ready = False
        self.closed = False
        self.address: tuple[str, int] | None = None
        """The master it was opened to (Sentinel only)."""
        self.retired = False
        """Opened to a master that is no longer one: takes no new commands, closes once the
        ones it carries are answered."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)

    def send(self, command: bytes, future: asyncio.Future[Any]) -> None:
        if self._transport is None:
            raise StoreUnreachable("redis connection used before it opened")
        self._transport.write(command)
        self.waiting.append(future)
        if self._timer is None:
            loop = asyncio.get_running_loop()
            self._last_data = loop.time()
            self._timer = loop.call_at(self._last_data + self._silence, self._check_silence)

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        self._last_data = asyncio.get_running_loop().time()
        while True:
            try:
                reply = self._reader.gets()
            except hiredis.ProtocolError as exc:
                self.abort(f"redis protocol error: {exc}")
                return
            if reply is False:
                break
            if not self.waiting:
                self.abort("redis sent a reply nobody asked for")
                return
            future = self.waiting.popleft()
            if not future.done():  # else timed out or cancelled: the reply is dropped
                future.set_result(reply)
            if (
                type(reply) is hiredis.ReplyError
                and self.address is not None
                and str(reply).startswith("READONLY")
            ):
                # The master this connection was opened to is a replica now (a failover
                # that left it up): what follows opens a connection to the new one.
                self.retired = True
        if self.retired and not self.waiting:
            self.abort("redis master moved")
            return
        self._owner._drained()

    def _check_silence(self) -> None:
        self._timer = None
        if self.closed or not self.waiting:
            return
        loop = asyncio.get_running_loop()
        due = self._last_data + self._silence
        if loop.time() >= due:
            self.abort(f"redis sent nothing for {self._silence:g} s")
        else:
            self._timer = loop.call_at(due, self._check_silence)

    def abort(self, reason: str) -> None:
        """Close at once and fail what is still waiting on this connection."""
        if self._transport is not None:
            self._transport.abort()
        self._lost(reason)

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost(f"redis connection lost: {exc or 'closed by the server'}")

    def _lost(self, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        incident = object()
        while self.waiting:
            future = self.waiting.popleft()
            if not future.done():
                future.set_exception(StoreUnreachable(reason, incident=incident))
        self._owner._lost(self)
        self.ready = False


class RespPool:
    """``size`` pipelined connections to the Redis at ``url``, opened when first needed (or
    by :meth:`open_missing`), opened again after one is lost.

    ``socket_timeout`` bounds the opening of a connection (with its ``AUTH``, ``SELECT`` and
    ``ROLE``) and how long one may stay silent while replies are outstanding. A command
    waits for a connection that can take it up to ``pool_timeout`` seconds (None: its whole
    bound). Behind Sentinel the master is asked of ``sentinel`` (a redis-py Sentinel pool for
    the same URL) when given, else of a Sentinel pool of the pool's own.
    """

    def __init__(
        self,
        url: str,
        *,
        size: int = 1,
        socket_timeout: float = 1.0,
        pool_timeout: float | None = None,
        sentinel: SentinelPool | None = None,
    ) -> None:
        if size < 1:
            raise ValueError("pool_size must be at least 1")
        self._address = Address(url)
        self._socket_timeout = socket_timeout
        self._pool_timeout = pool_timeout
        self._slots: list[Connection | None] = [None] * size
        self._connecting: set[int] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._queue: deque[_Pending] = deque()
        self._closed = False
        self._sentinel = sentinel
        self._owns_sentinel = False
        if sentinel is None and self._address.sentinel is not None:
            own = connection_pool(url, socket_timeout=socket_timeout)
            if not isinstance(own, SentinelPool):
                raise TypeError("a redis+sentinel URL gave no Sentinel pool")
            self._sentinel, self._owns_sentinel = own, True

    async def execute(self, *args: Arg, timeout: float | None = None) -> Any:
        """Send one command and return its reply as hiredis parses it (bytes, int, None,
        lists of those), within ``timeout`` seconds (None: no bound but the connection's
        silence).

        Raises:
            ReplyError: Redis answered with an error.
            StoreUnreachable: no connection could be opened, or it broke before the reply.
            PoolExhausted: no connection could take the command within its bound.
            StoreTimeout: Redis did not answer within the bound (it may have applied it).
            StoreError: the pool is closed.
        """
        if self._closed:
            raise StoreError("redis connection pool closed")
        loop = asyncio.get_running_loop()
        entry = _Pending(pack(*args), loop.create_future())
        connection = self._pick()
        if connection is not None and not self._live_queue():
            connection.send(entry.command, entry.future)
            entry.sent = True
        else:
            self._queue.append(entry)
            self._connect_missing()
        if timeout is not None:
            wait = timeout if self._pool_timeout is None else min(self._pool_timeout, timeout)
            entry.timer = loop.call_later(wait, self._expire, entry, timeout - wait)
        try:
            reply = await entry.future
        finally:
            if entry.timer is not None:
                entry.timer.cancel()
        if isinstance(reply, hiredis.ReplyError):
            raise ReplyError(str(reply))
        return reply

    def _pick(self) -> Connection | None:
        """The ready connection with the fewest replies outstanding, if one can take more."""
        best: Connection | None = None
        for connection in self._slots:
            if (
                connection is not None
                and connection.ready
                and not connection.retired
                and len(connection.waiting) < MAX_IN_FLIGHT
                and (best is None or len(connection.waiting) < len(best.waiting))
            ):
                best = connection
        return best

    def _drained(self) -> None:
        """A connection has room (replies came in, or it opened): send what waited."""
        queue = self._queue
        while queue:
            target = self._pick()
            if target is None:
                return
            entry = queue.popleft()
            if not entry.future.done():  # not expired or cancelled while queued
                target.send(entry.command, entry.future)
                entry.sent = True

    def _lost(self, connection: Connection) -> None:
        if not connection.ready:
            return  # never opened: _connect reports it
        for i, slot in enumerate(self._slots):
            if slot is connection:
                self._slots[i] = None
        if self._live_queue() and not self._closed:
            self._connect_missing()

    def _live_queue(self) -> bool:
        """True when a queued command still waits (expired ones are dropped here)."""
        queue = self._queue
        while queue and queue[0].future.done():
            queue.popleft()
        return bool(queue)

    def _expire(self, entry: _Pending, remaining: float) -> None:
        if entry.future.done():
            return
        if not entry.sent:
            entry.future.set_exception(
                PoolExhausted("no redis connection could take the command while it could wait")
            )
        elif remaining > 0:
            loop = asyncio.get_running_loop()
            entry.timer = loop.call_later(remaining, self._expire, entry, 0.0)
        else:
            entry.future.set_exception(StoreTimeout("redis did not answer in time"))

    def open_missing(self) -> None:
        """Open the connections that are not open or opening (a burst then finds them open
        instead of paying for the handshakes)."""
        self._connect_missing()

    def _connect_missing(self) -> None:
        if self._closed:
            return
        loop = asyncio.get_running_loop()
        for i, slot in enumerate(self._slots):
            if slot is None and i not in self._connecting:
                self._connecting.add(i)
                task = loop.create_task(self._connect(i))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _connect(self, slot: int) -> None:
        loop = asyncio.get_running_loop()
        address = self._address
        connection = Connection(self, silence=self._socket_timeout)
        replies: list[asyncio.Future[Any]] = []
        try:
            async with asyncio.timeout(self._socket_timeout):
                host, port = address.host, address.port
                if address.sentinel is not None:
                    host, port = await self.master()
                    connection.address = (host, port)
                if address.unix_path is not None:
                    await loop.create_unix_connection(lambda: connection, address.unix_path)
                else:
                    await loop.create_connection(
                        lambda: connection,
                        host,
                        port,
                        ssl=address.tls,
                    )
                setup = address.setup()
                replies += [loop.create_future() for _ in setup]
                for command, reply in zip(setup, replies, strict=True):
                    connection.send(command, reply)
                for reply in replies:
                    answer = await reply
                    if isinstance(answer, hiredis.ReplyError):
                        raise StoreUnreachable(f"redis refused the connection setup: {answer}")
                if address.sentinel is not None:
                    role = replies[-1].result()
                    if not (isinstance(role, list) and role and role[0] == b"master"):
                        raise StoreUnreachable(
                            f"redis at {host}:{port} is not the master (ROLE {role!r:.40})"
                        )
        except (OSError, TimeoutError, StoreError) as exc:
            connection.abort("setup failed")
            _discard(replies)
            self._connecting.discard(slot)
            self._connect_failed(exc)
            return
        except BaseException:
            connection.abort("connect cancelled")
            _discard(replies)
            raise
        finally:
            self._connecting.discard(slot)
        if self._closed:
            connection.abort("redis connection pool closed")
            return
        connection.ready = True
        self._slots[slot] = connection
        self._drained()

    def _connect_failed(self, exc: BaseException) -> None:
        """No connection could be opened: fail the queued commands unless another connection
        is open or still opening."""
        self._drained()
        if any(c is not None for c in self._slots) or self._connecting:
            return
        reason = str(exc) or type(exc).__name__
        failure = StoreUnreachable(
            f"redis connect failed: {reason}", incident=object(), connect=True
        )
        while self._queue:
            entry = self._queue.popleft()
            if not entry.future.done():
                entry.future.set_exception(
                    StoreUnreachable(str(failure), incident=failure.incident, connect=True)
                )

    async def master(self) -> tuple[str, int]:
        """The master's address as the sentinels name it now.

        Raises:
            StoreUnreachable: no sentinel answered, or none names a master that is up.
            StoreError: the URL names no sentinels.
        """
        if self._sentinel is None:
            raise StoreError("the redis URL names no sentinels to ask")
        try:
            return await self._sentinel.get_master_address()
        except (RedisError, OSError) as exc:
            raise StoreUnreachable(
                f"no redis master from the sentinels: {exc}", connect=True
            ) from exc

    def _retire(self, master: tuple[str, int]) -> None:
        """Stop using connections opened to another master than ``master``."""
        for connection in self._slots:
            if connection is None or connection.address in (None, master):
                continue
            connection.retired = True
            if not connection.waiting:
                connection.abort("redis master moved")

    async def follow_master(self) -> None:
        """Behind Sentinel, ask the sentinels for the master now, and close the connections
        to an old one once they have answered what they carry (a switch is then noticed
        even when no connection to the old master broke). Nothing without Sentinel, or when
        no sentinel answers (the master may still)."""
        if self._address.sentinel is None:
            return
        try:
            self._retire(await self.master())
        except StoreError:
            pass

    async def close(self) -> None:
        """Fail what waits, close every connection (and the pool's own Sentinel pool)."""
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            try:
                await task
            except asyncio.CancelledError:
                pass
        while self._queue:
            entry = self._queue.popleft()
            if not entry.future.done():
                entry.future.set_exception(StoreError("redis connection pool closed"))
        for connection in self._slots:
            if connection is not None:
                connection.abort("redis connection pool closed")
        if self._owns_sentinel and self._sentinel is not None:
            try:
                await self._sentinel.aclose()
            except (RedisError, OSError):
                pass


def _discard(futures: Iterable[asyncio.Future[Any]]) -> None:
    """Cancel what is pending and mark failures seen: nobody will await these."""
    for future in futures:
        if not future.done():
            future.cancel()
        elif not future.cancelled():
            future.exception()


async def run_script(
    pool: RespPool,
    script: StoredScript,
    keys: Sequence[Arg],
    args: Sequence[Arg],
    *,
    timeout: float,
) -> Any:
    """``EVALSHA`` of ``script``; on ``NOSCRIPT`` (a restart, a failover, ``SCRIPT FLUSH``)
    ``SCRIPT LOAD`` and ``EVALSHA`` again. The three together within ``timeout`` seconds.

    Raises what :meth:`RespPool.execute` raises (:class:`ReplyError` for an error the script
    raised)."""
    # time.monotonic is the clock asyncio's loop reads; asked directly, it leaves this free
    # of a running loop (bench/glue_bench.py drives the writers with a pool double, no loop).
    started = time.monotonic()
    command = ("EVALSHA", script.sha, len(keys), *keys, *args)
    try:
        return await pool.execute(*command, timeout=timeout)
    except ReplyError as exc:
        if exc.code != "NOSCRIPT":
            raise
    await pool.execute("SCRIPT", "LOAD", script.source, timeout=_left(started, timeout))
    return await pool.execute(*command, timeout=_left(started, timeout))


def _left(started: float, timeout: float) -> float:
    left = started + timeout - time.monotonic()
    if left <= 0:
        raise StoreTimeout("redis did not answer in time")
    return left


class RespStreamWriter:
    """Batches of stream entries written through a :class:`RespPool`, each batch one
    command: ``XADD`` for one entry, the ``EVALSHA`` of :data:`~e911_sip.batching.XADD_ALL`
    for more (atomic: never interleaved with another writer's entries, and a connection
    lost before the command arrived applies none of it). Implements
    :class:`~e911_sip.batching.StreamWriter`; owns its pool."""

    def __init__(self, pool: RespPool, *, timeout: float) -> None:
        self._pool = pool
        self._timeout = timeout

    @classmethod
    def open(cls, url: str, *, timeout: float) -> RespStreamWriter:
        """A writer on a pool of its own: one connection (pipelined, it carries every batch),
        each write bounded by ``timeout`` seconds, as is the opening of the connection."""
        return cls(RespPool(url, size=1, socket_timeout=timeout), timeout=timeout)

    async def xadd_all(
        self, stream: str, field: str, values: Sequence[str], *, maxlen: int = 0
    ) -> None:
        if not values:
            return
        try:
            await write_batch(stream, field, values, maxlen, self._execute, self._run_script)
        except StoreError as exc:
            raise WriteError(str(exc)) from exc

    def _execute(self, *args: Arg) -> Awaitable[Any]:
        return self._pool.execute(*args, timeout=self._timeout)

    def _run_script(
        self, script: StoredScript, keys: Sequence[str], args: Sequence[str | int]
    ) -> Awaitable[Any]:
        return run_script(self._pool, script, keys, args, timeout=self._timeout)

    async def close(self) -> None:
        await self._pool.close()
