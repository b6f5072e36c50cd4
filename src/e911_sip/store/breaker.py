"""The circuit breaker that decides, from evidence, when the location store is down.

A single slow or failed lookup is that call's problem: it falls back on its own and the
store stays in use. The breaker opens only on evidence that the store as a whole is not
answering:

- a share of failed lookups over a sliding window, once the window holds enough lookups to
  mean something (``failure_ratio``, ``window``, ``min_lookups``), or
- connections that cannot be opened at all (refused, unreachable): ``connect_failures`` in a
  row, each failed attempt counted once however many lookups it failed, or
- a failed health check.

While open the store is skipped (the caller uses its cache, then no location). After
``open_for`` seconds, or as soon as a health check succeeds, the breaker is half-open: one
trial lookup at a time goes to the store while the others are still skipped;
``trial_lookups`` successes in a row (trial lookups or good health checks) close it, one
failed trial opens it again.

Pure code: time is passed in as ``now`` (any monotonic clock).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum, StrEnum


class BreakerState(StrEnum):
    """Where the breaker is; the value is the metric label."""

    CLOSED = "closed"
    """The store is used for every lookup."""
    OPEN = "open"
    """The store is skipped."""
    HALF_OPEN = "half_open"
    """One trial lookup at a time goes to the store; the others are skipped."""


class Admission(Enum):
    """What one lookup may do."""

    ASK = "ask"
    """Ask the store (the breaker is closed)."""
    TRIAL = "trial"
    """Ask the store as the half-open breaker's trial; report the result with trial=True."""
    SKIP = "skip"
    """Do not ask the store."""


@dataclass(frozen=True, slots=True, kw_only=True)
class BreakerOptions:
    """When the breaker opens and how it closes again."""

    failure_ratio: float = 0.5
    """Share of failed lookups in the window that opens the breaker."""
    window: float = 10.0
    """Seconds of lookups the failure share is taken over."""
    min_lookups: int = 20
    """Lookups the window must hold before its failure share can open the breaker."""
    connect_failures: int = 1
    """Failed connection attempts in a row (refused, unreachable) that open the breaker."""
    open_for: float = 1.0
    """Seconds the store is skipped once the breaker opens, before trial lookups."""
    trial_lookups: int = 3
    """Successes in a row (trial lookups or good health checks) that close the half-open
    breaker."""


_BUCKETS = 10


class CircuitBreaker:
    """Counts lookup outcomes and says whether the next lookup may ask the store."""

    def __init__(
        self,
        options: BreakerOptions,
        *,
        on_change: Callable[[BreakerState], None] | None = None,
    ) -> None:
        self._options = options
        self._on_change = on_change
        self._state = BreakerState.CLOSED
        self._open_until = 0.0
        self._width = options.window / _BUCKETS
        # A ring of per-bucket counts: bucket number, lookups, failures.
        self._slots = [[-1, 0, 0] for _ in range(_BUCKETS)]
        self._connect_failures = 0
        self._last_incident: object | None = None
        self._trial_in_flight = False
        self._trial_successes = 0
        self.reason = ""
        """Why the breaker last opened."""

    def state(self, now: float) -> BreakerState:
        """The state at ``now``; an open breaker whose time is up turns half-open here."""
        if self._state is BreakerState.OPEN and now >= self._open_until:
            self._move(BreakerState.HALF_OPEN)
        return self._state

    def admit(self, now: float) -> Admission:
        """Whether a lookup starting at ``now`` may ask the store."""
        state = self.state(now)
        if state is BreakerState.CLOSED:
            return Admission.ASK
        if state is BreakerState.HALF_OPEN and not self._trial_in_flight:
            self._trial_in_flight = True
            return Admission.TRIAL
        return Admission.SKIP

    def succeeded(self, now: float, *, trial: bool = False) -> None:
        """The store answered (with a record, none, or an invalid record)."""
        if trial:
            self._trial_in_flight = False
            if self._state is not BreakerState.HALF_OPEN:
                return
            self._trial_successes += 1
            if self._trial_successes >= self._options.trial_lookups:
                self._close()
            return
        if self._state is not BreakerState.CLOSED:
            return  # a lookup that started before the breaker opened
        self._connect_failures = 0
        self._count(now, failed=False)

    def failed(
        self,
        now: float,
        reason: str,
        *,
        trial: bool = False,
        connect: bool = False,
        incident: object | None = None,
    ) -> None:
        """The store did not answer.

        ``connect`` marks a connection that could not be opened at all; ``incident`` is
        shared by the lookups one event failed, so that event counts once as a failed
        connection attempt.
        """
        if trial:
            self._trial_in_flight = False
            if self._state is BreakerState.HALF_OPEN:
                self._open(now, f"trial lookup failed: {reason}")
            return
        if self._state is not BreakerState.CLOSED:
            return
        if connect:
            if incident is None or incident is not self._last_incident:
                self._connect_failures += 1
            self._last_incident = incident
            if self._connect_failures >= self._options.connect_failures:
                self._open(now, reason)
                return
        lookups, failures = self._window(self._count(now, failed=True)[0])
        if (
            lookups >= self._options.min_lookups
            and failures >= self._options.failure_ratio * lookups
        ):
            self._open(now, f"{failures} of the last {lookups} lookups failed; last: {reason}")

    def abandoned(self, *, trial: bool) -> None:
        """A lookup ended without an answer either way (cancelled): free its trial slot."""
        if trial:
            self._trial_in_flight = False

    def health(self, now: float, ok: bool) -> None:
        """A health check result: a failure opens the breaker; a success lets trial
        lookups start at once instead of after ``open_for`` and counts as one successful
        trial."""
        if not ok:
            if self._state is not BreakerState.OPEN:
                self._trial_in_flight = False
                self._open(now, "health check failed")
            else:
                self._open_until = now + self._options.open_for
            return
        if self.state(now) is BreakerState.OPEN:
            self._open_until = now
            self.state(now)
        if self._state is not BreakerState.HALF_OPEN:
            return
        # Half-open, a good health check counts as a successful trial, so that the breaker
        # closes within a few checks even when no call comes to try the store.
        self._trial_successes += 1
        if self._trial_successes >= self._options.trial_lookups:
            self._close()

    def _count(self, now: float, *, failed: bool) -> list[int]:
        """Add one lookup to the window; return its bucket ``[number, lookups, failures]``.

        Only a failure reads the whole window (:meth:`_window`): a success is one bucket's
        increment, which every 911 call answered from memory pays.
        """
        bucket = int(now // self._width)
        slot = self._slots[bucket % _BUCKETS]
        if slot[0] != bucket:
            slot[0], slot[1], slot[2] = bucket, 0, 0
        slot[1] += 1
        if failed:
            slot[2] += 1
        return slot

    def _window(self, bucket: int) -> tuple[int, int]:
        """The (lookups, failures) of the window that ends with ``bucket``."""
        oldest = bucket - _BUCKETS
        lookups = failures = 0
        for number, total, bad in self._slots:
            if number > oldest:
                lookups += total
                failures += bad
        return lookups, failures

    def _open(self, now: float, reason: str) -> None:
        self.reason = reason
        self._open_until = now + self._options.open_for
        self._trial_successes = 0
        self._move(BreakerState.OPEN)

    def _close(self) -> None:
        for slot in self._slots:
            slot[0], slot[1], slot[2] = -1, 0, 0
        self._connect_failures = 0
        self._last_incident = None
        self._trial_successes = 0
        self._move(BreakerState.CLOSED)

    def _move(self, state: BreakerState) -> None:
        if state is self._state:
            return
        self._state = state
        if state is not BreakerState.HALF_OPEN:
            self._trial_in_flight = False
        if state is BreakerState.HALF_OPEN:
            self._trial_successes = 0
        if self._on_change is not None:
            self._on_change(state)
