"""Leases in Redis: at most one provisioning process at a time works on a named thing.

Theory of operation. A lease is a key ``{prefix}lease:{name}`` set with ``SET NX PX`` to a
token only its holder knows. While the holder works, a task renews it every third of its
time to live, and only if the key still holds the token (a Lua compare-and-``PEXPIRE``); the
holder releases it with a compare-and-``DEL``, so a holder whose lease expired can never
delete its successor's. A process that dies holding a lease blocks the thing for at most
``ttl``. Another process that wants the thing polls with a growing delay (``poll`` doubling
up to ``max_poll``) for at most ``wait`` seconds, then gives up with :class:`LeaseBusy`.

A lease is a liveness device, not the safety net: a holder that stalls longer than ``ttl``
(a stopped process, Redis unreachable) loses it without being told in time. The holder can
ask :attr:`Lease.lost` before each step that must not be shared: it turns true as soon as a
renewal finds the key gone or another token in it, or once ``ttl`` has passed since the last
renewal Redis confirmed. What the lease protects must still refuse a stale write on its own
(the provisioning state's version check does).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Protocol

import redis.asyncio as aioredis
from redis.exceptions import RedisError

_LOG = logging.getLogger("e911_sip.provisioning.lease")

_RENEW = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('pexpire', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('del', KEYS[1])
end
return 0
"""


@dataclass(frozen=True, slots=True, kw_only=True)
class LeaseOptions:
    """How leases are held and waited for."""

    ttl: float = 15.0
    """Seconds a lease lives unless renewed; its holder renews it every third of that. A
    process that dies holding one blocks that customer (or job) for at most this long."""
    wait: float = 60.0
    """Seconds a change waits for a lease another process holds before it is refused (503
    ``customer_busy``, Retry-After 1); every wait is counted."""
    poll: float = 0.02
    """Seconds before the first retry of a lease that is taken; doubled at each retry."""
    max_poll: float = 0.5
    """Longest delay between two retries."""


class LeaseError(Exception):
    """Redis could not be asked for the lease."""


class LeaseBusy(LeaseError):
    """Another process held the lease for longer than the caller would wait."""

    def __init__(self, name: str, waited: float) -> None:
        super().__init__(f"{name} is being changed by another process (waited {waited:.1f}s)")
        self.name = name
        self.waited = waited


class Held(Protocol):
    """What a holder can ask of its lease, whichever backend gave it."""

    @property
    def waited(self) -> float: ...

    @property
    def contended(self) -> bool: ...

    @property
    def lost(self) -> bool: ...


class Lease:
    """One held lease: its key, its token, how long it took to get, whether it is lost."""

    def __init__(
        self, *, key: str, token: str, ttl: float, waited: float, clock: Callable[[], float]
    ) -> None:
        self.key = key
        self.token = token
        self.waited = waited
        """Seconds spent waiting for another holder (0.0: free at the first try)."""
        self._ttl = ttl
        self._clock = clock
        # Valid only from a confirmed write on: ``ttl`` counted from when it was sent.
        self._valid_until = float("-inf")
        self._taken = False

    @property
    def contended(self) -> bool:
        """True when another process held it first and this one waited."""
        return self.waited > 0.0

    @property
    def lost(self) -> bool:
        """True when the lease may be another's: a renewal found it gone, or no renewal
        was confirmed for ``ttl`` seconds."""
        return self._taken or self._clock() >= self._valid_until

    def confirmed(self, sent_at: float) -> None:
        """A renewal sent at ``sent_at`` succeeded: valid ``ttl`` from then."""
        self._valid_until = max(self._valid_until, sent_at + self._ttl)

    def taken(self) -> None:
        """A renewal found the key gone or holding another token."""
        self._taken = True


class LocalLease:
    """The lease of a single-process backend: nothing to wait for, never lost."""

    waited = 0.0
    contended = False
    lost = False


class RedisLeases:
    """Leases on one Redis database (see the module docstring)."""

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        prefix: str,
        options: LeaseOptions,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self._prefix = prefix
        self._options = options
        self._clock = clock
        # Host and PID in the token say who holds a lease when an operator looks at Redis.
        self._owner = f"{socket.gethostname()}:{os.getpid()}"

    @property
    def options(self) -> LeaseOptions:
        return self._options

    def key(self, name: str) -> str:
        """The Redis key of the lease on ``name``."""
        return f"{self._prefix}lease:{name}"

    async def try_acquire(self, name: str) -> Lease | None:
        """The lease on ``name`` if it is free now, else None.

        Raises:
            LeaseError: Redis did not answer.
        """
        key = self.key(name)
        token = f"{self._owner}:{secrets.token_hex(8)}"
        sent = self._clock()
        try:
            done = await self._client.set(
                key, token, nx=True, px=max(1, int(self._options.ttl * 1000))
            )
        except (RedisError, OSError) as exc:
            raise LeaseError(f"redis SET of {key} failed: {exc}") from exc
        if not done:
            return None
        lease = Lease(key=key, token=token, ttl=self._options.ttl, waited=0.0, clock=self._clock)
        lease.confirmed(sent)
        return lease

    async def acquire(self, name: str, *, wait: float | None = None) -> Lease:
        """The lease on ``name``, waiting up to ``wait`` seconds (default: the options').

        Raises:
            LeaseBusy: another process kept it for the whole wait.
            LeaseError: Redis did not answer.
        """
        limit = self._options.wait if wait is None else wait
        start = self._clock()
        delay = self._options.poll
        first = True
        while True:
            lease = await self.try_acquire(name)
            waited = self._clock() - start
            if lease is not None:
                # A tiny positive figure still says "waited": contended is waited > 0.
                lease.waited = 0.0 if first else max(waited, 1e-9)
                return lease
            first = False
            if waited >= limit:
                raise LeaseBusy(name, waited)
            await asyncio.sleep(min(delay, max(limit - waited, 0.001)))
            delay = min(delay * 2, self._options.max_poll)

    async def release(self, lease: Lease) -> bool:
        """Give ``lease`` back; False when it was no longer ours (expired, or taken). A
        Redis failure is logged, not raised: the lease then expires by itself."""
        try:
            done = await self._client.eval(_RELEASE, 1, lease.key, lease.token)
        except (RedisError, OSError) as exc:
            _LOG.warning("could not release lease %s (it expires by itself): %s", lease.key, exc)
            return False
        return bool(done)

    async def renew(self, lease: Lease) -> bool:
        """Extend ``lease`` by ``ttl`` if it is still ours; False (and ``lost``) if not.

        Raises:
            LeaseError: Redis did not answer (the lease is not known to be lost yet).
        """
        sent = self._clock()
        ttl_ms = max(1, int(self._options.ttl * 1000))
        try:
            done = await self._client.eval(_RENEW, 1, lease.key, lease.token, ttl_ms)
        except (RedisError, OSError) as exc:
            raise LeaseError(f"redis renewal of {lease.key} failed: {exc}") from exc
        if not done:
            lease.taken()
            return False
        lease.confirmed(sent)
        return True

    async def _keep(self, lease: Lease) -> None:
        """Renew ``lease`` every third of its time to live until cancelled or lost."""
        interval = self._options.ttl / 3
        while not lease.lost:
            await asyncio.sleep(interval)
            try:
                if not await self.renew(lease):
                    _LOG.warning("lease %s was lost: another process holds it now", lease.key)
                    return
            except LeaseError as exc:
                # Retried at the next interval; ``lost`` turns true once ttl has passed.
                _LOG.warning("%s", exc)

    @contextlib.asynccontextmanager
    async def hold(self, name: str, *, wait: float | None = None) -> AsyncIterator[Lease]:
        """Acquire the lease on ``name`` (see :meth:`acquire`), keep it renewed while the
        block runs, and release it after.

        Raises:
            LeaseBusy: another process kept it for the whole wait.
            LeaseError: Redis did not answer.
        """
        lease = await self.acquire(name, wait=wait)
        keeper = asyncio.create_task(self._keep(lease), name=f"lease {lease.key}")
        try:
            yield lease
        finally:
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keeper
            await self.release(lease)


__all__ = [
    "Held",
    "Lease",
    "LeaseBusy",
    "LeaseError",
    "LeaseOptions",
    "LocalLease",
    "RedisLeases",
]
