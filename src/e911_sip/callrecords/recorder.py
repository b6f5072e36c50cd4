"""The edge's side of call records: feed the book, hand finished records on in the background.

The edge calls :meth:`CallRecorder.on_event` and :meth:`CallRecorder.on_enrichment` from its
pump; both only touch memory and never raise, so recording can neither block nor fail a
call. Finished records wait in a bounded queue; :meth:`CallRecorder.run` writes them to the
sink in batches, retries with a back-off while the sink fails, and finishes what is still in
progress when the edge stops. Records that do not fit the queue, or are still unwritten when
the stop's grace period ends, are lost: each is counted in ``e911_sip_call_records_total``
and logged (rate-limited) with its Call-ID.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from e911_sip.batching import Pauses
from e911_sip.callrecords.book import BookOptions, CallRecord, CallRecordBook
from e911_sip.callrecords.stream import RecordSink
from e911_sip.metrics import Children, Metrics
from e911_sip.proxy.core import (
    CallCompleted,
    EmergencyCall,
    EmergencyForwarded,
    Event,
    FailOpen,
    Failover,
)

log = logging.getLogger("e911_sip.callrecords")

# Every other event (most of them, on a busy edge) is passed over without reading the clock.
_RECORDED = frozenset({EmergencyCall, EmergencyForwarded, Failover, FailOpen, CallCompleted})

RECORD_RESULTS = ("written", "queue_full", "write_failed", "lost_at_stop", "internal_error")
"""Labels of ``e911_sip_call_records_total``: ``write_failed`` counts failed attempts
(retried), the others records."""


@dataclass(frozen=True, slots=True, kw_only=True)
class RecorderOptions:
    """How the edge keeps and hands on call records."""

    book: BookOptions = field(default_factory=BookOptions)
    """Bounds of the records in progress."""
    queue_size: int = 10_000
    """Finished records waiting to be written; beyond it new ones are dropped (counted)."""
    batch_size: int = 100
    """Records per write."""
    linger: float = 0.05
    """Seconds a write waits, after the first record of a batch is queued, for more to join
    it: under load one round trip then carries many records instead of one each (a record
    reaches the stream at most this much later). 0 writes at once."""
    expire_interval: float = 5.0
    """Seconds between checks for calls past ``book.max_age``."""
    retry_min: float = 0.5
    """First pause after a failed write; it doubles while the sink fails."""
    retry_max: float = 30.0
    """Longest pause between attempts while the sink fails."""
    stop_timeout: float = 5.0
    """Seconds a stopping edge keeps trying to write what is left."""


class _RateLimitedLog:
    """One line per ``interval`` per kind, with how many were held back."""

    def __init__(self, interval: float = 60.0) -> None:
        self._interval = interval
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def warning(self, kind: str, message: str, extra: dict[str, object], now: float) -> None:
        last = self._last.get(kind)
        if last is not None and now - last < self._interval:
            self._held[kind] = self._held.get(kind, 0) + 1
            return
        self._last[kind] = now
        held = self._held.pop(kind, 0)
        log.warning(message, extra={**extra, "suppressed_since_last": held})


class CallRecorder:
    """Builds a record per emergency call and writes it off the call path."""

    def __init__(
        self,
        *,
        sink: RecordSink,
        metrics: Metrics,
        options: RecorderOptions | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._sink = sink
        self._options = options or RecorderOptions()
        self._book = CallRecordBook(self._options.book)
        self._wall = wall_clock
        self._queue: deque[CallRecord] = deque()
        self._pauses: Pauses | None = None
        """While :meth:`run` runs: its waits (with nothing to write: ended by the next
        finished record too)."""
        self._log = _RateLimitedLog()
        self._results = {r: metrics.call_records.labels(r) for r in RECORD_RESULTS}
        self._ends = Children(metrics.call_records_finished)
        book = self._book
        metrics.call_records_in_progress.set_function(lambda: book.in_progress)
        metrics.call_records_queued.set_function(lambda: len(self._queue))

    @property
    def queued(self) -> int:
        return len(self._queue)

    # -- called from the edge's pump: memory only, never raises -----------------------------
    def on_event(self, event: Event) -> None:
        """Apply one core event."""
        if type(event) not in _RECORDED:
            return
        try:
            # Most events finish no record: nothing to collect then.
            if self._book.event(event, self._wall()):
                self._collect()
        except Exception:
            self._internal_error()

    def on_enrichment(
        self,
        call_id: str,
        *,
        outcome: str,
        caller: str | None,
        callback: str | None,
        provider_endpoint: str | None,
    ) -> None:
        """What the edge decided for an emergency INVITE."""
        try:
            self._book.enrichment(
                call_id,
                outcome=outcome,
                caller=caller,
                callback=callback,
                provider_endpoint=provider_endpoint,
            )
        except Exception:
            self._internal_error()

    def _internal_error(self) -> None:
        self._results["internal_error"].inc()
        log.exception("call record bookkeeping failed; the call is not affected")

    def _collect(self) -> None:
        if not self._book.has_finished:
            return
        finished = self._book.finished()
        for record in finished:
            self._ends(record.end or "unknown").inc()
            if len(self._queue) >= self._options.queue_size:
                self._results["queue_full"].inc()
                self._log.warning(
                    "queue_full",
                    "call record dropped: the write queue is full",
                    {"call_id": record.call_id, "queue_size": self._options.queue_size},
                    self._wall(),
                )
                continue
            self._queue.append(record)
        pauses = self._pauses
        if pauses is not None:
            pauses.wake()

    # -- the background writer ---------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        """Write records until ``stop``; then finish the calls in progress and write what is
        left, within ``stop_timeout``."""
        options = self._options
        pause = 0.0  # above zero while the sink fails
        with Pauses(stop) as pauses:
            self._pauses = pauses
            try:
                while not stop.is_set():
                    self._guarded(lambda: self._book.expire(self._wall()))
                    if (
                        self._queue
                        and pause == 0.0
                        and len(self._queue) < options.batch_size
                        and options.linger > 0
                    ):
                        # The write's own cost (a pipeline, a round trip) is the same for one
                        # record as for a hundred: let the calls of the next few milliseconds
                        # join it. Only the timer or the stop ends the wait.
                        await pauses.sleep(options.linger)
                    if self._queue:
                        if await self._write_batch():
                            pause = 0.0
                            if self._queue:
                                continue
                        else:
                            pause = min(max(pause * 2, options.retry_min), options.retry_max)
                    if stop.is_set():
                        break
                    if pause == 0.0 and self._queue:
                        continue
                    # While the sink fails, new records do not hurry the next attempt.
                    await pauses.sleep(pause or options.expire_interval, wakeable=pause == 0.0)
            finally:
                self._pauses = None
        self._guarded(self._book.flush)
        try:
            async with asyncio.timeout(options.stop_timeout):
                while self._queue:
                    if not await self._write_batch():
                        await asyncio.sleep(0.2)
        except TimeoutError:
            pass
        if self._queue:
            self._results["lost_at_stop"].inc(len(self._queue))
            log.error(
                "call records not written before stopping",
                extra={"records": len(self._queue), "call_ids": [r.call_id for r in self._queue]},
            )
            self._queue.clear()
        await self._sink.close()

    def _guarded(self, step: Callable[[], None]) -> None:
        # A bug in the bookkeeping must not end this task: the edge's TaskGroup would stop.
        try:
            step()
            self._collect()
        except Exception:
            self._internal_error()

    async def _write_batch(self) -> bool:
        """Write the oldest batch; True when it was written (or nothing was waiting)."""
        if not self._queue:
            return True
        batch = [self._queue[i] for i in range(min(self._options.batch_size, len(self._queue)))]
        try:
            await self._sink.write(batch)
        except Exception as exc:  # TransferError, or a bug in a sink: retried either way
            self._results["write_failed"].inc()
            self._log.warning(
                "write_failed",
                "call records not written yet; retrying",
                {"error": str(exc), "queued": len(self._queue)},
                self._wall(),
            )
            return False
        for _ in batch:
            self._queue.popleft()
        self._results["written"].inc(len(batch))
        return True
