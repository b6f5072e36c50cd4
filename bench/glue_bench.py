"""Instructions per emergency call of the Python work around the core, part by part.

    PYTHONPATH=src python bench/glue_bench.py --part log|records|publish|notify|... [--calls N]
    PYTHONPATH=src python bench/glue_bench.py --callgrind [--part ...] [--callgrind-calls 200,400]

The parts the edge runs for every emergency call outside the core, each alone, with no
sockets and no event loop (a Redis client or pool that answers at once stands in for the
server; the edge's writes are packed into RESP as its own pipelined connection packs them,
and redis-py's packing of the notifier's commands is left out):

- ``log``: the JSON line "emergency call forwarded" (``logger.info`` with the call's fields
  through :func:`e911_sip.logs.configure`'s handler, into /dev/null);
- ``worker_log``: the same line written by an edge worker (its handler tagged by
  :func:`e911_sip.app.tag_worker_logs`, which imports the app);
- ``log_line``, ``worker_log_line``: the same two lines written by
  :func:`e911_sip.logline.emit_info` (straight to the handler) instead of ``logger.info``;
- ``records``: the call's record, fed the core's events and the enrichment as the edge does
  (:class:`~e911_sip.callrecords.recorder.CallRecorder`), finished, and written in batches
  of ``--batch`` through :class:`~e911_sip.callrecords.stream.RedisStreamSink` (the record's
  id, JSON, and the ``XADD`` or ``EVALSHA`` packed in RESP by
  :class:`~e911_sip.store.resp.RespStreamWriter`);
- ``publish``: the call's notification event made as the edge makes it, published, and
  written in batches of ``--batch`` by the :class:`~e911_sip.notify.dispatch.Publisher`
  through :class:`~e911_sip.notify.queue.RedisStreamQueue` and its
  :class:`~e911_sip.store.resp.RespStreamWriter` (the command packed in RESP);
- ``notify``: ``publish``, then the notifier's work on each batch without provisioning's
  lookup and the channels: the events taken from the stream (decoded), read, turned into one
  delivery for each of three targets, handed over to the deliveries stream (encoded), and
  the deliveries taken (decoded), read and acknowledged (a Redis client that keeps what is
  written and gives it back stands in for the server);
- ``metrics``: the counter increments and the histogram observation the edge makes per
  emergency call (children bound once, as the edge binds them);
- ``gc``: one pass of :func:`e911_sip.app.gc_pass` (the edge runs one every 0.1 s) after
  ``GC_PARSES`` INVITEs parsed, one of them kept alive; a "call" here is a pass with the
  parsing before it (the same before and after a change of the pass).

``--callgrind`` runs each part twice under valgrind's callgrind (``bench/core_bench.py``'s
method: the difference of two runs' totals over the difference in calls, ``PYTHONHASHSEED=0``)
and prints its instructions per call; the figures include the bench's few lines per call that
build the inputs (the same before and after a change). The parts run side by side. Only what
a part needs is imported (not the app, as core_bench.py does): start-up is in both runs of a
part and cancels out, but under valgrind it is most of the wait.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import logging
import os
import sys
import tempfile
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

PARTS = (
    "log",
    "worker_log",
    "log_line",
    "worker_log_line",
    "records",
    "publish",
    "notify",
    "metrics",
    "gc",
)

GC_PARSES = 20
"""INVITEs the ``gc`` part parses before each pass."""

INVITE = (
    b"INVITE sip:911@127.0.0.1:5070 SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bK-uac-0-inv\r\n"
    b"Max-Forwards: 70\r\n"
    b"From: <sip:3215550100@127.0.0.1:5060>;tag=uac-0\r\n"
    b"To: <sip:911@127.0.0.1:5070>\r\n"
    b"Call-ID: 0-bench@127.0.0.1\r\n"
    b"CSeq: 101 INVITE\r\n"
    b"Contact: <sip:3215550100@127.0.0.1:5060>\r\n"
    b"Content-Length: 0\r\n\r\n"
)


def tune_gc() -> None:
    """What ``e911_sip.app.tune_gc`` does in the running edge (without importing the app)."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(50_000, middle, old)


class _Answering:
    """A RESP pool that answers every command at once, as if the server had, after packing
    it as the real pool does (the packing is the edge's own work, not a client's)."""

    def __init__(self) -> None:
        from e911_sip.store.resp import pack

        self._pack = pack

    async def execute(self, *args: Any, timeout: float | None = None) -> Any:
        self._pack(*args)
        return b"0-1" if args[0] == "XADD" else len(args)

    async def close(self) -> None:
        return None


def _writer() -> Any:
    """The edge's stream writer on a pool that answers at once."""
    from e911_sip.store.resp import RespStreamWriter

    return RespStreamWriter(_Answering(), timeout=5.0)  # type: ignore[arg-type]


class _Redis:
    """Answers every command at once, as if the server had."""

    async def evalsha(self, sha: str, numkeys: int, *args: object) -> int:
        return len(args)

    async def xadd(self, stream: str, fields: dict[str, str]) -> str:
        return "0-1"


class _Streams:
    """Answers at once and keeps what the queues' scripts and ``XADD`` write, per stream,
    for ``XREADGROUP ... >`` to give back (nothing is pending: ``XACK`` is not kept)."""

    def __init__(self) -> None:
        self.connection_pool = SimpleNamespace(connection_kwargs={})
        self._entries: dict[str, list[tuple[str, dict[str, str]]]] = {}
        self._ids = itertools.count(1)

    def _add(self, stream: str, values: Sequence[object]) -> None:
        entries = self._entries.setdefault(stream, [])
        for value in values:
            entries.append((f"{next(self._ids)}-0", {"item": str(value)}))

    async def xadd(self, stream: str, fields: dict[str, str]) -> str:
        self._add(stream, (fields["item"],))
        return self._entries[stream][-1][0]

    async def evalsha(self, sha: str, numkeys: int, *args: object) -> int:
        keys, argv = args[:numkeys], args[numkeys:]
        if numkeys == 2:
            # The hand-over: the group, how many entries, the entries, the items.
            self._add(str(keys[1]), argv[2 + int(str(argv[1])) :])
        elif isinstance(argv[0], int):
            # xadd_all: MAXLEN, the field, the values.
            self._add(str(keys[0]), argv[2:])
        return len(argv)

    async def xreadgroup(
        self, group: str, consumer: str, streams: dict[str, str], count: int, block: int | None
    ) -> list[tuple[str, list[tuple[str, dict[str, str]]]]]:
        ((stream, start),) = streams.items()
        entries = self._entries.get(stream) if start == ">" else None
        if not entries:
            return []
        taken, self._entries[stream] = entries[:count], entries[count:]
        return [(stream, taken)]


def _run(coroutine: Coroutine[Any, Any, Any]) -> Any:
    """Run a coroutine that never waits (its awaits all answer at once) without a loop; its
    result."""
    try:
        coroutine.send(None)
    except StopIteration as done:
        return done.value
    raise RuntimeError("the coroutine waited")


def _call_fields(n: int) -> dict[str, object]:
    """The fields of the edge's "emergency call forwarded" line for call ``n``."""
    return {
        "call_id": f"{n}-bench@127.0.0.1",
        "caller": "3215550100",
        "number": "911",
        "outcome": "enriched",
        "enriched": True,
        "trunk": "sip:127.0.0.1:5080",
        "attempt": 1,
    }


def _log_part(worker: bool = False, line: bool = False) -> Callable[[int], None]:
    from e911_sip import logline, logs

    sys.stderr = open(os.devnull, "w")  # noqa: SIM115
    logs.configure("INFO")
    if worker:
        from e911_sip.app import tag_worker_logs

        tag_worker_logs(1)
    log = logging.getLogger("e911_sip.edge")

    def call(n: int) -> None:
        if log.isEnabledFor(logging.INFO):
            log.info("emergency call forwarded", extra=_call_fields(n))

    def call_line(n: int) -> None:
        if log.isEnabledFor(logging.INFO):
            logline.emit_info(log, "emergency call forwarded", _call_fields(n))

    return call_line if line else call


def _records_part(batch: int) -> Callable[[int], None]:
    from e911_sip.callrecords.recorder import CallRecorder
    from e911_sip.callrecords.stream import RedisStreamSink
    from e911_sip.metrics import Metrics
    from e911_sip.proxy.core import CallCompleted, EmergencyCall, EmergencyForwarded
    from e911_sip.sip.message import Request, parse

    sink = RedisStreamSink(url="redis://127.0.0.1:6379/0", stream="e911:calls", timeout=1.0)
    sink._writer = _writer()
    clock = [1_796_000_000.0]

    def wall() -> float:
        clock[0] += 0.000_37
        return clock[0]

    recorder = CallRecorder(sink=sink, metrics=Metrics(), wall_clock=wall)
    message = parse(INVITE)
    assert isinstance(message, Request)

    def call(n: int) -> None:
        call_id = f"{n}-bench@127.0.0.1"
        recorder.on_event(EmergencyCall(n, message, "911", call_id))
        recorder.on_enrichment(
            call_id,
            outcome="enriched",
            caller="3215550100",
            callback="3215550100",
            provider_endpoint="5551234/ep-0001",
        )
        recorder.on_event(EmergencyForwarded(n, call_id, "sip:127.0.0.1:5080", 1, True))
        recorder.on_event(CallCompleted(call_id, "INVITE", True, 200, "sip:127.0.0.1:5080"))
        recorder.on_event(CallCompleted(call_id, "BYE", True, 200, None))
        if recorder.queued >= batch:
            _run(recorder._write_batch())

    return call


def _publish_part(batch: int) -> Callable[[int], None]:
    from e911_sip.notify.dispatch import Publisher
    from e911_sip.notify.event import CallEvent
    from e911_sip.notify.queue import RedisStreamQueue

    queue = RedisStreamQueue(
        _Redis(),  # type: ignore[arg-type]
        stream="e911:events",
        dead_list="e911:events:dead",
        writer=_writer(),
    )
    publisher = Publisher(queue, batch=batch)

    def call(n: int) -> None:
        publisher.publish(
            CallEvent.now(
                call_id=f"{n}-bench@127.0.0.1",
                caller="3215550100",
                callback="3215550100",
                dialed="911",
                provider_endpoint="5551234/ep-0001",
                outcome="enriched",
                age=0.0004,
            )
        )
        if publisher.pending >= batch:
            _run(publisher._flush())

    return call


def _notify_part(batch: int) -> Callable[[int], None]:
    from e911_sip.notify.dispatch import Publisher
    from e911_sip.notify.event import CallEvent, Delivery, Resolution, Targets, deliveries
    from e911_sip.notify.queue import RedisStreamQueue

    redis: Any = _Streams()
    events = RedisStreamQueue(redis, stream="e911:events", dead_list="e911:events:dead")
    out = RedisStreamQueue(redis, stream="e911:deliveries", dead_list="e911:deliveries:dead")
    for queue in (events, out):
        queue._group_ready = True
    publisher = Publisher(events, batch=batch)
    resolution = Resolution(
        targets=Targets(
            webhooks=("https://alerts.example.com/e911",),
            emails=("security@example.com",),
            sms=("3215550199",),
        ),
        level="site",
        address="1600 Main St, Suite 200, Melbourne, FL 32901",
        name="Acme \u2013 Melbourne",
    )
    fallback = Targets()

    def call(n: int) -> None:
        publisher.publish(
            CallEvent.now(
                call_id=f"{n}-bench@127.0.0.1",
                caller="3215550100",
                callback="3215550100",
                dialed="911",
                provider_endpoint="5551234/ep-0001",
                outcome="enriched",
                age=0.0004,
            )
        )
        if publisher.pending < batch:
            return
        _run(publisher._flush())
        # What Notifier._expand does with the batch, with a lookup that answers at once,
        # then the deliveries as the notifier takes them.
        taken = _run(events.take(0.01))
        planned = [
            delivery.to_dict()
            for _, item in taken
            for delivery in deliveries(CallEvent.from_dict(item), resolution, fallback)
        ]
        _run(events.hand_over([entry for entry, _ in taken], planned, out))
        sent = _run(out.take(0.01))
        for _, item in sent:
            Delivery.from_dict(item)
        _run(out.done_many([entry for entry, _ in sent]))

    return call


def _gc_part() -> Callable[[int], None]:
    from e911_sip.app import gc_pass
    from e911_sip.sip.message import parse

    kept: list[object] = []

    def call(n: int) -> None:
        # Between two passes the edge handles calls, which fill the interpreter's free
        # lists and leave a few objects alive: a pass's cost includes what it does to them.
        for i in range(GC_PARSES):
            message = parse(INVITE)
            if i == 0:
                kept.append(message)
        gc_pass()

    return call


def _metrics_part() -> Callable[[int], None]:
    from e911_sip.metrics import Metrics

    metrics = Metrics()
    request = metrics.requests.labels("INVITE", "emergency")
    ack = metrics.requests.labels("ACK", "emergency")
    bye = metrics.requests.labels("BYE", "emergency")
    enriched = metrics.emergency_calls.labels("enriched")
    result = metrics.emergency_results.labels("2xx")
    lookup = metrics.store_lookup_seconds.labels("memory")
    enrich = metrics.enrich_seconds

    def call(n: int) -> None:
        request.inc()
        lookup.observe(0.00002)
        enriched.inc()
        enrich.observe(0.00031)
        result.inc()
        ack.inc()
        bye.inc()

    return call


def _instructions(part: str, calls: int, batch: int, workdir: Path) -> int:
    """Instructions of one part's run with ``calls`` calls, in a directory of its own (the
    parts' runs go side by side)."""
    # Imported here: the measured runs stay free of the core bench's imports.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench.core_bench import callgrind_instructions

    own = workdir / part
    own.mkdir(exist_ok=True)
    total, _ = callgrind_instructions(
        calls, own, script=Path(__file__), extra=("--part", part, "--batch", str(batch))
    )
    return total


def callgrind(parts: list[str], counts: tuple[int, int], batch: int) -> None:
    low, high = counts
    with (
        tempfile.TemporaryDirectory(prefix="glue-callgrind-") as tmp,
        ThreadPoolExecutor(len(parts) * 2) as pool,
    ):
        runs = {
            (part, calls): pool.submit(_instructions, part, calls, batch, Path(tmp))
            for part in parts
            for calls in counts
        }
        for part in parts:
            per_call = (runs[part, high].result() - runs[part, low].result()) / (high - low)
            print(f"{part}: {per_call:,.0f} instructions per call ({high} and {low} calls)")


def make(part: str, batch: int) -> Callable[[int], None]:
    if part in ("log", "worker_log", "log_line", "worker_log_line"):
        return _log_part(worker=part.startswith("worker"), line=part.endswith("_line"))
    if part == "records":
        return _records_part(batch)
    if part == "publish":
        return _publish_part(batch)
    if part == "notify":
        return _notify_part(batch)
    if part == "gc":
        return _gc_part()
    return _metrics_part()


def main() -> None:
    tune_gc()  # as the running edge does
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--part", choices=PARTS, action="append")
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--warmup", type=int, default=500)
    parser.add_argument(
        "--batch",
        type=int,
        default=20,
        help="records / events per write (at 800 calls/s the records' 50 ms linger gathers "
        "about 40, the events' 10 ms about 8; default 20)",
    )
    parser.add_argument("--callgrind", action="store_true")
    parser.add_argument(
        "--callgrind-calls", default="1000,3000", help="the two call counts (default 1000,3000)"
    )
    args = parser.parse_args()
    parts = args.part or list(PARTS)
    if args.callgrind:
        low, high = sorted(int(part) for part in args.callgrind_calls.split(","))
        callgrind(parts, (low, high), args.batch)
        return
    if len(parts) != 1:
        parser.error("one --part at a time without --callgrind")
    call = make(parts[0], args.batch)
    for n in range(args.warmup):
        call(n)
    for n in range(args.warmup, args.warmup + args.calls):
        call(n)


if __name__ == "__main__":
    main()
