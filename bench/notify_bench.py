"""CPU per emergency call of the notification and call-record writers on Redis (run by hand).

What the edge process spends around each 911 call on its Redis streams, without SIP: the
real :class:`Publisher` (events → ``events`` stream), the real :class:`Notifier` (events →
contacts → ``deliveries`` stream → a channel that accepts at once) and the real
:class:`CallRecorder` (a record per call → the ``e911:calls`` stream through
:class:`RedisStreamSink`), on one uvloop loop, against a real redis-server on 127.0.0.1.

Each run is a fresh child process that feeds ``--events`` calls at ``--rate`` calls/s (ticks
of 10 ms) and waits until every delivery was accepted and acknowledged and every record
written. With ``--work`` each call also holds the loop that many µs (busy CPU, as the
edge's SIP work does), so that the writers run late as on a loaded edge. It reports, per
call, from the first call to the last write:

- the child's CPU (``time.process_time``), without that work;
- its Redis round trips: commands (a pipeline or a script counts one) its redis-py
  connections sent, counted in the child;
- the server's work: ``INFO commandstats`` calls before → after, each command apart
  (commands a script runs count there too; the bench's own ``XLEN`` polls are not included).

With several ``--src`` directories the children alternate between them (before/after builds
on the same loaded host); the median of ``--runs`` per build is printed.

    PYTHONPATH=src python bench/notify_bench.py
    mkdir -p ../before && git archive HEAD~3 src | tar -x -C ../before
    PYTHONPATH=src python bench/notify_bench.py --src ../before/src --src src --runs 7
    PYTHONPATH=src python bench/notify_bench.py --rate 800 --work 700 --events 4000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]


async def child(args: argparse.Namespace) -> dict[str, Any]:
    import redis.asyncio as aioredis
    from redis.asyncio.connection import AbstractConnection, Connection

    from e911_sip.callrecords.recorder import CallRecorder, RecorderOptions
    from e911_sip.callrecords.stream import RedisStreamSink
    from e911_sip.metrics import Metrics
    from e911_sip.notify.dispatch import Notifier, NotifierOptions, Publisher
    from e911_sip.notify.event import CallEvent, Delivery, Resolution, Targets
    from e911_sip.notify.queue import RedisStreamQueue
    from e911_sip.proxy.core import CallCompleted, EmergencyCall, EmergencyForwarded
    from e911_sip.store.redis import connect

    sent = 0
    send = AbstractConnection.send_packed_command

    async def counted(self: AbstractConnection, command: Any, check_health: bool = True) -> None:
        nonlocal sent
        sent += 1
        await send(self, command, check_health)

    class Uncounted(Connection):
        """The bench's own probes: not the writers' round trips."""

        async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
            await send(self, command, check_health)

    AbstractConnection.send_packed_command = counted  # type: ignore[method-assign]
    probe = aioredis.Redis(
        connection_pool=aioredis.ConnectionPool.from_url(
            args.redis, decode_responses=True, connection_class=Uncounted
        )
    )

    async def commandstats() -> dict[str, int]:
        stats: dict[str, Any] = await probe.info("commandstats")
        return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()}

    prefix = f"bench:{os.getpid()}:{time.time_ns()}:"
    events = RedisStreamQueue(
        connect(args.redis, socket_timeout=5.0, replica_acks=False),
        stream=prefix + "events",
        dead_list=prefix + "dead",
    )
    queue = RedisStreamQueue(
        connect(args.redis, socket_timeout=5.0, replica_acks=False),
        stream=prefix + "deliveries",
        dead_list=prefix + "dead",
    )
    delivered = 0
    all_delivered = asyncio.Event()

    class Accepting:
        """A channel whose far end accepts at once: only the queues' cost is measured."""

        name = "webhook"

        async def send(self, delivery: Delivery) -> None:
            nonlocal delivered
            delivered += 1
            if delivered >= args.events:
                all_delivered.set()

        async def close(self) -> None:
            return None

    async def resolve(event: CallEvent) -> Resolution:
        return Resolution(
            targets=Targets(webhooks=("http://127.0.0.1:9/hook",)),
            level="customer",
            address="900 MAIN CAMPUS DR, RALEIGH, NC 27606, US",
            name="Helpdesk 365",
        )

    publisher = Publisher(events)
    notifier = Notifier(
        events=events,
        deliveries=queue,
        channels={"webhook": Accepting()},
        resolve=resolve,
        options=NotifierOptions(poll_interval=0.5),
    )
    sink = RedisStreamSink(url=args.redis, stream=prefix + "calls", timeout=5.0)
    recorder = CallRecorder(sink=sink, metrics=Metrics(), options=RecorderOptions())
    stop = asyncio.Event()
    tasks = [
        asyncio.create_task(publisher.run(stop)),
        asyncio.create_task(notifier.run(stop)),
        asyncio.create_task(recorder.run(stop)),
    ]
    written = recorder._results["written"]
    await asyncio.sleep(0.2)  # connections and consumer groups set up before the clock starts

    stats_before = await commandstats()
    sent_before = sent
    start_cpu, start_wall = time.process_time(), time.monotonic()
    per_tick = args.rate / 100
    due = 0.0
    worked = 0.0
    n = 0
    while n < args.events:
        due += per_tick
        while n < min(args.events, int(due)):
            call_id = f"bench-{n}@softswitch"
            line = f"{3215500000 + n}"
            recorder.on_event(EmergencyCall(0, None, "911", call_id))  # type: ignore[arg-type]
            recorder.on_enrichment(
                call_id,
                outcome="enriched",
                caller=line,
                callback=line,
                provider_endpoint="5555555/e911abc123def456",
            )
            recorder.on_event(EmergencyForwarded(0, call_id, "trunk-a", 1, True))
            recorder.on_event(CallCompleted(call_id, "INVITE", True, 200, "trunk-a"))
            publisher.publish(
                CallEvent.now(
                    call_id=call_id,
                    caller=line,
                    callback=None,
                    dialed="911",
                    provider_endpoint="5555555/e911abc123def456",
                    outcome="enriched",
                )
            )
            recorder.on_event(CallCompleted(call_id, "BYE", True, 200, None))
            if args.work:
                # The call's SIP work, which holds the loop as the edge's does.
                began = time.process_time()
                until = time.perf_counter() + args.work / 1e6
                while time.perf_counter() < until:
                    pass
                worked += time.process_time() - began
            n += 1
        await asyncio.sleep(0.01)
    async with asyncio.timeout(60):
        await all_delivered.wait()
        while written._value.get() < args.events:
            await asyncio.sleep(0.005)
        while await probe.xlen(prefix + "deliveries") or await probe.xlen(prefix + "events"):
            await asyncio.sleep(0.005)
    cpu, wall = time.process_time() - start_cpu - worked, time.monotonic() - start_wall
    trips = sent - sent_before
    stats_after = await commandstats()
    stop.set()
    await asyncio.gather(*tasks)
    await events.close()
    await queue.close()
    await probe.aclose()
    server = {
        name: (calls - stats_before.get(name, 0)) / args.events
        for name, calls in stats_after.items()
        if name not in ("info", "xlen") and calls != stats_before.get(name, 0)
    }
    return {
        "cpu_us": cpu / args.events * 1e6,
        "wall": wall,
        "delivered": delivered,
        "trips": trips / args.events,
        "server": server,
    }


def run_child(src: str, args: argparse.Namespace, url: str) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(Path(src).resolve())}
    command = [sys.executable, __file__, "--child", "--redis", url]
    command += ["--events", str(args.events), "--rate", str(args.rate), "--work", str(args.work)]
    out = subprocess.run(command, env=env, check=True, capture_output=True, text=True, timeout=120)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def main(args: argparse.Namespace) -> None:
    if args.child:
        try:
            import uvloop

            runner: Any = uvloop.run
        except ImportError:
            runner = asyncio.run
        print(json.dumps(runner(child(args))))
        return
    sys.path.insert(0, str(REPO_ROOT))
    from tests.integration.harness import RedisServer

    sources = args.src or ["src"]
    server = RedisServer(Path(tempfile.mkdtemp(prefix="notify-bench-")))
    server.start()
    figures: dict[str, list[float]] = {src: [] for src in sources}
    trips: dict[str, list[float]] = {src: [] for src in sources}
    try:
        for run in range(args.runs):
            for src in sources:
                result = run_child(src, args, server.url)
                figures[src].append(result["cpu_us"])
                trips[src].append(result["trips"])
                commands = ", ".join(
                    f"{name} {calls:.2f}" for name, calls in sorted(result["server"].items())
                )
                print(
                    f"run {run + 1} {src}: {result['cpu_us']:.0f} µs CPU/call, "
                    f"{result['trips']:.2f} round trips/call, {result['wall']:.2f} s; "
                    f"server commands/call: {commands}",
                    flush=True,
                )
    finally:
        server.stop()
    print(f"{args.events} calls at {args.rate}/s, {args.runs} runs each, alternating")
    for src, values in figures.items():
        print(
            f"{src}: median {statistics.median(values):.0f} µs CPU/call "
            f"(min {min(values):.0f}, max {max(values):.0f}), "
            f"median {statistics.median(trips[src]):.2f} Redis round trips/call"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--rate", type=float, default=500.0, help="calls a second (≤ 2000)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument(
        "--work",
        type=float,
        default=0.0,
        help="µs of busy CPU per call on the loop, as the edge's SIP work (not in the figures)",
    )
    parser.add_argument("--src", action="append", help="a src/ directory (repeat to compare)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--redis", default="", help=argparse.SUPPRESS)
    parsed = parser.parse_args()
    parsed.events = max(1, min(parsed.events, 20_000))
    parsed.rate = max(1.0, min(parsed.rate, 2000.0))
    main(parsed)
