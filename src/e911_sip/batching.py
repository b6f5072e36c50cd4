"""What the background writers (notifications, call records) share: the single-future waits
of their lingering (:class:`Pauses`), and a batch of stream entries written in one Redis
command (:class:`StreamWriter`).

A ``MULTI`` of a hundred ``XADD`` costs the client a command to pack and a reply to parse
each; one ``EVALSHA`` of :data:`XADD_ALL` carries the hundred entries, atomic as the
``MULTI`` was. The edge writes through :class:`e911_sip.store.resp.RespStreamWriter` (its
own pipelined connection); :class:`ClientStreamWriter` does the same through a redis-py
client, for a queue built without one.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable, Sequence
from types import TracebackType
from typing import Literal, Protocol

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError, RedisError

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


XADD_ALL = StoredScript(_XADD_ALL)
"""``XADD KEYS[1] [MAXLEN ~ ARGV[1]] * ARGV[2] value`` for each value of ``ARGV[3:]``, in
order (``ARGV[1]`` 0: no trimming); returns how many."""


def write_batch(
    stream: str,
    field: str,
    values: Sequence[str],
    maxlen: int,
    command: Callable[..., Awaitable[object]],
    script: Callable[[StoredScript, Sequence[str], Sequence[str | int]], Awaitable[object]],
) -> Awaitable[object]:
    """A batch of one or more stream entries as one command, through the transport's
    ``command`` (a Redis command's arguments) or ``script`` (a :class:`StoredScript`, its
    keys and its arguments); the awaitable that writes it.

    One entry is a plain ``XADD`` (``MAXLEN ~ maxlen`` when ``maxlen`` is set): the script
    would cost the server a Lua call for nothing. Several are the ``EVALSHA`` of
    :data:`XADD_ALL`, atomic as a ``MULTI`` of them was.
    """
    if len(values) == 1:
        if maxlen > 0:
            return command("XADD", stream, "MAXLEN", "~", maxlen, "*", field, values[0])
        return command("XADD", stream, "*", field, values[0])
    return script(XADD_ALL, (stream,), (maxlen, field, *values))


class WriteError(Exception):
    """A batch of stream entries was not (all) written."""


class StreamWriter(Protocol):
    """Where the background writers append their batches of stream entries."""

    async def xadd_all(
        self, stream: str, field: str, values: Sequence[str], *, maxlen: int = 0
    ) -> None:
        """``XADD stream [MAXLEN ~ maxlen] * field value`` for each of ``values``, in order,
        in one command (``maxlen`` 0: no trimming).

        Raises:
            WriteError: not (all) written. An error before the command reached Redis wrote
                none of it; a reply lost after it may leave it written, so a retry may
                store the batch twice (the writers' entries carry ids that make that
                harmless). A script that fails part way has written the values before the
                failure (as a ``MULTI`` applied every command that did not fail).
        """
        ...

    async def close(self) -> None:
        """Release what the writer owns."""
        ...


class ClientStreamWriter:
    """:class:`StreamWriter` through a redis-py client (which it does not own: ``close``
    leaves it open)."""

    def __init__(self, client: aioredis.Redis) -> None:
        self._client = client

    async def xadd_all(
        self, stream: str, field: str, values: Sequence[str], *, maxlen: int = 0
    ) -> None:
        if not values:
            return
        try:
            await write_batch(
                stream, field, values, maxlen, self._client.execute_command, self._run_script
            )
        except (RedisError, OSError) as exc:
            raise WriteError(str(exc)) from exc

    def _run_script(
        self, script: StoredScript, keys: Sequence[str], args: Sequence[str | int]
    ) -> Awaitable[object]:
        return script.run(self._client, keys, args)

    async def close(self) -> None:
        return None


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
