"""The core with its transaction table full: what a new call and a timer tick cost there.

Over UDP a finished transaction lingers 32 s, so at a steady 2,400 calls/s the table reaches
``max_transactions`` (150,000) with most of it finished; from then on every new request
evicts the oldest finished ones. This drives a ProxyCore with the pass-through calls of
:mod:`core_bench` at ``--rate`` calls per simulated second, running its timers once per wheel
tick as the edge does, and prints for each simulated second the CPU per call, the
transactions evicted per call and the CPU the timers took. A cost that grows with the table
shows as a per-call figure that climbs once the table is full:

    python bench/full_table.py [--transactions 150000] [--rate 2400] [--seconds 40]

CPU time, not instructions: a run is hundreds of thousands of calls, hours under callgrind.
The effects looked for are many times the host's noise.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from core_bench import UAC, UAS, answer, in_dialog, invite  # noqa: E402
from e911_sip.app import tune_gc  # noqa: E402
from e911_sip.policy.emergency import emergency_number  # noqa: E402
from e911_sip.proxy.core import Evicted, ProxyCore, ProxyOptions  # noqa: E402
from e911_sip.proxy.routing import LocalAddress  # noqa: E402

NUMBER = "3215550000"


def call(core: ProxyCore, n: int, now: float) -> int:
    """One pass-through call, INVITE to the BYE's 200; the transactions evicted for it."""
    evicted = 0
    core.receive(invite(n, NUMBER), UAC, now)
    downstream = core.data_to_send()[0].data  # the INVITE, before the 100 Trying
    for status, reason in ((100, "Trying"), (180, "Ringing"), (200, "OK")):
        core.receive(answer(downstream, status, reason), UAS, now)
    core.receive(in_dialog("ACK", n, 102, NUMBER), UAC, now)
    core.receive(in_dialog("BYE", n, 103, NUMBER), UAC, now)
    bye = core.data_to_send()[-1].data
    core.receive(answer(bye, 200, "OK"), UAS, now)
    core.data_to_send()
    while (event := core.next_event()) is not None:
        if isinstance(event, Evicted):
            evicted += event.transactions
    return evicted


def main() -> None:
    tune_gc()
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--transactions", type=int, default=150_000, help="max_transactions")
    parser.add_argument("--rate", type=int, default=2400, help="calls per simulated second")
    parser.add_argument("--seconds", type=int, default=40, help="simulated seconds")
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
    n = 0
    per_tick = args.rate / TICKS
    owed = 0.0
    for second in range(args.seconds):
        calls = evicted = 0
        call_cpu = timer_cpu = 0.0
        biggest = 0
        for tick in range(TICKS):
            now = second + tick / TICKS
            left = core.transactions_in_flight
            started = time.process_time()
            core.handle_timer(now)
            timer_cpu += time.process_time() - started
            biggest = max(biggest, left - core.transactions_in_flight)
            owed += per_tick
            started = time.process_time()
            while owed >= 1:
                evicted += call(core, n, now)
                n += 1
                calls += 1
                owed -= 1
            call_cpu += time.process_time() - started
        print(
            f"{second + 1:3d} s: {core.transactions_in_flight:7,} transactions "
            f"({core.transactions_working:,} working); "
            f"{call_cpu / calls * 1e6:6.1f} us per call, {evicted / calls:4.1f} evicted per call; "
            f"timers {timer_cpu * 1e3:6.1f} ms/s, at most {biggest:,} ended in one tick",
            flush=True,
        )


TICKS = 64
"""handle_timer runs once per wheel tick, as the edge's one call_at does."""


if __name__ == "__main__":
    main()
