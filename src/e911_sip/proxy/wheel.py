"""A coarse timer wheel for the proxy core: deadlines grouped by tick, one wake-up per tick.

The core has many timers running at once (per call: Timer A/B of each branch, Timer C, the
provisional timeout, the fail-open deadline, the server transaction's G/H/I/L) and almost
none of them fires: a call that is answered cancels them all. A heap entry per timer paid a
push for each and left dead entries behind until their deadline came round (Timer C: three
minutes). Here a deadline is rounded *up* to the next tick and the target is put in that
tick's bucket; each target has at most one slot, so re-arming moves it and cancelling
removes it at once. ``next_deadline()`` is the earliest occupied tick, so the adapter's one
``loop.call_at`` wakes once per tick however many timers share it.

Why 1/64 s (15.6 ms) per tick: the shortest interval RFC 3261 asks for is T1 = 500 ms (the
first retransmission of Timers A, E and G); one tick late is 3 % of it, and the long timers
(B, F, H = 64*T1, C above 3 minutes, the provisional timeout and the fail-open deadline of
about a second) move by far less. A timer never fires early: rounding is always up. The tick
is a power of two so that the arithmetic is exact in binary floating point: a deadline on a
tick boundary (0.5 s, 2 s, 32 s after a whole second) fires on that boundary, not one tick
later, and ``next_deadline()`` returns exactly the float that ``pop_due`` compares with.

Pure code: the time is always passed in as ``now``; the wheel has no clock of its own.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable
from typing import Any, Final, TypeVar

T = TypeVar("T")

Fire = Callable[[Any, float], None]
"""What to call with the target and ``now`` when its tick comes."""

TICKS_PER_SECOND: Final = 64
"""The wheel's resolution: 1/64 s. A power of two keeps tick arithmetic exact."""


class TimerWheel:
    """Targets waiting for a deadline, bucketed by tick of ``1 / ticks_per_second`` seconds.

    A target is any hashable object (compared by identity in practice: the core's branches,
    contexts and transactions); it has at most one pending deadline, with the callback that
    handles it.
    """

    __slots__ = ("_scale", "_buckets", "_ticks", "_armed")

    def __init__(self, ticks_per_second: int = TICKS_PER_SECOND) -> None:
        if ticks_per_second <= 0 or ticks_per_second & (ticks_per_second - 1):
            raise ValueError(f"ticks per second must be a power of two, got {ticks_per_second}")
        self._scale = float(ticks_per_second)
        self._buckets: dict[int, dict[object, Fire]] = {}
        """Tick number -> the targets due at it, in the order they were scheduled."""
        self._ticks: list[int] = []
        """Heap of the tick numbers in ``_buckets``, one entry each. A bucket emptied by
        cancelling stays until its tick passes, so re-arming into it pushes nothing: the heap
        is bounded by the ticks within the longest timer, not by how often timers move."""
        self._armed: dict[object, int] = {}
        """Target -> the tick it waits for."""

    def __len__(self) -> int:
        return len(self._armed)

    def schedule(self, target: T, deadline: float, fire: Callable[[T, float], None]) -> None:
        """Call ``fire(target, now)`` at the first tick at or after ``deadline``, instead of
        whatever the target waited for before. An infinite deadline never comes: the target
        is only taken off the wheel."""
        try:
            tick = math.ceil(deadline * self._scale)
        except OverflowError:
            self.cancel(target)
            return
        armed = self._armed
        old = armed.get(target)
        if old is not None:
            if old == tick:
                self._buckets[old][target] = fire
                return
            self._remove(target, old)
        armed[target] = tick
        bucket = self._buckets.get(tick)
        if bucket is None:
            self._buckets[tick] = {target: fire}
            heapq.heappush(self._ticks, tick)
        else:
            bucket[target] = fire

    def cancel(self, target: object) -> None:
        """Forget the target's deadline, if it has one."""
        armed = self._armed
        old = armed.get(target)
        if old is not None:
            # get and del, not pop: compiled, dict.pop is a generic method call.
            del armed[target]
            self._remove(target, old)

    def deadline_of(self, target: object) -> float | None:
        """When the target will fire (its tick, not the deadline it was given), or None."""
        tick = self._armed.get(target)
        return None if tick is None else tick / self._scale

    def next_deadline(self) -> float | None:
        """The earliest tick with something in it, as a time; None when nothing waits."""
        ticks = self._ticks
        buckets = self._buckets
        while ticks:
            tick = ticks[0]
            if buckets[tick]:
                return tick / self._scale
            heapq.heappop(ticks)
            del buckets[tick]
        return None

    def pop_due(self, now: float) -> list[tuple[object, Fire]]:
        """Remove and return every (target, callback) whose tick is at or before ``now``,
        earliest tick first and, within a tick, in the order scheduled."""
        ticks = self._ticks
        buckets = self._buckets
        armed = self._armed
        scale = self._scale
        due: list[tuple[object, Fire]] = []
        while ticks and ticks[0] / scale <= now:
            bucket = buckets.pop(heapq.heappop(ticks))
            if bucket:
                for target in bucket:
                    del armed[target]
                due.extend(bucket.items())
        return due

    def _remove(self, target: object, tick: int) -> None:
        del self._buckets[tick][target]
