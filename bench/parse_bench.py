"""CPU per parse of the four messages of core_bench.py's call, and per relay-style reading.

    PYTHONPATH=src python bench/parse_bench.py [--rounds N]

``parse`` is timed alone on an INVITE (with SDP), a 200 OK with SDP, an ACK and a BYE as
core_bench.py writes them; ``parse+read`` also reads what the proxy core reads of every
message (top Via and its branch, Call-ID, CSeq, To and From tags, Max-Forwards) and
serialises it after a change (a Via pushed, then popped).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from core_bench import SDP, answer, in_dialog, invite  # noqa: E402
from e911_sip.sip.message import Request, parse  # noqa: E402


def samples() -> dict[str, bytes]:
    inv = invite(7)
    ok = answer(inv, 200, "OK").replace(
        b"Content-Length: 0\r\n",
        b"Content-Type: application/sdp\r\nContent-Length: %d\r\n" % len(SDP),
    )
    return {
        "INVITE": inv,
        "200 OK+SDP": ok + SDP,
        "ACK": in_dialog("ACK", 7, 102),
        "BYE": in_dialog("BYE", 7, 103),
    }


def parse_only(data: bytes, rounds: int) -> float:
    start = time.process_time()
    for _ in range(rounds):
        parse(data)
    return (time.process_time() - start) / rounds * 1e6


def parse_and_read(data: bytes, rounds: int) -> float:
    start = time.process_time()
    for _ in range(rounds):
        m = parse(data)
        _ = m.top_via.branch, m.call_id, m.cseq, m.to_tag, m.from_tag
        if isinstance(m, Request):
            _ = m.max_forwards
            out = m.prepend("Via", "SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bKbench")
        else:
            out = m.pop_top_via()
        out.to_bytes()
    return (time.process_time() - start) / rounds * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=2000, help="parses per batch")
    parser.add_argument("--batches", type=int, default=15, help="the fastest batch counts")
    args = parser.parse_args()
    for name, data in samples().items():
        parse_only(data, 1000)
        # The minimum over short batches: on a shared machine the slower ones were waiting.
        best = min(parse_only(data, args.rounds) for _ in range(args.batches))
        read = min(parse_and_read(data, args.rounds) for _ in range(args.batches))
        print(f"{name:12} parse {best:6.2f} us   parse+read+relay {read:6.2f} us")


if __name__ == "__main__":
    main()
