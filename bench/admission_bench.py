"""Instructions per datagram on the UDP adapter's way in: the classifier, and the read.

    PYTHONPATH=src python bench/admission_bench.py --part classify [--kind K] [--calls N]
    PYTHONPATH=src python bench/admission_bench.py --part read [--burst N] [--calls N]
    PYTHONPATH=src python bench/admission_bench.py --callgrind [--part P] [--kind K]

- ``classify``: :func:`e911_sip.proxy.admission.classify` bound to the emergency policy as
  ``app`` binds it (:func:`e911_sip.app.datagram_classifier`), called on one message of
  ``--kind`` a call (a pool of 64 built before, so the figure holds no message building):
  ``emergency`` (an INVITE to 911: its Request-URI parsed, or found in the parser's cache),
  ``passthrough`` (an INVITE to another number: the policy says no, then the whole header
  block is searched for a To tag and none is found), ``reinvite`` (an INVITE with a To tag),
  ``info`` (an in-dialog INFO: the To tag found), ``options`` (out of dialog: no To tag),
  ``response`` and ``bye`` (told by their start line). Without ``--kind``, every kind;
- ``read``: one readiness callback of the real ``UdpTransport`` (``_on_readable``) on a
  loopback socket that holds ``--burst`` datagrams (a pass-through INVITE each), the
  datagrams classified, queued and handed to a sink that keeps nothing; the bench's own
  ``sendto`` of those datagrams is in the figure (the same before and after a change).

``--callgrind`` runs each measure twice under valgrind's callgrind (``bench/core_bench.py``'s
method: the difference of two runs' totals over the difference in calls,
``PYTHONHASHSEED=0``) and prints its instructions per call.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.core_bench import (  # noqa: E402
    SDP,
    add_callgrind_options,
    callgrind_counts,
    callgrind_instructions,
    in_dialog,
    invite,
)

from e911_sip.app import datagram_classifier  # noqa: E402
from e911_sip.proxy.admission import Priority  # noqa: E402
from e911_sip.sip.peer import Peer  # noqa: E402
from e911_sip.transport.udp import UdpOptions, UdpTransport  # noqa: E402

POOL = 64
"""Distinct messages of a kind, built before the measure and used in turn."""


def _response(n: int) -> bytes:
    return (
        "SIP/2.0 180 Ringing\r\n"
        f"Via: SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bK-uac-{n}-inv\r\n"
        f"From: <sip:3215551234@127.0.0.1>;tag={n}SIPpTag00\r\n"
        "To: <sip:3215550000@127.0.0.1:5070>;tag=uas1\r\n"
        f"Call-ID: {n}-bench@127.0.0.1\r\n"
        "CSeq: 102 INVITE\r\n"
        "Content-Length: 0\r\n\r\n"
    ).encode()


def _options(n: int) -> bytes:
    return in_dialog("OPTIONS", n, 1).replace(b";tag=uas1", b"")


KINDS: dict[str, Callable[[int], bytes]] = {
    "emergency": lambda n: invite(n, "911"),
    "passthrough": lambda n: invite(n, "3215550000"),
    "reinvite": lambda n: in_dialog("INVITE", n, 104, "3215550000") + SDP,
    "info": lambda n: in_dialog("INFO", n, 104, "3215550000"),
    "options": _options,
    "response": _response,
    "bye": lambda n: in_dialog("BYE", n, 103, "3215550000"),
}
EXPECTED = {
    "emergency": Priority.EMERGENCY,
    "passthrough": Priority.NEW,
    "reinvite": Priority.ONGOING,
    "info": Priority.ONGOING,
    "options": Priority.NEW,
    "response": Priority.ONGOING,
    "bye": Priority.ONGOING,
}


def bound_classify() -> Callable[[bytes], Priority]:
    """``classify`` bound as ``app`` binds it for the UDP adapter."""
    return datagram_classifier(frozenset({"911", "933"}))


def run_classify(calls: int, kind: str) -> None:
    pool = [KINDS[kind](n) for n in range(POOL)]
    fn = bound_classify()
    expected = EXPECTED[kind]
    for data in pool:
        if fn(data) is not expected:
            raise SystemExit(f"{kind}: classified {fn(data)!r}, not {expected!r}")
    for n in range(calls):
        fn(pool[n % POOL])


class _Sink:
    def message_received(self, data: bytes, source: Peer) -> None:
        return None

    def delivery_failed(self, branch: str | None, peer: Peer, reason: str) -> None:
        return None


async def _read(calls: int, burst: int) -> None:
    transport = UdpTransport(
        _Sink(), host="127.0.0.1", port=0, options=UdpOptions(classify=bound_classify())
    )
    await transport.start()
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        client.bind(("127.0.0.1", 0))
        target = ("127.0.0.1", transport.port)
        pool = [invite(n, "3215550000") for n in range(POOL)]
        on_readable = transport._on_readable
        sendto = client.sendto
        # The loop never gets a turn here: each callback is called directly, after the
        # datagrams it finds were sent (loopback delivers them before sendto returns).
        for n in range(calls):
            for k in range(burst):
                sendto(pool[(n + k) % POOL], target)
            on_readable()
        if transport.queue_depth:
            raise SystemExit(f"{transport.queue_depth} datagrams left queued")
    finally:
        client.close()
        await transport.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--part", choices=("classify", "read"), default=None)
    parser.add_argument("--kind", choices=sorted(KINDS), default=None)
    parser.add_argument("--burst", type=int, default=1, help="datagrams per readiness callback")
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--warmup", type=int, default=0, help=argparse.SUPPRESS)
    add_callgrind_options(parser)
    parser.set_defaults(callgrind_calls="2000,6000")
    args = parser.parse_args()
    counts = callgrind_counts(parser, args)
    parts = [args.part] if args.part else ["classify", "read"]
    if counts is not None:
        measures: list[tuple[tuple[str, ...], str, str]] = []
        for part in parts:
            if part == "classify":
                for kind in [args.kind] if args.kind else list(KINDS):
                    extra = ("--part", "classify", "--kind", kind)
                    measures.append((extra, f"classify, {kind}", "message"))
            else:
                extra = ("--part", "read", "--burst", str(args.burst))
                what = f"one readiness callback, {args.burst} datagram(s) waiting"
                measures.append((extra, what, "callback"))

        def measure(extra: tuple[str, ...], what: str, call: str) -> str:
            low, high = counts
            with tempfile.TemporaryDirectory(prefix="bench-callgrind-") as tmp:
                totals = [
                    callgrind_instructions(calls, Path(tmp), script=Path(__file__), extra=extra)[0]
                    for calls in (low, high)
                ]
            per_call = (totals[1] - totals[0]) / (high - low)
            return (
                f"{per_call:,.0f} instructions per {call} ({what}; "
                f"difference of the {high}- and {low}-call runs)\n"
            )

        # Side by side: valgrind's start-up of the interpreter is most of each run.
        with ThreadPoolExecutor(max_workers=min(4, len(measures))) as pool:
            for text in pool.map(lambda m: measure(*m), measures):
                print(text, end="", flush=True)
        return
    for part in parts:
        if part == "classify":
            for kind in [args.kind] if args.kind else list(KINDS):
                run_classify(args.calls, kind)
        else:
            asyncio.run(_read(args.calls, args.burst))


if __name__ == "__main__":
    main()
