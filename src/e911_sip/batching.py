"""What the background writers (notifications, call records) share: the single-future waits
of their lingering, and a batch of stream entries written in one Redis command.

redis-py builds every command of a pipeline in Python (packing, a reply to parse each), so
a ``MULTI`` of a hundred ``XADD`` cost the edge several times the CPU of one ``EVALSHA``
carrying the hundred entries; the script is atomic as the ``MULTI`` was.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Sequence

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
