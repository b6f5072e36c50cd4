"""Memory and load time of the in-memory location mirror at scale (run by hand, not in CI).

Starts a private redis-server on 127.0.0.1, writes N line records the way provisioning does
(one hash per line: a unique ``provider_endpoint`` of Bandwidth's shape, a callback on one line
in ten, ``updated_at``), then loads them with :class:`MirroredRedisStore` and reports:

- the time of the first full load (SCAN + pipelined HGETALL in batches);
- bytes per record held by the mirror, measured with tracemalloc (Python allocations made by
  the load and still alive, divided by N), and the process RSS growth for comparison;
- how long a change written with HSET takes to reach the mirror (median of 50).

    PYTHONPATH=src python bench/mirror_bench.py --records 1000000
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.integration.harness import RedisServer  # noqa: E402

from e911_sip.store.mirror import MirroredRedisStore, MirrorOptions  # noqa: E402
from e911_sip.store.redis import RedisStore  # noqa: E402


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def populate(client: redis.Redis, records: int) -> None:
    pipe = client.pipeline(transaction=False)
    for n in range(records):
        line = 2_000_000_000 + n
        fields = {
            "provider_endpoint": f"5555555/2023{n:014d}",
            "updated_at": "2026-11-01T12:00:00Z",
        }
        if n % 10 == 0:
            fields["callback"] = str(line + 1)
        pipe.hset(f"e911:line:{line}", mapping=fields)
        if n % 10_000 == 9_999:
            pipe.execute()
    pipe.execute()


async def load(url: str, *, traced: bool) -> tuple[MirroredRedisStore, asyncio.Event, float]:
    store = MirroredRedisStore(url=url, direct=RedisStore(url=url), options=MirrorOptions())
    stop = asyncio.Event()
    started = time.perf_counter()
    task = asyncio.create_task(store.run(stop))
    store_tasks.append(task)
    while not store.state().loaded:
        await asyncio.sleep(0.01)
    return store, stop, time.perf_counter() - started


store_tasks: list[asyncio.Task[None]] = []


async def measure(url: str, records: int) -> dict[str, float]:
    # Timed without tracemalloc (which slows allocation several times), then measured with it.
    gc.collect()
    rss_before = rss_bytes()
    store, stop, load_seconds = await load(url, traced=False)
    gc.collect()
    rss_after = rss_bytes()
    stop.set()
    await store_tasks.pop()
    await store.close()
    del store
    gc.collect()
    tracemalloc.start()
    base, _ = tracemalloc.get_traced_memory()
    store, stop, _ = await load(url, traced=True)
    gc.collect()
    held, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert store.state().records == records, store.state()
    task = store_tasks.pop()
    writer = redis.asyncio.Redis.from_url(url)
    delays = []
    for n in range(50):
        line = str(2_000_000_000 + n)
        value = f"5555555/changed{n}"
        t0 = time.perf_counter()
        await writer.hset(f"e911:line:{line}", "provider_endpoint", value)
        while (record := store.lookup_now(line)) is None or record.provider_endpoint != value:
            await asyncio.sleep(0.0005)
        delays.append(time.perf_counter() - t0)
    await writer.aclose()
    stop.set()
    await task
    await store.close()
    return {
        "load_seconds": load_seconds,
        "bytes_per_record": (held - base) / records,
        "rss_per_record": (rss_after - rss_before) / records,
        "change_ms_median": statistics.median(delays) * 1000,
        "change_ms_max": max(delays) * 1000,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, RedisServer(Path(tmp)) as server:
        client = server.client()
        t0 = time.perf_counter()
        populate(client, args.records)
        print(f"wrote {args.records} records in {time.perf_counter() - t0:.1f} s", flush=True)
        result = asyncio.run(measure(server.url, args.records))
    print(f"records:                 {args.records}")
    print(f"first full load:         {result['load_seconds']:.1f} s")
    print(f"held per record:         {result['bytes_per_record']:.0f} B (tracemalloc)")
    print(f"RSS growth per record:   {result['rss_per_record']:.0f} B")
    print(
        f"HSET -> mirror:          median {result['change_ms_median']:.2f} ms, "
        f"max {result['change_ms_max']:.2f} ms (50 changes)"
    )


if __name__ == "__main__":
    main()
