"""What the background writers (notifications, call records) share: the single-future waits
of their lingering (:class:`Pauses`), and a batch of stream entries written in one Redis
command.

redis-py builds every command of a pipeline in Python (packing, a reply to parse each), so
a ``MULTI`` of a hundred ``XADD`` cost the edge several times the CPU of one ``EVALSHA``
carrying the hundred entries; the script is atomic as the ``MULTI`` was.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Sequence
from types import TracebackType
from typing import Literal

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError

_XADD_ALL = """
local maxlen = tonumber(ARGV[1])
for i = 3, #ARGV do
  if maxlen > 0 then
    redis.call('XADD', KEYS[1], 'MAXLEN', '~', maxlen, '*', ARGV[2], ARGV[i])
  else
    redis.call('XADD', KEYS[1], '*', ARGV[2], ARGV[i])
  end
end
return #ARGV - 2
"""


class StoredScript:
    """A Lua script run by ``EVALSHA``, loaded again when the server does not know it (a
    restart, a failover): one command for redis-py to pack and parse where a ``MULTI`` of
    several costs the client that many."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest()

    async def run(
        self, client: aioredis.Redis, keys: Sequence[str], args: Sequence[str | int]
    ) -> object:
        try:
            return await client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            await client.script_load(self.source)
            return await client.evalsha(self.sha, len(keys), *keys, *args)


_XADD_ALL_SCRIPT = StoredScript(_XADD_ALL)


def end_wait(waiter: asyncio.Future[None] | None) -> None:
    """End a wait on ``waiter``, unless there is none or it has ended."""
    if waiter is not None and not waiter.done():
        waiter.set_result(None)


class Pauses:
    """The waits of a background task that runs until ``stop``: each one future, ended by
    its timer, by the stop, or (a wait that asks for it) by :meth:`wake`.

    A busy edge waits every few calls: ``asyncio.wait`` on ``Event.wait()`` tasks, or
    ``asyncio.timeout`` around one, cost tasks, callbacks and a cancellation each time; here
    a wait is a future and a timer, and one task watches the stop for all of them.

    Used as a context manager (``with Pauses(stop) as pauses:``) inside the running loop: it
    watches the stop from entry to exit. A wait that starts after the stop ends at once.
    """

    def __init__(self, stop: asyncio.Event) -> None:
        self._stop = stop
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopper: asyncio.Task[Literal[True]] | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._wakeable = False

    def __enter__(self) -> Pauses:
        self._loop = asyncio.get_running_loop()
        stopper = self._stopper = asyncio.ensure_future(self._stop.wait())
        stopper.add_done_callback(self._stopped)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        stopper, self._stopper = self._stopper, None
        if stopper is not None:
            stopper.remove_done_callback(self._stopped)
            stopper.cancel()
        self._waiter = None

    def _stopped(self, _stopper: object) -> None:
        end_wait(self._waiter)

    async def until(self, when: float | None, *, wakeable: bool = False) -> None:
        """Wait until the loop's clock reads ``when`` (None: no timer), the stop, or, when
        ``wakeable``, the next :meth:`wake`."""
        loop = self._loop
        if loop is None:
            raise RuntimeError("Pauses used outside its with block")
        if self._stop.is_set():
            return
        waiter = self._waiter = loop.create_future()
        self._wakeable = wakeable
        timer = None if when is None else loop.call_at(when, end_wait, waiter)
        try:
            await waiter
        finally:
            if timer is not None:
                timer.cancel()
            self._waiter = None

    async def sleep(self, seconds: float, *, wakeable: bool = False) -> None:
        """:meth:`until` ``seconds`` from now."""
        loop = self._loop
        if loop is None:
            raise RuntimeError("Pauses used outside its with block")
        await self.until(loop.time() + seconds, wakeable=wakeable)

    def wake(self) -> None:
        """End the current wait if it is ``wakeable`` (else, or with none, nothing)."""
        if self._wakeable:
            end_wait(self._waiter)


async def xadd_all(
    client: aioredis.Redis, stream: str, field: str, values: Sequence[str], *, maxlen: int = 0
) -> None:
    """``XADD stream [MAXLEN ~ maxlen] * field value`` for each of ``values``, in order, in
    one ``EVALSHA`` (the script is loaded again when the server does not know it: a restart,
    a failover). ``maxlen`` 0: no trimming.

    Raises:
        RedisError: not (all) written. A script that fails part way has written the values
            before the failure (a ``MULTI`` applied every command that did not fail): a
            retry may store some twice.
    """
    if not values:
        return
    await _XADD_ALL_SCRIPT.run(client, (stream,), (maxlen, field, *values))
