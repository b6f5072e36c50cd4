"""The sans-IO core at its transaction table's bound: the slowest calls, not the average.

Drives :class:`~e911_sip.proxy.core.ProxyCore` through whole calls (INVITE/100/180/200/ACK/
BYE/200, as ``bench/core_bench.py``) on a simulated clock at ``--rate`` calls per second for
``--seconds``, firing the timer wheel every 1/64 s and :func:`e911_sip.app.gc_pass` every
0.1 s of that clock, as the edge does. Over UDP a finished transaction stays 32 s, so the
table reaches its bound (``max_transactions``, 150,000) after about
``150,000 / (3 * rate)`` seconds of pass-through calls, and evicts from then on; with
emergency calls, whose transactions are never evicted, the bound is reached at about
2,350 calls/s.

Reports the wall time per call in windows of the run (the average of each window, so a
collapse past the bound shows) and the slowest single calls and collector passes (a stall
is one call that took 100 ms). Wall time, so run it on a quiet host and compare builds
alternately::

    PYTHONPATH=build/compiled python bench/table_bound.py --kind passthrough --rate 2600
    PYTHONPATH=build/compiled python bench/table_bound.py --kind emergency --rate 3000
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench import core_bench  # noqa: E402

from e911_sip.app import gc_pass, tune_gc  # noqa: E402
from e911_sip.policy.emergency import emergency_number  # noqa: E402
from e911_sip.proxy.core import EmergencyCall, ProxyCore, ProxyOptions  # noqa: E402
from e911_sip.proxy.routing import LocalAddress  # noqa: E402

TICK = 1 / 64
GC_EVERY = 0.1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kind", choices=tuple(core_bench.KINDS), default="passthrough")
    parser.add_argument("--rate", type=float, default=2600.0, help="calls per simulated second")
    parser.add_argument("--seconds", type=float, default=60.0, help="simulated seconds")
    parser.add_argument("--windows", type=int, default=12, help="windows of the report")
    parser.add_argument("--top", type=int, default=10, help="slowest calls and passes shown")
    args = parser.parse_args()
    options = ProxyOptions(
        local=(LocalAddress("udp", "127.0.0.1", 5070),),
        emergency_classifier=functools.partial(emergency_number, numbers=frozenset({"911"})),
        emergency_trunks=("sip:127.0.0.1:5080",),
        default_trunks=("sip:127.0.0.1:5080",),
    )
    core = ProxyCore(options=options, entropy=os.urandom)
    tune_gc()
    number = core_bench.KINDS[args.kind]
    calls = int(args.rate * args.seconds)
    step = 1 / args.rate
    now = next_tick = 0.0
    next_gc = GC_EVERY
    per_call: list[float] = []
    passes: list[tuple[float, int]] = []
    started = time.perf_counter()
    for n in range(calls):
        t0 = time.perf_counter()
        core.receive(core_bench.invite(n, number), core_bench.UAC, now)
        first = core.data_to_send()
        while (event := core.next_event()) is not None:
            if isinstance(event, EmergencyCall):
                core.forward_emergency(event.call, event.request, now)
        downstream = (core.data_to_send() or first)[0].data
        for status, reason in ((100, "Trying"), (180, "Ringing"), (200, "OK")):
            core.receive(core_bench.answer(downstream, status, reason), core_bench.UAS, now)
            core.data_to_send()
        core.receive(core_bench.in_dialog("ACK", n, 102, number), core_bench.UAC, now)
        core.data_to_send()
        core.receive(core_bench.in_dialog("BYE", n, 103, number), core_bench.UAC, now)
        bye = core.data_to_send()[0].data
        core.receive(core_bench.answer(bye, 200, "OK"), core_bench.UAS, now)
        core.data_to_send()
        while core.next_event() is not None:
            pass
        now += step
        if now >= next_tick:
            core.handle_timer(now)
            core.data_to_send()
            while core.next_event() is not None:
                pass
            next_tick = now + TICK
        per_call.append(time.perf_counter() - t0)
        if now >= next_gc:
            t1 = time.perf_counter()
            gc_pass()
            passes.append((time.perf_counter() - t1, n))
            next_gc = now + GC_EVERY
    total = time.perf_counter() - started
    print(
        f"{args.kind}, {args.rate:g} calls/s for {args.seconds:g} simulated s: {calls} calls "
        f"in {total:.1f} s of wall time ({total / calls * 1e6:.0f} µs a call); "
        f"{core.transactions_in_flight} transactions held at the end"
    )
    size = max(1, calls // args.windows)
    averages = [
        f"{sum(per_call[i : i + size]) / len(per_call[i : i + size]) * 1e6:.0f}"
        for i in range(0, calls, size)
    ]
    print(f"µs a call, by window of {size} calls: {' '.join(averages)}")
    slowest = sorted(((d, n) for n, d in enumerate(per_call)), reverse=True)[: args.top]
    print("slowest calls (ms @ call):", ", ".join(f"{d * 1e3:.1f} @ {n}" for d, n in slowest))
    worst = sorted(passes, reverse=True)[: args.top]
    print(
        "slowest collector passes (ms @ call):", ", ".join(f"{d * 1e3:.1f} @ {n}" for d, n in worst)
    )


if __name__ == "__main__":
    main()
