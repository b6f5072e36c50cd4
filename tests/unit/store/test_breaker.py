"""The circuit breaker in front of the location store, driven by a failing or slow in-memory
store double and an injected clock."""

from __future__ import annotations

import asyncio

import pytest

from e911_sip.store.base import (
    InvalidRecord,
    LocationRecord,
    PoolExhausted,
    StoreError,
    StoreTimeout,
    StoreUnreachable,
)
from e911_sip.store.breaker import Admission, BreakerOptions, BreakerState, CircuitBreaker
from e911_sip.store.memory import MemoryStore
from e911_sip.store.resilient import LookupOptions, LookupSource, ResilientLookup

LINE = "3215551234"
RECORD = LocationRecord("5555555/e911abc123def")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FlakyStore(MemoryStore):
    """Answers from memory unless told to fail; ``failures`` are raised in turn."""

    def __init__(self) -> None:
        super().__init__({LINE: RECORD, "9195550000": RECORD})
        self.failures: list[Exception] = []
        self.fail_with: Exception | None = None
        self.calls = 0

    async def lookup(self, line: str) -> LocationRecord | None:
        self.calls += 1
        if self.failures:
            raise self.failures.pop(0)
        if self.fail_with is not None:
            raise self.fail_with
        return await super().lookup(line)


class HangingStore(MemoryStore):
    """Never answers until released: every lookup runs into the timeout."""

    def __init__(self) -> None:
        super().__init__({LINE: RECORD})
        self.release = asyncio.Event()
        self.calls = 0

    async def lookup(self, line: str) -> LocationRecord | None:
        self.calls += 1
        await self.release.wait()
        return await super().lookup(line)


def resilient(
    store: MemoryStore, clock: Clock, events: list[str] | None = None, **breaker: float
) -> ResilientLookup:
    log = events if events is not None else []
    return ResilientLookup(
        store,
        options=LookupOptions(timeout=0.01, breaker=BreakerOptions(**breaker)),  # type: ignore[arg-type]
        clock=clock,
        on_failure=lambda kind: log.append(f"failure:{kind}"),
        on_breaker=lambda state: log.append(f"breaker:{state.value}"),
        on_skip=lambda: log.append("skip"),
    )


async def test_one_timeout_does_not_open_the_breaker() -> None:
    store = HangingStore()
    clock = Clock()
    events: list[str] = []
    lookup = resilient(store, clock, events)
    result = await lookup.lookup(LINE)
    assert (result.source, result.failure) == (LookupSource.NONE, "timeout")
    assert lookup.state is BreakerState.CLOSED and not lookup.degraded
    store.release.set()
    assert (await lookup.lookup(LINE)).source is LookupSource.STORE
    assert store.calls == 2
    assert events == ["failure:timeout"]


async def test_a_failure_share_over_the_window_opens_it_and_the_store_is_skipped() -> None:
    store = FlakyStore()
    clock = Clock()
    events: list[str] = []
    lookup = resilient(store, clock, events, min_lookups=10, failure_ratio=0.5)
    for _ in range(6):
        assert (await lookup.lookup(LINE)).source is LookupSource.STORE  # fills the cache
    store.fail_with = StoreTimeout("redis did not answer the lookup in time")
    for _ in range(5):
        result = await lookup.lookup(LINE)
        assert (result.source, result.failure) == (LookupSource.CACHE, "timeout")
        assert lookup.state is BreakerState.CLOSED  # 5 of 11 failed: under half
    result = await lookup.lookup(LINE)
    assert lookup.state is BreakerState.OPEN  # 6 of 12
    calls = store.calls
    skipped = await lookup.lookup(LINE)
    assert (skipped.source, skipped.record, skipped.failure) == (LookupSource.CACHE, RECORD, None)
    assert "6 of the last 12 lookups failed" in (skipped.error or "")
    assert (await lookup.lookup("9195550001")).source is LookupSource.NONE
    assert store.calls == calls  # the store was not asked while open
    assert events.count("failure:timeout") == 6
    assert events[-3:] == ["breaker:open", "skip", "skip"]


async def test_failures_under_the_minimum_count_never_open_it() -> None:
    store = FlakyStore()
    store.fail_with = StoreTimeout("slow")
    lookup = resilient(store, Clock(), min_lookups=20)
    for _ in range(19):
        await lookup.lookup(LINE)
    assert lookup.state is BreakerState.CLOSED
    await lookup.lookup(LINE)
    assert lookup.state is BreakerState.OPEN


async def test_old_failures_leave_the_window() -> None:
    store = FlakyStore()
    clock = Clock()
    lookup = resilient(store, clock, min_lookups=4, window=10.0)
    store.fail_with = StoreTimeout("slow")
    for _ in range(3):
        await lookup.lookup(LINE)
    clock.now += 11  # those three are out of the window now
    store.fail_with = None
    await lookup.lookup(LINE)
    store.fail_with = StoreTimeout("slow")
    await lookup.lookup(LINE)
    await lookup.lookup(LINE)
    assert lookup.state is BreakerState.CLOSED  # 2 failures in the window: under the minimum
    await lookup.lookup(LINE)
    assert lookup.state is BreakerState.OPEN  # 3 of 4


async def test_a_refused_connection_opens_it_at_once() -> None:
    store = FlakyStore()
    store.fail_with = StoreUnreachable("redis connect failed: refused", connect=True)
    events: list[str] = []
    lookup = resilient(store, Clock(), events)
    result = await lookup.lookup(LINE)
    assert result.failure == "connection"
    assert lookup.state is BreakerState.OPEN
    assert events == ["failure:connection", "breaker:open"]


async def test_one_failed_connection_attempt_counts_once_however_many_lookups_it_failed() -> None:
    store = FlakyStore()
    clock = Clock()
    lookup = resilient(store, clock, connect_failures=2)
    first, second = object(), object()
    store.failures = [
        StoreUnreachable("refused", connect=True, incident=first) for _ in range(5)
    ] + [StoreUnreachable("refused", connect=True, incident=second)]
    for _ in range(5):
        await lookup.lookup(LINE)
    assert lookup.state is BreakerState.CLOSED
    await lookup.lookup(LINE)
    assert lookup.state is BreakerState.OPEN


async def test_a_success_resets_the_run_of_connection_failures() -> None:
    store = FlakyStore()
    lookup = resilient(store, Clock(), connect_failures=2)
    store.failures = [StoreUnreachable("refused", connect=True)]
    await lookup.lookup(LINE)
    await lookup.lookup(LINE)  # succeeds
    store.failures = [StoreUnreachable("refused", connect=True)]
    await lookup.lookup(LINE)
    assert lookup.state is BreakerState.CLOSED


async def test_half_open_lets_a_trickle_of_trials_through_and_recovers() -> None:
    store = FlakyStore()
    clock = Clock()
    events: list[str] = []
    lookup = resilient(store, clock, events, open_for=2.0, trial_lookups=2)
    store.fail_with = StoreUnreachable("refused", connect=True)
    await lookup.lookup(LINE)
    assert lookup.state is BreakerState.OPEN
    clock.now += 1.0
    calls = store.calls
    await lookup.lookup(LINE)
    assert store.calls == calls  # still open
    clock.now += 1.5
    store.fail_with = None
    assert lookup.state is BreakerState.HALF_OPEN
    first = await lookup.lookup(LINE)
    assert first.source is LookupSource.STORE  # trial 1
    assert lookup.state is BreakerState.HALF_OPEN
    assert (await lookup.lookup(LINE)).source is LookupSource.STORE  # trial 2
    assert lookup.state is BreakerState.CLOSED and not lookup.degraded
    assert events == [
        "failure:connection",
        "breaker:open",
        "skip",
        "breaker:half_open",
        "breaker:closed",
    ]


async def test_only_one_trial_at_a_time_while_half_open() -> None:
    store = HangingStore()
    clock = Clock()
    lookup = ResilientLookup(
        store,
        options=LookupOptions(timeout=5.0, breaker=BreakerOptions(open_for=1.0)),
        clock=clock,
    )
    lookup.health(False)
    clock.now += 1.0
    trial = asyncio.create_task(lookup.lookup(LINE))
    while store.calls == 0:
        await asyncio.sleep(0)
    others = [await lookup.lookup(LINE) for _ in range(3)]
    assert all(r.source is LookupSource.NONE and r.failure is None for r in others)
    assert store.calls == 1  # the others were skipped while the trial was out
    store.release.set()
    assert (await trial).source is LookupSource.STORE


async def test_a_failed_trial_opens_it_again() -> None:
    store = FlakyStore()
    clock = Clock()
    lookup = resilient(store, clock, open_for=1.0)
    store.fail_with = StoreUnreachable("refused", connect=True)
    await lookup.lookup(LINE)
    clock.now += 1.0
    store.fail_with = StoreTimeout("slow")
    result = await lookup.lookup(LINE)  # the trial: a plain timeout is enough now
    assert result.failure == "timeout"
    assert lookup.state is BreakerState.OPEN
    clock.now += 0.5
    calls = store.calls
    await lookup.lookup(LINE)
    assert store.calls == calls


async def test_health_check_opens_it_and_a_good_one_starts_trials_at_once() -> None:
    store = FlakyStore()
    clock = Clock()
    lookup = resilient(store, clock, open_for=30.0, trial_lookups=2)
    lookup.health(True)
    assert lookup.state is BreakerState.CLOSED
    lookup.health(False)
    assert lookup.state is BreakerState.OPEN
    lookup.health(False)  # still down: stays open
    assert lookup.state is BreakerState.OPEN
    lookup.reset_cooldown()  # the health check's older name: the same as health(True)
    assert lookup.state is BreakerState.HALF_OPEN
    assert (await lookup.lookup(LINE)).source is LookupSource.STORE
    assert lookup.state is BreakerState.CLOSED  # one good check and one good trial


async def test_good_health_checks_close_it_without_any_call() -> None:
    store = FlakyStore()
    clock = Clock()
    lookup = resilient(store, clock, open_for=30.0, trial_lookups=3)
    store.fail_with = StoreUnreachable("refused", connect=True)
    await lookup.lookup(LINE)
    assert lookup.state is BreakerState.OPEN
    for _ in range(2):
        clock.now += 1
        lookup.health(True)
        assert lookup.state is BreakerState.HALF_OPEN
    clock.now += 1
    lookup.health(True)
    assert lookup.state is BreakerState.CLOSED and not lookup.degraded


async def test_good_health_checks_while_closed_keep_the_window() -> None:
    store = FlakyStore()
    clock = Clock()
    lookup = resilient(store, clock, min_lookups=4, trial_lookups=1)
    store.fail_with = StoreTimeout("slow")
    for _ in range(3):
        await lookup.lookup(LINE)
        lookup.health(True)  # a fast PING says nothing about slow lookups
    await lookup.lookup(LINE)
    assert lookup.state is BreakerState.OPEN


async def test_invalid_records_are_the_lines_problem_not_the_stores() -> None:
    store = FlakyStore()
    events: list[str] = []
    lookup = resilient(store, Clock(), events, min_lookups=2)
    store.fail_with = InvalidRecord("field b'provider_endpoint' is not UTF-8")
    for _ in range(10):
        result = await lookup.lookup(LINE)
        assert (result.source, result.failure) == (LookupSource.INVALID, "invalid_record")
    assert lookup.state is BreakerState.CLOSED
    assert events == ["failure:invalid_record"] * 10


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (PoolExhausted("every connection busy"), "pool_wait"),
        (StoreUnreachable("connection reset"), "connection"),
        (StoreError("redis refused the lookup: NOPERM"), "error"),
    ],
)
async def test_failures_are_reported_by_kind(error: StoreError, kind: str) -> None:
    store = FlakyStore()
    store.failures = [error]
    events: list[str] = []
    lookup = resilient(store, Clock(), events)
    result = await lookup.lookup(LINE)
    assert (result.source, result.failure) == (LookupSource.NONE, kind)
    assert events == [f"failure:{kind}"]
    assert lookup.state is BreakerState.CLOSED  # a dropped connection is not a refusal


async def test_immediate_path_goes_through_the_breaker_too() -> None:
    store = MemoryStore({LINE: RECORD})
    clock = Clock()
    lookup = ResilientLookup(
        store, options=LookupOptions(breaker=BreakerOptions(min_lookups=2)), clock=clock
    )
    first = lookup.lookup_now(LINE)
    assert first is not None and first.source is LookupSource.STORE
    store.available = False
    lookup.lookup_now(LINE)
    assert lookup.state is BreakerState.OPEN  # 1 of 2 failed
    skipped = lookup.lookup_now(LINE)
    assert skipped is not None and (skipped.source, skipped.record) == (LookupSource.CACHE, RECORD)


async def test_a_cancelled_trial_frees_the_trial_slot() -> None:
    store = HangingStore()
    clock = Clock()
    lookup = ResilientLookup(store, options=LookupOptions(timeout=5.0), clock=clock)
    lookup.health(False)
    lookup.health(True)
    trial = asyncio.create_task(lookup.lookup(LINE))
    while store.calls == 0:
        await asyncio.sleep(0)
    trial.cancel()
    with pytest.raises(asyncio.CancelledError):
        await trial
    store.release.set()
    assert (await lookup.lookup(LINE)).source is LookupSource.STORE  # a new trial went out


def test_breaker_alone_with_explicit_time() -> None:
    changes: list[BreakerState] = []
    breaker = CircuitBreaker(
        BreakerOptions(min_lookups=3, failure_ratio=1.0, open_for=5.0, trial_lookups=1),
        on_change=changes.append,
    )
    for now in (0.0, 0.1):
        assert breaker.admit(now) is Admission.ASK
        breaker.failed(now, "slow")
    assert breaker.state(0.2) is BreakerState.CLOSED
    breaker.failed(0.2, "slow")
    assert breaker.state(0.2) is BreakerState.OPEN
    assert breaker.admit(4.9) is Admission.SKIP
    assert breaker.admit(5.2) is Admission.TRIAL
    assert breaker.admit(5.3) is Admission.SKIP
    breaker.succeeded(5.4, trial=True)
    assert breaker.state(5.4) is BreakerState.CLOSED
    assert changes == [BreakerState.OPEN, BreakerState.HALF_OPEN, BreakerState.CLOSED]
