"""CPU cost of one emergency call in the sans-IO core, without sockets.

Drives ProxyCore through a full INVITE/100/180/200/ACK/BYE/200 flow with enrichment, many
times, and reports microseconds of CPU per call. It isolates the Python work from the kernel's
(sendto/recvfrom), so a change to the parser or the core can be judged on its own.

    python bench/core_bench.py [--calls N] [--warmup N] [--profile] [--kind passthrough]
    python bench/core_bench.py --callgrind [--callgrind-calls 200,400]
    python bench/core_bench.py --held [--calls N] [--kind passthrough]

On a shared machine CPU time varies; instruction counts do not. ``--callgrind`` runs this
script twice under ``valgrind --tool=callgrind`` (``--warmup 0``, 200 and then 400 calls by
default, ``PYTHONHASHSEED=0``) and prints the instructions per call from the difference of the
two totals divided by the difference in calls: interpreter start-up, imports and the first
call's one-off costs are in both runs and cancel out. Two more runs measure the bench's own
work (building the caller's and the trunk's messages, ``--harness-only``: about 300,000
instructions per call, a quarter of the compiled core's figure before it was subtracted),
and the last line is the core's alone: the difference. Both call counts are multiples of
``TIMER_EVERY``, so the difference includes the timer sweeps that retire the transactions,
as a running edge's would. Needs valgrind (``apt-get install valgrind``); it takes a minute
or two (valgrind runs Python about 50 times slower).

``--held`` runs ``--calls`` calls with no timer run and prints the memory (tracemalloc) and
the collector-tracked objects the core holds per finished call: what each call leaves for
the 32 s its transactions linger over UDP, which above about 2,350 911 calls/s sets the
edge's memory (a 911 call's INVITE transactions are never evicted).
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import gc
import os
import pstats
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.callers import DEFAULT_LINES, FIRST_LINE  # noqa: E402

from e911_sip.app import tune_gc  # noqa: E402
from e911_sip.policy.emergency import caller_line, emergency_number  # noqa: E402
from e911_sip.policy.enrich import EnrichOptions, enrich  # noqa: E402
from e911_sip.proxy.core import EmergencyCall, ProxyCore, ProxyOptions  # noqa: E402
from e911_sip.proxy.routing import LocalAddress  # noqa: E402
from e911_sip.sip.peer import Peer  # noqa: E402

UAC = Peer("udp", "127.0.0.1", 5060)
UAS = Peer("udp", "127.0.0.1", 5080)
SDP = (
    b"v=0\r\no=- 659841 659841 IN IP4 127.0.0.1\r\ns=Talk\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
    b"m=audio 16006 RTP/AVP 0 101\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:101 telephone-event/8000\r\n"
)


def caller(n: int) -> str:
    """The line call ``n`` comes from: one of the load benchmark's lines in turn, as a
    softswitch's calls come from thousands of lines. With every call from one line, the
    parser's URI caches would answer for the caller's URIs and the figure would measure
    them, not the reading of a caller never seen."""
    return str(FIRST_LINE + n % DEFAULT_LINES)


def invite(n: int, number: str = "911") -> bytes:
    line = caller(n)
    head = (
        f"INVITE sip:{number}@127.0.0.1:5070 SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bK-uac-{n}-inv\r\n"
        "Max-Forwards: 70\r\n"
        f"From: <sip:{line}@127.0.0.1>;tag={n}SIPpTag00\r\n"
        f"To: <sip:{number}@127.0.0.1:5070>\r\n"
        f"Call-ID: {n}-bench@127.0.0.1\r\n"
        "CSeq: 102 INVITE\r\n"
        f"Contact: <sip:{line}@127.0.0.1:5060;transport=UDP>\r\n"
        f"P-Asserted-Identity: <sip:+1{line}@127.0.0.1>\r\n"
        "User-Agent: PortaSIP\r\n"
        "Identity: eyJhbGciOiJFUzI1NiJ9.eyJhdHRlc3QiOiJBIn0.c2ln;info=<https://cert.example/a.pem>;alg=ES256;ppt=shaken\r\n"
        "Allow: INVITE, ACK, BYE, CANCEL, OPTIONS, NOTIFY, REGISTER, SUBSCRIBE, REFER\r\n"
        "Accept: application/sdp, application/pidf+xml\r\n"
        "Content-Type: application/sdp\r\n"
        f"Content-Length: {len(SDP)}\r\n\r\n"
    )
    return head.encode() + SDP


_HEADER = re.compile(rb"^(Via|From|To|Call-ID|CSeq|Record-Route): (.*)$", re.M)


def answer(request: bytes, status: int, reason: str) -> bytes:
    """A UAS answer that copies Vias as SIPp's [last_Via:] does: one comma-joined line.

    Built with one regex pass so that the harness costs little next to the code measured.
    """
    head = request[: request.index(b"\r\n\r\n")]
    vias: list[bytes] = []
    lines = [f"SIP/2.0 {status} {reason}".encode()]
    for name, value in _HEADER.findall(head):
        value = value.rstrip(b"\r")
        if name == b"Via":
            vias.append(value)
        elif name == b"To" and status != 100 and b";tag=" not in value:
            lines.append(b"To: " + value + b";tag=uas1")
        else:
            lines.append(name + b": " + value)
    lines.insert(1, b"Via: " + b", ".join(vias))
    lines.append(b"Contact: <sip:127.0.0.1:5080>")
    lines.append(b"Content-Length: 0")
    return b"\r\n".join(lines) + b"\r\n\r\n"


def in_dialog(method: str, n: int, cseq: int, number: str = "911") -> bytes:
    return (
        f"{method} sip:127.0.0.1:5080 SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bK-uac-{n}-{method.lower()}\r\n"
        "Route: <sip:127.0.0.1:5070;lr>\r\n"
        "Max-Forwards: 70\r\n"
        f"From: <sip:{caller(n)}@127.0.0.1>;tag={n}SIPpTag00\r\n"
        f"To: <sip:{number}@127.0.0.1:5070>;tag=uas1\r\n"
        f"Call-ID: {n}-bench@127.0.0.1\r\n"
        f"CSeq: {cseq} {method}\r\n"
        "Content-Length: 0\r\n\r\n"
    ).encode()


# Every this many calls the core's timers run, 64 s of simulated time later: each transaction
# of the calls so far has ended by then and is retired.
TIMER_EVERY = 100


KINDS = {"emergency": "911", "passthrough": "3215550000"}
"""What each ``--kind`` of call dials: 911 is enriched and goes to the emergency trunk, any
other number passes through to the default trunk (the same path minus enrichment)."""


def make_core(kind: str = "emergency", **settings: int) -> ProxyCore:
    """The core the bench drives: one UDP address, 911 to the emergency trunk and, for
    ``kind`` passthrough, every other number to the default trunk."""
    options = ProxyOptions(
        local=(LocalAddress("udp", "127.0.0.1", 5070),),
        emergency_classifier=functools.partial(emergency_number, numbers=frozenset({"911"})),
        emergency_trunks=("sip:127.0.0.1:5080",),
        default_trunks=("sip:127.0.0.1:5080",) if kind == "passthrough" else (),
        **settings,
    )
    return ProxyCore(options=options, entropy=os.urandom)


def run(
    calls: int,
    kind: str = "emergency",
    *,
    core: ProxyCore | None = None,
    first: int = 0,
    retire: bool = True,
) -> float:
    """CPU µs per call of ``calls`` whole calls (numbered from ``first``) through ``core``
    (a new one by default); with ``retire`` the timers run every ``TIMER_EVERY`` calls, 64 s
    later, as a running edge's would, and without it every finished transaction stays."""
    number = KINDS[kind]
    if core is None:
        core = make_core(kind)
    enrich_options = EnrichOptions()
    now = 0.0
    start = time.process_time()
    for n in range(first, first + calls):
        core.receive(invite(n, number), UAC, now)
        # A pass-through INVITE went at once, the 100 Trying after it; an emergency one's
        # 100 is held until the enriched INVITE has gone.
        first = core.data_to_send()
        while (event := core.next_event()) is not None:
            if isinstance(event, EmergencyCall):
                line = caller_line(event.request)
                result = enrich(
                    event.request,
                    line=line,
                    provider_endpoint="5555555/e911abc",
                    options=enrich_options,
                )
                core.forward_emergency(event.call, result.request, now)
        sent = core.data_to_send() or first
        downstream = sent[0].data  # the INVITE, before the 100
        for status, reason in ((100, "Trying"), (180, "Ringing"), (200, "OK")):
            core.receive(answer(downstream, status, reason), UAS, now)
            core.data_to_send()
        core.receive(in_dialog("ACK", n, 102, number), UAC, now)
        core.data_to_send()
        core.receive(in_dialog("BYE", n, 103, number), UAC, now)
        bye = core.data_to_send()[0].data
        core.receive(answer(bye, 200, "OK"), UAS, now)
        core.data_to_send()
        while core.next_event() is not None:
            pass
        now += 0.001
        if retire and n % TIMER_EVERY == TIMER_EVERY - 1:
            core.handle_timer(now + 64)
    elapsed = time.process_time() - start
    return elapsed / calls * 1e6


def held(calls: int, kind: str = "emergency") -> tuple[float, float]:
    """(bytes, collector-tracked objects) the core holds per finished call: ``calls`` whole
    calls with no timer run, so that each call's transactions stay as they do for the 32 s
    of Timers J, K, L and M over UDP (a 911 call's INVITE transactions, never evicted, above
    all). Measured with tracemalloc and ``gc.get_objects()`` against the same core after a
    first round of calls that fills its caches."""
    core = make_core(kind, max_transactions=4 * (calls + 1000))
    run(1000, kind, core=core, retire=False)
    gc.collect()
    objects = len(gc.get_objects())
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    run(calls, kind, core=core, first=1000, retire=False)
    gc.collect()
    size = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    return size / calls, (len(gc.get_objects()) - objects) / calls


def run_harness(calls: int, kind: str = "emergency") -> None:
    """The bench's own share of :func:`run`: every message it builds for ``calls`` calls
    (the INVITE, the trunk's three answers, the ACK, the BYE and its answer), built the same
    way from a downstream INVITE and BYE the core sent once, with no core work per call.
    ``--callgrind`` subtracts it, so that the figure is the core's alone."""
    number = KINDS[kind]
    options = ProxyOptions(
        local=(LocalAddress("udp", "127.0.0.1", 5070),),
        emergency_classifier=functools.partial(emergency_number, numbers=frozenset({"911"})),
        emergency_trunks=("sip:127.0.0.1:5080",),
        default_trunks=("sip:127.0.0.1:5080",),
    )
    core = ProxyCore(options=options, entropy=os.urandom)
    # A pass-through INVITE goes out at once: the same size of message as an enriched one
    # to within the enrichment's headers, which only the emergency run carries.
    core.receive(invite(0, "3215550000"), UAC, 0.0)
    downstream = core.data_to_send()[0].data  # the INVITE, before the 100 Trying
    core.receive(answer(downstream, 200, "OK"), UAS, 0.0)
    core.data_to_send()
    core.receive(in_dialog("BYE", 0, 103, "3215550000"), UAC, 0.0)
    bye = core.data_to_send()[0].data
    for n in range(calls):
        invite(n, number)
        for status, reason in ((100, "Trying"), (180, "Ringing"), (200, "OK")):
            answer(downstream, status, reason)
        in_dialog("ACK", n, 102, number)
        in_dialog("BYE", n, 103, number)
        answer(bye, 200, "OK")


_TOTAL = re.compile(r"^(?:summary|totals):\s*(\d+)", re.M)


def callgrind_instructions(
    calls: int, workdir: Path, *, script: Path | None = None, extra: Sequence[str] = ()
) -> tuple[int, float]:
    """(instructions executed, wall seconds) of ``script`` (this one by default, or another
    bench with the same ``--warmup`` and ``--calls`` options, given ``extra`` arguments)
    with ``calls`` calls under callgrind. The interpreter is ``sys.executable``, the binary
    itself even when started through a pyenv shim (a script valgrind would follow)."""
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        raise SystemExit("--callgrind needs valgrind (apt-get install valgrind)")
    out = workdir / f"callgrind.out.{calls}"
    command = [
        valgrind,
        "--tool=callgrind",
        f"--callgrind-out-file={out}",
        sys.executable,
        str((script or Path(__file__)).resolve()),
        "--warmup",
        "0",
        *extra,
        "--calls",
        str(calls),
    ]
    # A fixed hash seed: dict and set layouts, hence the instructions, repeat from run to run.
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    started = time.monotonic()
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    wall = time.monotonic() - started
    if done.returncode != 0:
        raise SystemExit(f"callgrind run with {calls} calls failed:\n{done.stderr[-3000:]}")
    match = _TOTAL.search(out.read_text())
    if match is None:
        raise SystemExit(f"no instruction total in {out}")
    return int(match.group(1)), wall


def run_callgrind(
    counts: list[int],
    *,
    script: Path | None = None,
    extra: Sequence[str] = (),
    what: str = "core + enrichment, no I/O",
    call: str = "emergency call",
) -> float:
    """Instructions per call from two callgrind runs with different numbers of calls (of
    this bench, or of ``script`` with ``extra`` arguments, measuring ``what``); printed and
    returned."""
    low, high = counts
    with tempfile.TemporaryDirectory(prefix="bench-callgrind-") as tmp:
        totals = {}
        for calls in (low, high):
            totals[calls], wall = callgrind_instructions(
                calls, Path(tmp), script=script, extra=extra
            )
            print(f"{calls} calls: {totals[calls]:,} instructions ({wall:.0f} s under callgrind)")
    per_call = (totals[high] - totals[low]) / (high - low)
    print(
        f"{per_call:,.0f} instructions per {call} ({what}; "
        f"difference of the {high}- and {low}-call runs)"
    )
    return per_call


def add_callgrind_options(parser: argparse.ArgumentParser) -> None:
    """``--callgrind`` and ``--callgrind-calls``, as every bench measured this way has them."""
    parser.add_argument(
        "--callgrind",
        action="store_true",
        help="instructions per call from two runs under valgrind's callgrind",
    )
    parser.add_argument(
        "--callgrind-calls",
        default="200,400",
        help=f"the two call counts of --callgrind, multiples of {TIMER_EVERY} (default 200,400)",
    )


def callgrind_counts(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[int] | None:
    """The two call counts ``--callgrind`` asks for, checked; None without ``--callgrind``."""
    if not args.callgrind:
        return None
    try:
        counts = sorted(int(part) for part in args.callgrind_calls.split(","))
    except ValueError:
        parser.error("--callgrind-calls: two integers separated by a comma")
    if len(counts) != 2 or counts[0] <= 0 or counts[0] == counts[1]:
        parser.error("--callgrind-calls: two different positive call counts")
    if any(count % TIMER_EVERY for count in counts):
        parser.error(f"--callgrind-calls: multiples of {TIMER_EVERY}")
    return counts


def main() -> None:
    tune_gc()  # as the running edge does
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--warmup", type=int, default=500)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument(
        "--kind",
        choices=sorted(KINDS),
        default="emergency",
        help="an emergency call (enriched, to the emergency trunk; the default) or a "
        "pass-through call (any other number, to the default trunk)",
    )
    parser.add_argument(
        "--harness-only",
        action="store_true",
        help="build the bench's messages only, with no core work (what --callgrind subtracts)",
    )
    parser.add_argument(
        "--held",
        action="store_true",
        help="the memory the core holds per finished call (--calls calls, no timers run)",
    )
    add_callgrind_options(parser)
    args = parser.parse_args()
    counts = callgrind_counts(parser, args)
    emergency = args.kind == "emergency"
    call = "emergency call" if emergency else "pass-through call"
    what = "core + enrichment, no I/O" if emergency else "core, no I/O"
    if args.harness_only:
        run_harness(args.calls, args.kind)
        return
    if args.held:
        size, objects = held(args.calls, args.kind)
        print(
            f"{size:,.0f} bytes and {objects:.1f} collector-tracked objects held per finished "
            f"{call} (tracemalloc, {args.calls} calls, no timers run)"
        )
        return
    if counts is not None:
        total = run_callgrind(
            counts, extra=("--kind", args.kind), what=f"{what}, with the bench's", call=call
        )
        harness = run_callgrind(
            counts,
            extra=("--kind", args.kind, "--harness-only"),
            what="the bench's own message building",
            call=call,
        )
        print(f"{total - harness:,.0f} instructions per {call} ({what}; the core's alone)")
        return
    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        run(args.calls, args.kind)
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
        return
    if args.warmup:
        run(args.warmup, args.kind)
    print(f"{run(args.calls, args.kind):.1f} us of CPU per {call} ({what})")


if __name__ == "__main__":
    main()
