"""The core with its transaction table full: what a new call and a timer tick cost there.

Over UDP a finished transaction lingers 32 s, so at a steady 2,400 calls/s the table reaches
``max_transactions`` (150,000) with most of it finished; from then on every new request
evicts the oldest finished ones. This drives a ProxyCore through whole calls (INVITE/100/
180/200/ACK/BYE/200, as :mod:`core_bench`) of ``--kind`` at ``--rate`` calls per simulated
second, running its timers once per wheel tick and :func:`e911_sip.app.gc_pass` every 0.1 s
of that clock, as the edge does. Pass-through calls reach the bound after about
``150,000 / (3 * rate)`` seconds and evict from then on; emergency calls, whose INVITE
transactions are never evicted, reach it above about 2,350 calls/s.

For each simulated second it prints the CPU per call, the wall time per call, the
transactions evicted per call, the CPU the timers and the collector took; at the end the
slowest single calls and collector passes (a stall is one call that took 100 ms). A cost
that grows with the table shows as a per-call figure that climbs once the table is full:

    python bench/full_table.py [--kind passthrough|emergency] [--transactions 150000]
                               [--rate 2400] [--seconds 40] [--top 10]

CPU time, not instructions: a run is hundreds of thousands of calls, hours under callgrind.
The effects looked for are many times the host's noise. The wall times and the slowest
calls want a quiet host, and builds compared alternately.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from core_bench import KINDS, UAC, UAS, answer, in_dialog, invite  # noqa: E402
from e911_sip.app import gc_pass, tune_gc  # noqa: E402
from e911_sip.policy.emergency import emergency_number  # noqa: E402
from e911_sip.proxy.core import EmergencyCall, Evicted, ProxyCore, ProxyOptions  # noqa: E402
from e911_sip.proxy.routing import LocalAddress  # noqa: E402

TICKS = 64
"""handle_timer runs once per wheel tick, as the edge's one call_at does."""

GC_EVERY = 0.1
"""Simulated seconds between collector passes, as the edge's keep_gc_young."""


def drain(core: ProxyCore, now: float) -> int:
    """Take the core's events: forward an emergency call as the edge would once its
    location is known; the transactions evicted."""
    evicted = 0
    while (event := core.next_event()) is not None:
        if isinstance(event, EmergencyCall):
            core.forward_emergency(event.call, event.request, now)
        elif isinstance(event, Evicted):
            evicted += event.transactions
    return evicted


def call(core: ProxyCore, n: int, number: str, now: float) -> int:
    """One call to ``number``, INVITE to the BYE's 200; the transactions evicted for it."""
    core.receive(invite(n, number), UAC, now)
    # A pass-through INVITE went at once, the 100 Trying after it; an emergency one's 100 is
    # held until the INVITE has gone.
    first = core.data_to_send()
    evicted = drain(core, now)
    downstream = (core.data_to_send() or first)[0].data
    for status, reason in ((100, "Trying"), (180, "Ringing"), (200, "OK")):
        core.receive(answer(downstream, status, reason), UAS, now)
        core.data_to_send()
    core.receive(in_dialog("ACK", n, 102, number), UAC, now)
    core.data_to_send()
    core.receive(in_dialog("BYE", n, 103, number), UAC, now)
    bye = core.data_to_send()[-1].data
    core.receive(answer(bye, 200, "OK"), UAS, now)
    core.data_to_send()
    return evicted + drain(core, now)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kind", choices=sorted(KINDS), default="passthrough")
    parser.add_argument("--transactions", type=int, default=150_000, help="max_transactions")
    parser.add_argument("--rate", type=float, default=2400.0, help="calls per simulated second")
    parser.add_argument("--seconds", type=int, default=40, help="simulated seconds")
    parser.add_argument("--top", type=int, default=10, help="slowest calls and passes shown")
    args = parser.parse_args()
    options = ProxyOptions(
        local=(LocalAddress("udp", "127.0.0.1", 5070),),
        emergency_classifier=functools.partial(emergency_number, numbers=frozenset({"911"})),
        emergency_trunks=("sip:127.0.0.1:5080",),
        default_trunks=("sip:127.0.0.1:5080",),
        max_transactions=args.transactions,
        shed_transactions=args.transactions,
        max_contexts=args.transactions,
    )
    core = ProxyCore(options=options, entropy=os.urandom)
    tune_gc()
    number = KINDS[args.kind]
    n = 0
    per_tick = args.rate / TICKS
    owed = 0.0
    next_gc = GC_EVERY
    slowest: list[tuple[float, int]] = []  # (wall seconds, call), the top kept as it goes
    passes: list[tuple[float, int]] = []
    began = time.perf_counter()
    for second in range(args.seconds):
        calls = evicted = 0
        call_cpu = call_wall = timer_cpu = gc_cpu = 0.0
        biggest = 0
        for tick in range(TICKS):
            now = second + tick / TICKS
            left = core.transactions_in_flight
            started = time.process_time()
            core.handle_timer(now)
            core.data_to_send()
            evicted += drain(core, now)
            timer_cpu += time.process_time() - started
            biggest = max(biggest, left - core.transactions_in_flight)
            owed += per_tick
            started = time.process_time()
            while owed >= 1:
                t0 = time.perf_counter()
                evicted += call(core, n, number, now)
                wall = time.perf_counter() - t0
                call_wall += wall
                if len(slowest) < args.top or wall > slowest[0][0]:
                    slowest = sorted([*slowest, (wall, n)])[-args.top :]
                n += 1
                calls += 1
                owed -= 1
            call_cpu += time.process_time() - started
            if now >= next_gc:
                started = time.process_time()
                t0 = time.perf_counter()
                gc_pass()
                passes.append((time.perf_counter() - t0, n))
                gc_cpu += time.process_time() - started
                next_gc += GC_EVERY
        per_call = max(calls, 1)
        print(
            f"{second + 1:3d} s: {core.transactions_in_flight:7,} transactions "
            f"({core.transactions_working:,} working); "
            f"{call_cpu / per_call * 1e6:6.1f} us CPU, {call_wall / per_call * 1e6:6.1f} us wall "
            f"per call, {evicted / per_call:4.1f} evicted per call; "
            f"timers {timer_cpu * 1e3:6.1f} ms/s, at most {biggest:,} ended in one tick; "
            f"collector {gc_cpu * 1e3:5.1f} ms/s",
            flush=True,
        )
    total = time.perf_counter() - began
    print(
        f"{args.kind}, {args.rate:g} calls/s for {args.seconds} simulated s: {n:,} calls "
        f"in {total:.1f} s of wall time"
    )
    print(
        "slowest calls (ms @ call):",
        ", ".join(f"{d * 1e3:.1f} @ {i}" for d, i in reversed(slowest)),
    )
    worst = sorted(passes, reverse=True)[: args.top]
    print(
        "slowest collector passes (ms @ call):",
        ", ".join(f"{d * 1e3:.1f} @ {i}" for d, i in worst),
    )


if __name__ == "__main__":
    main()
