"""CPU cost of one emergency call in the edge process around the core, without sockets.

Builds the edge as ``app.start_edge`` does (the default configuration: call records and
notifications on, the in-memory store seeded with ``--lines`` distinct lines, the records
handed over in-process as the embedded box does) with one change: the UDP transport's socket
is a fake that the bench fills and that collects what the edge sends. Each call is the
datagrams of an emergency call (INVITE, the trunk's 100/180/200, ACK, BYE and its 200), each
put in the fake socket and read by the real ``UdpTransport`` (classification, queues, drain),
then the event loop runs until the edge and its follow-up tasks (the call recorder, the
notification publisher, the GC and load monitors ``app.run`` starts) are idle.

The event loop runs on virtual time: 5 ms a call (200 calls/s), and every ``TIMER_EVERY``
calls 64 s more, so that the core's timers retire the transactions of the calls so far and
every timed task runs as it would on a running edge, the same way on every run.

    PYTHONPATH=src python bench/edge_bench.py [--calls N] [--warmup N] [--profile]
    PYTHONPATH=src python bench/edge_bench.py --callgrind [--callgrind-calls 200,400]

It prints CPU µs per call (``time.process_time``, the whole process: the edge, the loop and
the bench's own building of the trunk's answers, a few per cent).
``--callgrind`` runs the script twice under ``valgrind --tool=callgrind`` with the real
Python binary and prints the instructions per call from the difference of the two totals:
start-up, seeding and imports cancel out. Compare with ``bench/core_bench.py --callgrind``
(the core alone, with a message builder of the same kind) to see the cost around the core.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import logging
import os
import pstats
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.callers import FIRST_LINE  # noqa: E402
from bench.core_bench import (  # noqa: E402
    add_callgrind_options,
    answer,
    callgrind_counts,
    run_callgrind,
)

from e911_sip import app, logs  # noqa: E402
from e911_sip.callrecords.stream import LocalHandoff  # noqa: E402
from e911_sip.config import from_mapping  # noqa: E402
from e911_sip.metrics import Metrics  # noqa: E402
from e911_sip.store.base import LocationRecord  # noqa: E402
from e911_sip.store.memory import MemoryStore  # noqa: E402
from e911_sip.transport.udp import UdpTransport  # noqa: E402

EDGE = ("127.0.0.1", 5070)
UAC = ("127.0.0.1", 5060)
TRUNK = ("127.0.0.1", 5080)
PROVIDER_ENDPOINT = "5555555/e911abc123def456"
TIMER_EVERY = 100
"""Every this many calls the virtual clock jumps 64 s: each transaction so far has ended."""
CALL_STEP = 0.005
"""Virtual seconds between two calls: 200 calls/s, ``bench/edge_profile.py``'s default rate,
so the timed tasks (linger of the record and notification writers, load monitor) batch as
they would there."""

SDP = (
    b"v=0\r\no=- 659841 659841 IN IP4 127.0.0.1\r\ns=Talk\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
    b"m=audio 16006 RTP/AVP 0 101\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:101 telephone-event/8000\r\n"
)


def invite(n: int, line: str) -> bytes:
    head = (
        "INVITE sip:911@127.0.0.1:5070 SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bK-uac-{n}-inv\r\n"
        "Max-Forwards: 70\r\n"
        f"From: <sip:{line}@127.0.0.1>;tag={n}SIPpTag00\r\n"
        "To: <sip:911@127.0.0.1:5070>\r\n"
        f"Call-ID: {n}-edge-bench@127.0.0.1\r\n"
        "CSeq: 102 INVITE\r\n"
        f"Contact: <sip:{line}@127.0.0.1:5060;transport=UDP>\r\n"
        f"P-Asserted-Identity: <sip:+1{line}@127.0.0.1>\r\n"
        "User-Agent: PortaSIP\r\n"
        "Allow: INVITE, ACK, BYE, CANCEL, OPTIONS, NOTIFY, REGISTER, SUBSCRIBE, REFER\r\n"
        "Content-Type: application/sdp\r\n"
        f"Content-Length: {len(SDP)}\r\n\r\n"
    )
    return head.encode() + SDP


def in_dialog(method: str, n: int, line: str, cseq: int) -> bytes:
    return (
        f"{method} sip:127.0.0.1:5080 SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bK-uac-{n}-{method.lower()}\r\n"
        "Route: <sip:127.0.0.1:5070;lr>\r\n"
        "Max-Forwards: 70\r\n"
        f"From: <sip:{line}@127.0.0.1>;tag={n}SIPpTag00\r\n"
        "To: <sip:911@127.0.0.1:5070>;tag=uas1\r\n"
        f"Call-ID: {n}-edge-bench@127.0.0.1\r\n"
        f"CSeq: {cseq} {method}\r\n"
        "Content-Length: 0\r\n\r\n"
    ).encode()


class FakeSocket:
    """What ``UdpTransport`` reads from and sends on: a queue in, a list out."""

    def __init__(self) -> None:
        self.incoming: deque[tuple[bytes, tuple[str, int]]] = deque()
        self.sent: list[tuple[bytes, tuple[str, int]]] = []

    def recvfrom_into(self, view: memoryview) -> tuple[int, tuple[str, int]]:
        if not self.incoming:
            raise BlockingIOError
        data, addr = self.incoming.popleft()
        view[: len(data)] = data
        return len(data), addr

    def sendto(self, data: bytes, addr: tuple[str, int]) -> int:
        self.sent.append((data, addr))
        return len(data)

    def close(self) -> None:
        return None


class BenchUdpTransport(UdpTransport):
    """The real UDP transport on a :class:`FakeSocket` (read by the bench, not the loop)."""

    instances: list[BenchUdpTransport] = []

    async def start(self) -> None:
        self._sock = FakeSocket()  # type: ignore[assignment]
        self._loop = asyncio.get_running_loop()
        BenchUdpTransport.instances.append(self)

    async def close(self) -> None:
        self._sock = None

    @property
    def fake(self) -> FakeSocket:
        sock = self._sock
        assert isinstance(sock, FakeSocket)
        return sock


def config_mapping() -> dict[str, Any]:
    """The default configuration with one UDP listener and one emergency trunk; probes off
    (no trunk would answer them), as ``bench/edge_profile.py`` runs the edge."""
    return {
        "sip": {"listen": [f"udp:{EDGE[0]}:{EDGE[1]}"]},
        "emergency": {
            "numbers": ["911", "933"],
            "trunks": [f"sip:{TRUNK[0]}:{TRUNK[1]}"],
            "geolocation_base_url": "https://geo.example.net/loc/",
            "probe_interval": 0,
        },
        "default": {"trunks": [f"sip:{TRUNK[0]}:{TRUNK[1]}"], "probe_interval": 0},
        "store": {"url": "memory://"},
    }


class Bench:
    """One edge, built once, and the calls fed to it."""

    def __init__(self, lines: int) -> None:
        self.lines = [str(FIRST_LINE + i) for i in range(lines)]
        self.virtual = 0.0
        self.calls = 0
        self.stop = asyncio.Event()
        self.tasks: list[asyncio.Task[Any]] = []

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        # Virtual time: timers fire when the bench moves the clock, the same on every run.
        loop.time = lambda: self.virtual  # type: ignore[method-assign]
        config = from_mapping(config_mapping())
        metrics = Metrics()
        store = MemoryStore({line: LocationRecord(PROVIDER_ENDPOINT, line) for line in self.lines})
        # The embedded box's in-process handoff; the bench's reader stands for the keeper.
        self.handoff = LocalHandoff(max_records=config.records.recorder.queue_size)
        recorder = app.build_recorder(config, self.handoff, metrics)
        notify = app.build_notify(config, edge=True, on_dropped=app.notification_dropped(metrics))
        assert notify is not None and notify.publisher is not None
        self.notify = notify
        real = app.UdpTransport  # type: ignore[attr-defined]
        app.UdpTransport = BenchUdpTransport  # type: ignore[attr-defined]
        try:
            running = await app.start_edge(
                config, store, metrics, recorder=recorder, notify=notify.publisher
            )
        finally:
            app.UdpTransport = real  # type: ignore[attr-defined]
        self.edge = running.edge
        self.transport = BenchUdpTransport.instances[-1]
        self.socket = self.transport.fake
        stop = self.stop
        # The tasks app.run starts beside an edge on the memory store, but the notifier
        # (provisioning's side: the bench empties the events queue instead).
        for coroutine in (
            app.keep_gc_young(stop),
            self.edge.watch_store(stop),
            self.edge.monitor_load(stop),
            app.watch_notify_queues(notify, metrics, stop),
            notify.publisher.run(stop),
            recorder.run(stop),
            self._keep_records(),
        ):
            self.tasks.append(loop.create_task(coroutine))
        await self._settle()

    async def _keep_records(self) -> None:
        while not self.stop.is_set():
            await self._take_records(1.0)

    async def _take_records(self, block: float) -> None:
        delivery = await self.handoff.read(count=500, block=block)
        if delivery is not None:
            self.records += len(delivery.records)
            await delivery.ack()

    records = 0

    async def close(self) -> None:
        self.stop.set()
        for _ in range(5):
            self.virtual += 10.0
            await self._settle()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        # What the recorder wrote as it stopped, after the reader's last turn.
        while await self.handoff.backlog():
            await self._take_records(0.0)
        self.edge.close()
        await self.transport.close()
        await self.notify.close()

    async def _settle(self) -> None:
        """Run the loop until nothing is ready: every task woken by the last message (or the
        last move of the clock) has run."""
        loop = asyncio.get_running_loop()
        ready = loop._ready  # type: ignore[attr-defined]
        await asyncio.sleep(0)
        while ready:
            await asyncio.sleep(0)

    async def deliver(self, data: bytes, source: tuple[str, int]) -> list[bytes]:
        """One datagram into the edge; what the edge sent meanwhile."""
        sock = self.socket
        sock.incoming.append((data, source))
        self.transport._on_readable()
        await self._settle()
        sent = [d for d, _addr in sock.sent]
        sock.sent.clear()
        return sent

    async def call(self, n: int) -> None:
        """One emergency call, start to end."""
        line = self.lines[n % len(self.lines)]
        out = await self.deliver(invite(n, line), UAC)
        downstream = next((d for d in out if d.startswith(b"INVITE ")), None)
        if downstream is None or b"Geolocation:" not in downstream:
            raise SystemExit(f"call {n}: no enriched INVITE left the edge: {out!r}")
        for status, reason in ((100, "Trying"), (180, "Ringing"), (200, "OK")):
            await self.deliver(answer(downstream, status, reason), TRUNK)
        await self.deliver(in_dialog("ACK", n, line, 102), UAC)
        out = await self.deliver(in_dialog("BYE", n, line, 103), UAC)
        bye = next((d for d in out if d.startswith(b"BYE ")), None)
        if bye is None:
            raise SystemExit(f"call {n}: the BYE was not forwarded: {out!r}")
        out = await self.deliver(answer(bye, 200, "OK"), TRUNK)
        if not any(d.startswith(b"SIP/2.0 200") for d in out):
            raise SystemExit(f"call {n}: the BYE's 200 was not relayed: {out!r}")
        self.calls += 1
        self.virtual += CALL_STEP
        if self.calls % TIMER_EVERY == 0:
            self.virtual += 64.0
            await self._settle()

    async def run(self, calls: int) -> float:
        """CPU µs per call."""
        first = self.calls
        start = time.process_time()
        for n in range(first, first + calls):
            await self.call(n)
        return (time.process_time() - start) / calls * 1e6


def log_to_devnull() -> None:
    """Log as app.run does (the default level, INFO: a line per forwarded emergency call),
    into /dev/null rather than the terminal: formatting is counted, a tty's speed is not."""
    logs.configure(from_mapping(config_mapping()).log.level)
    devnull = open(os.devnull, "w")  # noqa: SIM115 (open until the process exits)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler):
            handler.setStream(devnull)


async def measure(args: argparse.Namespace) -> None:
    log_to_devnull()
    app.tune_gc()
    bench = Bench(args.lines)
    await bench.start()
    try:
        if args.warmup:
            await bench.run(args.warmup)
        if args.profile:
            profiler = cProfile.Profile()
            profiler.enable()
            await bench.run(args.calls)
            profiler.disable()
            if args.profile_out:
                profiler.dump_stats(args.profile_out)
            stats = pstats.Stats(profiler)
            stats.sort_stats("tottime").print_stats(40)
            stats.sort_stats("cumulative").print_stats(40)
            return
        per_call = await bench.run(args.calls)
    finally:
        await bench.close()
    if not args.quiet:
        print(
            f"{per_call:.1f} us of CPU per emergency call (edge process, no sockets; "
            f"{args.calls} calls, {args.lines} lines, {bench.records} records written)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--lines", type=int, default=10_000, help="distinct provisioned lines")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--profile-out", help="with --profile: also write the pstats here")
    parser.add_argument("--quiet", action="store_true", help=argparse.SUPPRESS)
    add_callgrind_options(parser)
    args = parser.parse_args()
    if args.lines < 1:
        parser.error("--lines: at least 1")
    counts = callgrind_counts(parser, args)
    if counts is not None:
        run_callgrind(
            counts,
            script=Path(__file__),
            extra=["--quiet", "--lines", str(args.lines)],
            what="edge process, no sockets",
        )
        return
    asyncio.run(measure(args))


if __name__ == "__main__":
    main()
