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
_XADD_ALL_SHA = hashlib.sha1(_XADD_ALL.encode(), usedforsecurity=False).hexdigest()


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
    args: list[str | int] = [stream, maxlen, field, *values]
    try:
        await client.evalsha(_XADD_ALL_SHA, 1, *args)
    except NoScriptError:
        await client.script_load(_XADD_ALL)
        await client.evalsha(_XADD_ALL_SHA, 1, *args)
