"""When a held lease counts as lost, with the clock injected (Redis itself: see
tests/integration/test_provisioning_concurrency.py)."""

from __future__ import annotations

from e911_sip.provisioning.lease import Lease, LeaseBusy, LocalLease


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_lease_is_valid_for_ttl_from_the_write_redis_confirmed() -> None:
    clock = Clock()
    lease = Lease(key="k", token="t", ttl=15.0, waited=0.0, clock=clock)
    assert lease.lost  # nothing confirmed yet
    lease.confirmed(99.0)  # sent before the clock read 100
    clock.now = 113.9
    assert not lease.lost
    clock.now = 114.0
    assert lease.lost
    # A renewal sent in time extends it from when it was sent, never shortens it.
    lease.confirmed(110.0)
    assert not lease.lost
    lease.confirmed(101.0)
    clock.now = 124.9
    assert not lease.lost


def test_a_lease_found_taken_is_lost_at_once() -> None:
    clock = Clock()
    lease = Lease(key="k", token="t", ttl=15.0, waited=0.5, clock=clock)
    lease.confirmed(clock.now)
    assert lease.contended and not lease.lost
    lease.taken()
    assert lease.lost


def test_single_process_leases_are_never_lost_or_waited_for() -> None:
    lease = LocalLease()
    assert (lease.lost, lease.contended, lease.waited) == (False, False, 0.0)


def test_busy_says_what_and_how_long() -> None:
    busy = LeaseBusy("customer:acme", 60.04)
    assert str(busy) == "customer:acme is being changed by another process (waited 60.0s)"
