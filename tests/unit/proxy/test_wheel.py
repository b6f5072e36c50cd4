"""The proxy's timer wheel: deadlines rounded up to 1/64 s ticks, one slot per target."""

from __future__ import annotations

import pytest

from e911_sip.proxy.wheel import TimerWheel


class Target:
    def __init__(self, name: str) -> None:
        self.name = name


def fired(wheel: TimerWheel, now: float) -> list[tuple[str, float]]:
    out: list[tuple[str, float]] = []
    for target, fire in wheel.pop_due(now):
        fire(target, now)
        assert isinstance(target, Target)
        out.append((target.name, now))
    return out


def noop(_target: Target, _now: float) -> None:
    pass


def test_a_deadline_on_a_tick_fires_on_it_and_never_early() -> None:
    wheel = TimerWheel()
    a = Target("a")
    wheel.schedule(a, 0.5, noop)
    assert wheel.next_deadline() == 0.5
    assert fired(wheel, 0.49) == []
    assert fired(wheel, 0.5) == [("a", 0.5)]
    assert wheel.next_deadline() is None and len(wheel) == 0


def test_a_deadline_between_ticks_rounds_up_by_less_than_a_tick() -> None:
    wheel = TimerWheel()
    wheel.schedule(Target("a"), 1.001, noop)
    due = wheel.next_deadline()
    assert due is not None and 1.001 <= due < 1.001 + 1 / 64
    assert fired(wheel, 1.001) == []
    assert [name for name, _ in fired(wheel, due)] == ["a"]


def test_targets_in_one_tick_share_one_wake_up_and_fire_in_the_order_scheduled() -> None:
    wheel = TimerWheel()
    for name, deadline in (("late", 2.0), ("b", 1.0), ("a", 0.99), ("c", 1.0)):
        wheel.schedule(Target(name), deadline, noop)
    assert wheel.next_deadline() == 1.0
    assert [name for name, _ in fired(wheel, 1.0)] == ["b", "a", "c"]
    assert wheel.next_deadline() == 2.0


def test_rescheduling_moves_the_one_slot_and_cancelling_removes_it() -> None:
    wheel = TimerWheel()
    a, b = Target("a"), Target("b")
    wheel.schedule(a, 1.0, noop)
    wheel.schedule(a, 3.0, noop)
    wheel.schedule(b, 2.0, noop)
    assert wheel.deadline_of(a) == 3.0 and len(wheel) == 2
    assert wheel.next_deadline() == 2.0
    wheel.cancel(b)
    wheel.cancel(b)  # twice is harmless
    assert wheel.next_deadline() == 3.0
    assert fired(wheel, 10.0) == [("a", 10.0)]
    assert wheel.deadline_of(a) is None


def test_a_callback_may_schedule_again() -> None:
    wheel = TimerWheel()
    seen: list[float] = []

    def again(target: Target, now: float) -> None:
        seen.append(now)
        if len(seen) < 3:
            wheel.schedule(target, now + 0.5, again)

    wheel.schedule(Target("a"), 0.5, again)
    while (due := wheel.next_deadline()) is not None:
        for target, fire in wheel.pop_due(due):
            fire(target, due)
    assert seen == [0.5, 1.0, 1.5]


def test_the_tick_must_be_a_power_of_two() -> None:
    with pytest.raises(ValueError, match="power of two"):
        TimerWheel(100)
    assert TimerWheel(32).next_deadline() is None


def test_moving_timers_back_and_forth_does_not_grow_the_wheel() -> None:
    wheel = TimerWheel()
    a = Target("a")
    for _ in range(1000):
        wheel.schedule(a, 5.0, noop)
        wheel.cancel(a)
        wheel.schedule(a, 7.0, noop)
    assert len(wheel._ticks) == 2 and len(wheel._buckets) == 2
    assert wheel.next_deadline() == 7.0
    wheel.cancel(a)
    assert wheel.next_deadline() is None and not wheel._ticks and not wheel._buckets


def test_an_infinite_deadline_never_fires() -> None:
    wheel = TimerWheel()
    a = Target("a")
    wheel.schedule(a, 1.0, noop)
    wheel.schedule(a, float("inf"), noop)
    assert wheel.next_deadline() is None and len(wheel) == 0
