"""CPU per datagram of the supervisor's dispatcher (``[sip] workers`` above 1).

    PYTHONPATH=src python bench/dispatch_bench.py [--rounds N] [--workers N]

Every datagram is a message of a different call (core_bench.py's INVITE with SDP, about
1 KB), as in real traffic. Timed, each as the best of ``--rounds`` batches:

- ``find_call_id``: the Call-ID found with bytes operations, for ``Call-ID:`` (one find) and
  for the compact ``i:`` (the lower-cased header section is searched);
- ``pick``: the rendezvous hash over ``--workers`` live slots;
- ``forward``: the above plus the header and one ``send`` on an AF_UNIX datagram socketpair
  (the channel to a worker; drained between batches, outside the timing);
- ``on_readable``: the whole path from the shared UDP socket: ``recvfrom`` on loopback, the
  source header (cached per address), ``find_call_id``, ``pick``, ``send``. Datagrams are
  sent into the socket before each batch, so the dispatcher finds them all waiting;
- ``on_readable with claims``: the same with a TCP/TLS listener configured: the claims of
  every worker are read first (one ``recv`` per worker per batch) and each Call-ID is looked
  up in the claims table (a quarter of them claimed);
- ``on_readable, requests from outside``: the same datagrams from an address outside the
  trust domain (127.0.0.9), dropped after the read and the per-address lookup: what a
  flood from outside costs the host with workers.

The worker's side (``recv`` from the channel and the header decoded, cached) replaces the
``recvfrom`` a single edge makes, so the dispatcher's figure is the added cost per datagram
to the host, paid on the supervisor's core. A shared, noisy machine: the best batch is
quoted, and figures vary between runs.
"""

from __future__ import annotations

import argparse
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from core_bench import SDP, invite  # noqa: E402
from e911_sip.transport.dispatch import (  # noqa: E402
    Dispatcher,
    channel_pair,
    encode_source,
    find_call_id,
    pick,
)

BATCH = 200
"""Datagrams per timed batch: well under the socket buffers, so nothing is dropped."""


def messages(count: int, *, compact: bool = False) -> list[bytes]:
    out = []
    for n in range(count):
        data = invite(n) + SDP
        if compact:
            data = data.replace(b"\r\nCall-ID:", b"\r\ni:")
        out.append(data)
    return out


def best_of(rounds: int, batch: Callable[[], float]) -> float:
    """The lowest of ``rounds`` batch timings, in microseconds per datagram."""
    return min(batch() for _ in range(rounds)) / BATCH * 1e6


def drain(sock: socket.socket) -> int:
    n = 0
    while True:
        try:
            sock.recv(70_000)
        except BlockingIOError:
            return n
        n += 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    live = tuple(range(args.workers))
    plain = messages(BATCH)
    compact = messages(BATCH, compact=True)
    call_ids = [find_call_id(m) or b"" for m in plain]
    print(f"datagram: {len(plain[0])} bytes; {args.workers} live workers; best of {args.rounds}")

    def time_find(batch: list[bytes]) -> float:
        start = time.perf_counter()
        for data in batch:
            find_call_id(data)
        return time.perf_counter() - start

    def time_pick() -> float:
        start = time.perf_counter()
        for call_id in call_ids:
            pick(call_id, live)
        return time.perf_counter() - start

    shared = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    shared.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
    shared.bind(("127.0.0.1", 0))
    shared.setblocking(False)
    dispatcher = Dispatcher(shared, read_burst=BATCH, on_drop=lambda reason: None)
    workers = []
    for slot in live:
        ours, theirs = channel_pair()
        theirs.setblocking(False)
        dispatcher.attach(slot, ours)
        workers.append((ours, theirs))
    header = encode_source(("127.0.0.1", 5060))

    def time_forward() -> float:
        start = time.perf_counter()
        for data in plain:
            dispatcher.forward(header + data, find_call_id(data))
        elapsed = time.perf_counter() - start
        for _, theirs in workers:
            drain(theirs)
        return elapsed

    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    target = shared.getsockname()

    def time_readable() -> float:
        for data in plain:
            client.sendto(data, target)
        start = time.perf_counter()
        dispatcher.on_readable()
        elapsed = time.perf_counter() - start
        got = sum(drain(theirs) for _, theirs in workers)
        if got != BATCH:
            raise SystemExit(f"{got} of {BATCH} datagrams reached the workers")
        return elapsed

    def time_recv_only() -> float:
        for data in plain:
            client.sendto(data, target)
        start = time.perf_counter()
        for _ in range(BATCH):
            shared.recvfrom(65535)
        return time.perf_counter() - start

    claiming = Dispatcher(shared, read_burst=BATCH, on_drop=lambda reason: None, claims=True)
    claim_ends = []
    for slot in live:
        ours, theirs = channel_pair()
        theirs.setblocking(False)
        claiming._channels[slot] = ours  # attached without the event loop's reader
        claiming._live = tuple(sorted(claiming._channels))
        claiming.dispatched[slot] = 0
        claim_ends.append((ours, theirs))
    for call_id in call_ids[::4]:
        claim_ends[0][1].send(b"C" + call_id)
    claiming.read_claims()

    def time_readable_claims() -> float:
        for data in plain:
            client.sendto(data, target)
        start = time.perf_counter()
        claiming.on_readable()
        elapsed = time.perf_counter() - start
        got = sum(drain(theirs) for _, theirs in claim_ends)
        if got != BATCH:
            raise SystemExit(f"{got} of {BATCH} datagrams reached the workers")
        return elapsed

    guarded = Dispatcher(
        shared,
        read_burst=BATCH,
        on_drop=lambda reason: None,
        admit=lambda host: host == "127.0.0.1",
    )
    outsider = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    outsider.bind(("127.0.0.9", 0))

    def time_readable_outsider() -> float:
        for data in plain:
            outsider.sendto(data, target)
        start = time.perf_counter()
        guarded.on_readable()
        return time.perf_counter() - start

    rows = [
        ("find_call_id (Call-ID:)", best_of(args.rounds, lambda: time_find(plain))),
        ("find_call_id (compact i:)", best_of(args.rounds, lambda: time_find(compact))),
        (f"pick over {args.workers}", best_of(args.rounds, time_pick)),
        ("forward (find + pick + header + send)", best_of(args.rounds, time_forward)),
        ("recvfrom alone (for comparison)", best_of(args.rounds, time_recv_only)),
        ("on_readable (recvfrom + forward)", best_of(args.rounds, time_readable)),
        ("on_readable with claims", best_of(args.rounds, time_readable_claims)),
        ("on_readable, requests from outside", best_of(args.rounds, time_readable_outsider)),
    ]
    width = max(len(name) for name, _ in rows)
    for name, micros in rows:
        print(f"{name:<{width}}  {micros:6.2f} us/datagram")
    for ours, theirs in workers + claim_ends:
        ours.close()
        theirs.close()
    shared.close()
    client.close()
    outsider.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
