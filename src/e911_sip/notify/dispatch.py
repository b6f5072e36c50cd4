"""From the edge's call event to delivered notifications, off the call path.

Two stages, each a durable queue (:mod:`e911_sip.notify.queue`):

1. The edge calls :meth:`Publisher.publish` (synchronous, never waits, bounded): the event
   goes to an in-memory list that a task writes to the *events* queue.
2. The :class:`Notifier`, where provisioning state is, takes the events in batches, asks
   provisioning for each line's contacts, level and address, queues one delivery per target
   in the *deliveries* queue and marks the events done, the batch's in one step (on Redis
   one script; elsewhere the deliveries' write, then the events' acknowledgement). Each
   delivery is attempted at once and retried with exponential back-off and full jitter
   (honouring a ``Retry-After``) until it succeeds, fails permanently, or runs out of
   attempts or time; then it moves to the dead-letter list, logged at ERROR and counted (an
   alert fires on it). Deliveries that succeed at the same moment are marked done in one
   acknowledgement.

A crash between two steps repeats a step, never skips one: an event may yield its deliveries
twice, a delivery may be sent twice. Every delivery carries the same idempotency key each
time (webhook ``X-E911-Delivery-Id``, email ``Message-ID``, SMS ``tag``).
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from e911_sip.batching import Pauses
from e911_sip.notify.channels import Channel, DeliveryFailed
from e911_sip.notify.event import CallEvent, Delivery, Resolution, Targets, deliveries
from e911_sip.notify.queue import Queue, QueueError

log = logging.getLogger("e911_sip.notify")

OUTCOMES = ("delivered", "retried", "dead")
"""Outcomes counted per channel: accepted by the far end, one failed attempt that will be
retried, given up (in the dead-letter list)."""


class Publisher:
    """The edge's side: hands events to the events queue without ever waiting on it."""

    def __init__(
        self,
        queue: Queue,
        *,
        numbers: frozenset[str] = frozenset({"911"}),
        max_pending: int = 10_000,
        batch: int = 256,
        linger: float = 0.01,
        on_dropped: Callable[[CallEvent], None] = lambda event: None,
    ) -> None:
        """``linger``: seconds a write waits after its first event for others to join it, so
        that under load one round trip carries many events (0: write at once)."""
        self._queue = queue
        self._linger = linger
        self._numbers = numbers
        self._pending: collections.deque[CallEvent] = collections.deque()
        self._max_pending = max_pending
        self._batch = max(1, batch)
        self._on_dropped = on_dropped
        self._pauses: Pauses | None = None
        """While :meth:`run` runs: its waits (for work: ended by the next event too)."""

    @property
    def pending(self) -> int:
        """Events not yet in the queue."""
        return len(self._pending)

    def publish(self, event: CallEvent) -> None:
        """Queue ``event`` for notification if its number notifies. Never raises."""
        if event.dialed not in self._numbers:
            return
        if len(self._pending) >= self._max_pending:
            # The owner counts and logs it (rate-limited: a burst that fills the backlog must
            # not also write a line per event).
            self._on_dropped(event)
            return
        self._pending.append(event)
        pauses = self._pauses
        if pauses is not None:
            pauses.wake()

    async def run(self, stop: asyncio.Event, *, flush_timeout: float = 2.0) -> None:
        """Write events to the queue until ``stop``, then for up to ``flush_timeout``."""
        with Pauses(stop) as pauses:
            self._pauses = pauses
            try:
                while not stop.is_set():
                    if self._linger > 0 and 0 < len(self._pending) < self._batch:
                        await pauses.sleep(self._linger)
                    await self._flush()
                    if self._pending:
                        # The queue failed: try again shortly.
                        await pauses.sleep(0.5)
                        continue
                    # Until the next event (or the stop).
                    await pauses.until(None, wakeable=True)
            finally:
                self._pauses = None
        try:
            async with asyncio.timeout(flush_timeout):
                while self._pending:
                    await self._flush()
                    if self._pending:
                        await asyncio.sleep(0.1)
        except TimeoutError:
            log.error(
                "notification events not queued at shutdown",
                extra={"events": len(self._pending)},
            )

    async def _flush(self) -> None:
        # Events go in batches: one XADD round trip per event cannot keep up with a burst
        # while the message path has the CPU, and the backlog would overflow.
        while self._pending:
            count = min(len(self._pending), self._batch)
            batch = [self._pending[i].to_dict() for i in range(count)]
            try:
                await self._queue.put_many(batch)
            except QueueError as exc:
                log.warning("notification queue unavailable", extra={"error": str(exc)})
                return
            for _ in range(count):
                self._pending.popleft()


@dataclass(frozen=True, slots=True, kw_only=True)
class NotifierOptions:
    """How deliveries are retried."""

    fallback: Targets = field(default_factory=Targets)
    """Targets for lines with no contacts at any level (and for unknown callers)."""
    fallback_always: bool = False
    """Send to ``fallback`` for every call as well, not only when the line has no contacts."""
    max_attempts: int = 10
    """Attempts per delivery before it is dead-lettered."""
    retry_for: float = 3600.0
    """Seconds after the call after which a failing delivery is dead-lettered."""
    backoff_base: float = 1.0
    """Back-off before retry n is ``min(backoff_cap, backoff_base * 2**(n-1)) * rand()``."""
    backoff_cap: float = 60.0
    """Upper bound of one back-off, before jitter."""
    max_in_flight: int = 1000
    """Deliveries held in memory at once (the rest wait in the queue)."""
    poll_interval: float = 1.0
    """Seconds one blocking read of a queue waits."""
    resolve_timeout: float = 5.0
    """Seconds provisioning may take to name a line's contacts before the fallback is used."""


NO_TARGET = "emergency call with no notification target (configure [notify] or contacts)"


def _warn_no_target(event: CallEvent) -> None:
    log.warning(NO_TARGET, extra={"call_id": event.call_id, "caller": event.caller})


Resolver = Callable[[CallEvent], Awaitable[Resolution]]
"""Provisioning's answer for a call's line."""


class Notifier:
    """The provisioning side: events → deliveries → channels, with retries and dead letters."""

    def __init__(
        self,
        *,
        events: Queue,
        deliveries: Queue,
        channels: Mapping[str, Channel],
        resolve: Resolver,
        options: NotifierOptions,
        on_outcome: Callable[[str, str], None] = lambda channel, outcome: None,
        on_latency: Callable[[str, float], None] = lambda channel, seconds: None,
        on_no_target: Callable[[CallEvent], None] | None = None,
        rand: Callable[[], float] = random.random,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``on_no_target``: told of each call that had nobody to notify (the owner counts
        it and logs it through a rate limiter); by default a WARNING line per call."""
        self._events = events
        self._on_no_target = on_no_target or _warn_no_target
        self._deliveries = deliveries
        self._channels = dict(channels)
        self._resolve = resolve
        self._options = options
        self._on_outcome = on_outcome
        self._on_latency = on_latency
        self._rand = rand
        self._clock = clock
        self._slots = asyncio.Semaphore(options.max_in_flight)
        self._tasks: set[asyncio.Task[None]] = set()
        self._acks: list[tuple[str, asyncio.Future[bool]]] = []
        """Delivered entries waiting for their acknowledgement, each with what its task
        waits on: True once written, False when that task is to write the next group."""
        self._acking = False
        """A delivery task is writing (or gathering) a group of acknowledgements."""

    async def run(self, stop: asyncio.Event) -> None:
        """Work both queues until ``stop``; attempts in progress are abandoned, not lost
        (they stay in the queue and are taken again at the next start)."""
        loop = asyncio.get_running_loop()
        pumps = [
            loop.create_task(self._pump(stop, self._events, self._expand)),
            loop.create_task(self._pump(stop, self._deliveries, self._start_deliveries)),
        ]
        stopper = loop.create_task(stop.wait())
        try:
            await asyncio.wait([*pumps, stopper], return_when=asyncio.FIRST_COMPLETED)
        finally:
            # A pump may be waiting for a free slot or inside a queue write: cancelling it
            # loses nothing, since every item is still in its queue until marked done.
            stopper.cancel()
            for pump in pumps:
                pump.cancel()
            results = await asyncio.gather(*pumps, return_exceptions=True)
            for task in list(self._tasks):
                task.cancel()
            if self._tasks:
                await asyncio.wait(list(self._tasks))
        for result in results:
            if isinstance(result, Exception):
                raise result

    async def _pump(
        self,
        stop: asyncio.Event,
        queue: Queue,
        handle: Callable[[list[tuple[str, dict[str, Any]]]], Awaitable[None]],
    ) -> None:
        failures = 0
        while not stop.is_set():
            try:
                batch = await queue.take(self._options.poll_interval)
                failures = 0
            except QueueError as exc:
                failures += 1
                if failures == 1:
                    log.error("notification queue unavailable", extra={"error": str(exc)})
                try:
                    async with asyncio.timeout(min(5.0, 0.2 * 2**failures)):
                        await stop.wait()
                except TimeoutError:
                    pass
                continue
            if batch:
                await handle(batch)

    async def _expand(self, batch: list[tuple[str, dict[str, Any]]]) -> None:
        """A batch of events → all their deliveries in the deliveries queue and the events
        done, in one :meth:`~e911_sip.notify.queue.Queue.hand_over`."""
        entries = [entry for entry, _ in batch]
        events: list[CallEvent] = []
        for entry, item in batch:
            try:
                events.append(CallEvent.from_dict(item))
            except (KeyError, TypeError, ValueError):
                # Acknowledged with the rest: nothing can ever be made of it.
                log.error("unreadable notification event dropped", extra={"entry": entry})
        planned: list[dict[str, Any]] = []
        options = self._options
        for event, resolution in zip(events, await self._resolve_all(events), strict=True):
            own = deliveries(event, resolution, options.fallback, always=options.fallback_always)
            if not own:
                self._on_no_target(event)
            planned.extend(delivery.to_dict() for delivery in own)
        # The deliveries stored and the events acknowledged in one step (on Redis one
        # script: one round trip, and a crash cannot fall between them). Where it takes two
        # writes the events come second: a crash between them takes the batch again, its
        # deliveries queued twice under the same idempotency keys.
        await self._retrying(
            functools.partial(self._events.hand_over, entries, planned, self._deliveries)
        )

    async def _resolve_all(self, events: list[CallEvent]) -> list[Resolution]:
        """Each event's resolution, or an empty one (the fallback targets) for an event whose
        resolution failed or took over ``resolve_timeout``."""
        loop = asyncio.get_running_loop()
        limit = self._options.resolve_timeout
        # Each event still has its own resolve_timeout (to within 1 %), but on one timer
        # for the batch, moved forward only when the clock has: an asyncio.timeout per
        # event was a timer, a context and a cancellation check for each call.
        slack = limit / 100
        out: list[Resolution] = []
        while len(out) < len(events):
            try:
                async with asyncio.timeout(limit) as scope:
                    while len(out) < len(events):
                        deadline = loop.time() + limit
                        when = scope.when()
                        if when is not None and when < deadline - slack:
                            scope.reschedule(deadline)
                        out.append(await self._resolve_one(events[len(out)]))
            except TimeoutError:
                self._unresolved(events[len(out)])
                out.append(Resolution())
        return out

    async def _resolve_one(self, event: CallEvent) -> Resolution:
        try:
            return await self._resolve(event)
        except Exception:
            self._unresolved(event)
            return Resolution()

    @staticmethod
    def _unresolved(event: CallEvent) -> None:
        # Provisioning cannot say who to tell: tell the fallback targets now rather than
        # nobody, without the address.
        log.exception("contacts could not be resolved", extra={"call_id": event.call_id})

    async def _start_deliveries(self, batch: list[tuple[str, dict[str, Any]]]) -> None:
        for entry, item in batch:
            await self._start_delivery(entry, item)

    async def _start_delivery(self, entry: str, item: dict[str, Any]) -> None:
        await self._slots.acquire()
        task = asyncio.get_running_loop().create_task(self._deliver(entry, item))
        self._tasks.add(task)
        task.add_done_callback(self._delivery_finished)

    def _delivery_finished(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._slots.release()

    async def _deliver(self, entry: str, item: dict[str, Any]) -> None:
        options = self._options
        try:
            delivery = Delivery.from_dict(item)
        except (KeyError, TypeError, ValueError):
            await self._retrying(lambda: self._deliveries.dead(entry, item, "unreadable"))
            return
        channel = self._channels.get(delivery.channel)
        extra: dict[str, object] = {
            "call_id": delivery.body.get("call_id"),
            "channel": delivery.channel,
            "delivery_id": delivery.delivery_id,
        }
        attempt = 0
        while True:
            attempt += 1
            if channel is None:
                reason, permanent, retry_after = "channel not configured", True, None
            else:
                try:
                    await channel.send(delivery)
                except DeliveryFailed as exc:
                    reason, permanent, retry_after = exc.reason, exc.permanent, exc.retry_after
                except Exception as exc:
                    log.exception("notification channel failed", extra=extra)
                    reason, permanent, retry_after = type(exc).__name__, False, None
                else:
                    latency = self._clock() - delivery.received_at
                    await self._acknowledge(entry)
                    self._on_outcome(delivery.channel, "delivered")
                    self._on_latency(delivery.channel, latency)
                    log.info(
                        "notification delivered",
                        extra={**extra, "attempt": attempt, "latency_ms": round(latency * 1e3)},
                    )
                    return
            backoff = min(options.backoff_cap, options.backoff_base * 2 ** (attempt - 1))
            delay = retry_after if retry_after is not None else backoff * self._rand()
            age = self._clock() - delivery.received_at
            if permanent or attempt >= options.max_attempts or age + delay > options.retry_for:
                await self._retrying(functools.partial(self._deliveries.dead, entry, item, reason))
                self._on_outcome(delivery.channel, "dead")
                log.error(
                    "notification given up: moved to the dead-letter list",
                    extra={**extra, "attempts": attempt, "reason": reason, "target": "<hidden>"},
                )
                return
            self._on_outcome(delivery.channel, "retried")
            log.warning(
                "notification attempt failed; retrying",
                extra={**extra, "attempt": attempt, "reason": reason, "delay": round(delay, 3)},
            )
            await asyncio.sleep(delay)

    async def _acknowledge(self, entry: str) -> None:
        """Mark a delivered entry done, together with those delivered at the same moment.

        Group commit: the first lets the loop turn once for others to join, then writes the
        group in one ``done_many``; entries delivered meanwhile form the next group, which
        the first of them writes once this one is done. A task cancelled while it waits
        leaves its entry to the next group, or, at a stop, in the queue (sent again at the
        next start, under the same idempotency key)."""
        mine: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._acks.append((entry, mine))
        if self._acking:
            try:
                if await mine:
                    return
            except asyncio.CancelledError:
                if mine.done() and not mine.cancelled() and not mine.result():
                    # Handed the next group just as it was cancelled: pass it on.
                    self._acking = False
                    self._next_acknowledger()
                raise
        self._acking = True
        group: list[tuple[str, asyncio.Future[bool]]] = []
        try:
            await asyncio.sleep(0)
            group, self._acks = self._acks, []
            entries = [done for done, _ in group]
            await self._retrying(functools.partial(self._deliveries.done_many, entries))
        except BaseException:
            for _, waiter in group:
                waiter.cancel()
            raise
        finally:
            self._acking = False
            self._next_acknowledger()
        for _, waiter in group:
            if not waiter.done():
                waiter.set_result(True)

    def _next_acknowledger(self) -> None:
        for _, waiter in self._acks:
            if not waiter.done():
                self._acking = True
                waiter.set_result(False)
                return

    @staticmethod
    async def _retrying(operation: Callable[[], Awaitable[None]]) -> None:
        """Queue bookkeeping must happen: retry it until it does (or the task is cancelled;
        then the item is taken again at the next start)."""
        delay = 0.1
        while True:
            try:
                await operation()
                return
            except QueueError as exc:
                log.warning("notification queue write failed; retrying", extra={"error": str(exc)})
                await asyncio.sleep(delay)
                delay = min(5.0, delay * 2)
