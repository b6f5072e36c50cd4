"""CPU per parse of the four messages of core_bench.py's call, and per relay-style reading.

    PYTHONPATH=src python bench/parse_bench.py [--rounds N]

Every parse is of a message of a different call, as in real traffic (no Via or Call-ID
repeats). ``parse`` is timed alone on an INVITE (with SDP), a 200 OK with SDP, an ACK and a BYE as
core_bench.py writes them; ``parse+read`` also reads what the proxy core reads of every
message (top Via and its branch, Call-ID, CSeq, To and From tags, Max-Forwards) and
serialises it after a change (a Via pushed, or the top one popped).

``--opcodes`` counts the Python bytecode instructions each takes instead (``sys.settrace``
with opcode events): not CPU time, but repeatable on a shared machine, where the timings
are not.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType

sys.path.insert(0, str(Path(__file__).resolve().parent))

from core_bench import SDP, answer, in_dialog, invite  # noqa: E402
from e911_sip.sip.message import Request, parse  # noqa: E402


def samples(n: int = 7) -> dict[str, bytes]:
    """The messages of call ``n``: each call has its own branches, tags and Call-ID."""
    inv = invite(n)
    ok = answer(inv, 200, "OK").replace(
        b"Content-Length: 0\r\n",
        b"Content-Type: application/sdp\r\nContent-Length: %d\r\n" % len(SDP),
    )
    return {
        "INVITE": inv,
        "200 OK+SDP": ok + SDP,
        "ACK": in_dialog("ACK", n, 102),
        "BYE": in_dialog("BYE", n, 103),
    }


def calls(name: str, count: int, first: int = 0) -> list[bytes]:
    """Message ``name`` of ``count`` distinct calls: no parse meets a Via it has seen."""
    return [samples(first + n)[name] for n in range(count)]


def parse_only(messages: list[bytes]) -> float:
    start = time.process_time()
    for data in messages:
        parse(data)
    return (time.process_time() - start) / len(messages) * 1e6


def read_and_relay(data: bytes) -> None:
    m = parse(data)
    _ = m.top_via.branch, m.call_id, m.cseq, m.to_tag, m.from_tag
    if isinstance(m, Request):
        _ = m.max_forwards
        out = m.prepend("Via", "SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bKbench")
    else:
        out = m.pop_top_via()
    out.to_bytes()


def parse_and_read(messages: list[bytes]) -> float:
    start = time.process_time()
    for data in messages:
        read_and_relay(data)
    return (time.process_time() - start) / len(messages) * 1e6


def opcodes(work: Callable[[bytes], object], name: str) -> int:
    count = 0

    def tracer(frame: FrameType, event: str, arg: object) -> Callable[..., object]:
        nonlocal count
        frame.f_trace_opcodes = True
        if event == "opcode":
            count += 1
        return tracer

    work(samples(1)[name])
    data = samples(2)[name]
    sys.settrace(tracer)
    work(data)
    sys.settrace(None)
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=2000, help="parses per batch")
    parser.add_argument("--batches", type=int, default=15, help="the fastest batch counts")
    parser.add_argument("--opcodes", action="store_true", help="count opcodes, not time")
    args = parser.parse_args()
    if args.opcodes:
        for name in samples():
            only = opcodes(parse, name)
            read = opcodes(read_and_relay, name)
            print(f"{name:12} parse {only:5} opcodes   parse+read+relay {read:5} opcodes")
        return
    for name in samples():
        parse_only(calls(name, 1000, args.rounds * args.batches))
        # The minimum over short batches: on a shared machine the slower ones were waiting.
        batches = [calls(name, args.rounds, b * args.rounds) for b in range(args.batches)]
        best = min(parse_only(batch) for batch in batches)
        batches = [calls(name, args.rounds, (b + 100) * args.rounds) for b in range(args.batches)]
        read = min(parse_and_read(batch) for batch in batches)
        print(f"{name:12} parse {best:6.2f} us   parse+read+relay {read:6.2f} us")


if __name__ == "__main__":
    main()
