"""Latency of a Kari's Law notification, INVITE to webhook, in process (run by hand).

The edge's half (:class:`Publisher`) and the notifier's half (:class:`Notifier`) run on one
loop with journaled queues (``[notify] queue_file``: an fsync per write) or, with
``--redis URL``, Redis streams; the target is an aiohttp webhook receiver on loopback. Each
event is stamped when it is published (the INVITE's arrival at the edge) and the receiver
notes when the POST arrives. Reports the median, p99 and maximum over ``--calls`` calls made
``--interval`` seconds apart, and a burst of ``--burst`` calls at once.

    PYTHONPATH=src python bench/notify_latency.py --calls 200
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

from aiohttp import web

from e911_sip.notify.channels import WebhookChannel, WebhookOptions
from e911_sip.notify.dispatch import Notifier, NotifierOptions, Publisher
from e911_sip.notify.event import CallEvent, Resolution, Targets
from e911_sip.notify.queue import FileQueue, Queue, RedisStreamQueue


async def resolve(event: CallEvent) -> Resolution:
    return Resolution(level="customer", address="900 MAIN CAMPUS DR, RALEIGH, NC 27606, US")


def summary(name: str, latencies: list[float]) -> str:
    ordered = sorted(latencies)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return (
        f"{name}: n={len(ordered)} median={statistics.median(ordered) * 1e3:.1f} ms "
        f"p99={p99 * 1e3:.1f} ms max={ordered[-1] * 1e3:.1f} ms"
    )


async def main(args: argparse.Namespace) -> None:
    arrivals: dict[str, float] = {}
    done = asyncio.Event()
    expected = args.calls + args.burst

    async def hook(request: web.Request) -> web.Response:
        body = json.loads(await request.read())
        arrivals[body["call_id"]] = time.time()
        if len(arrivals) >= expected:
            done.set()
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}/hook"

    with tempfile.TemporaryDirectory() as tmp:
        if args.redis:
            prefix = f"bench:{time.time_ns()}:"
            events: Queue = RedisStreamQueue.from_url(
                args.redis, stream=prefix + "events", dead_list=prefix + "dead"
            )
            deliveries: Queue = RedisStreamQueue.from_url(
                args.redis, stream=prefix + "deliveries", dead_list=prefix + "dead"
            )
        else:
            events = FileQueue(Path(tmp) / "events")
            deliveries = FileQueue(Path(tmp) / "deliveries")
        publisher = Publisher(events)
        webhook = WebhookChannel(WebhookOptions(secret=b"bench"))
        notifier = Notifier(
            events=events,
            deliveries=deliveries,
            channels={"webhook": webhook},
            resolve=resolve,
            options=NotifierOptions(fallback=Targets(webhooks=(url,)), poll_interval=0.5),
        )
        stop = asyncio.Event()
        tasks = [
            asyncio.create_task(publisher.run(stop)),
            asyncio.create_task(notifier.run(stop)),
        ]
        sent: dict[str, float] = {}

        def call(n: int) -> None:
            event = CallEvent.now(
                call_id=f"bench-{n}",
                caller="1321551234",
                callback=None,
                dialed="911",
                provider_endpoint="5555555/acco0123",
                outcome="enriched",
            )
            sent[event.call_id] = event.received_at
            publisher.publish(event)

        for n in range(args.calls):
            call(n)
            await asyncio.sleep(args.interval)
        spaced = [f"bench-{n}" for n in range(args.calls)]
        for n in range(args.calls, expected):
            call(n)
        await asyncio.wait_for(done.wait(), timeout=120)
        stop.set()
        await asyncio.gather(*tasks)
        await webhook.close()
        await events.close()
        await deliveries.close()
    await runner.cleanup()
    backend = "redis streams" if args.redis else "journal files (fsync)"
    print(f"queues: {backend}")
    print(summary("one call at a time", [arrivals[c] - sent[c] for c in spaced]))
    burst = [f"bench-{n}" for n in range(args.calls, expected)]
    if burst:
        print(summary(f"burst of {len(burst)}", [arrivals[c] - sent[c] for c in burst]))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--interval", type=float, default=0.02)
    parser.add_argument("--burst", type=int, default=100)
    parser.add_argument("--redis", default="", help="redis://... to use streams instead")
    asyncio.run(main(parser.parse_args()))
