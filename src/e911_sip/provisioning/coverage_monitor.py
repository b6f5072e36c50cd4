"""Keeps the coverage figures current: reads the sources, feeds the gauges, tracks orders.

The figures themselves come from the pure :func:`~e911_sip.provisioning.coverage.compute`.
This module supplies its inputs and publishes its result:

- :class:`TrackedProvider` wraps the Bandwidth client the service uses and remembers the
  endpoint orders that are running or that failed. The service follows every order to its
  end inside the request and keeps nothing of a refused change, so this is the only place
  a failed order is known after its request has answered. It is this process's memory: a
  restart forgets the failures (the lines concerned still show as not covered, only the
  order detail goes), and at most ``max_failed_orders`` are kept, oldest dropped first and
  counted;
- :class:`NotifyingStateStore` wraps the state store and asks for a refresh after every
  save or delete, so the gauges follow writes without the service knowing about them;
- :class:`CoverageMonitor` computes the figures on demand (``GET /v1/coverage``) and in
  the background: every ``interval`` seconds, and after writes, at most once every
  ``min_gap`` seconds however many writes come (a bulk import costs one pass a gap, not one
  per line), and never more than a tenth of the time (a pass of ``d`` seconds is followed
  by at least ``9 d`` of rest).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol, runtime_checkable

from e911_sip.metrics import Metrics
from e911_sip.provisioning.bandwidth import BandwidthError, Endpoint, OrderFailed
from e911_sip.provisioning.coverage import (
    LINE_STATES,
    Coverage,
    OrderAttempt,
    OrderStatus,
    compute,
)
from e911_sip.provisioning.lease import Held
from e911_sip.provisioning.model import Address, CustomerState, StandardizedAddress
from e911_sip.provisioning.service import EmergencyProvider, ServiceError
from e911_sip.provisioning.state import StateError, StateStore
from e911_sip.store.base import LineRecordWriter, StoreError

_LOG = logging.getLogger("e911_sip.provisioning.coverage")


@dataclass(frozen=True, slots=True, kw_only=True)
class CoverageOptions:
    """How often the coverage figures are recomputed, and the share that should alert."""

    interval: float = 60.0
    """Seconds between background recomputations when nothing is written."""
    min_gap: float = 2.0
    """Seconds at least between two recomputations that writes asked for."""
    alert_below: float = 0.99
    """Share of lines covered below which ``E911CoverageLow`` fires (exported as
    ``e911_sip_coverage_alert_below`` so the rule compares against it)."""
    max_failed_orders: int = 1000
    """Failed endpoint orders remembered at most; beyond it the oldest is forgotten."""


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


class OrderTracker:
    """Endpoint orders running now, and those that failed since this process started."""

    def __init__(
        self,
        *,
        max_failed: int = 1000,
        on_change: Callable[[], None] | None = None,
        on_forgotten: Callable[[], None] | None = None,
    ) -> None:
        self._max_failed = max_failed
        self._running: dict[str, tuple[OrderAttempt, int]] = {}
        self._failed: OrderedDict[str, OrderAttempt] = OrderedDict()
        self.on_change = on_change
        self._on_forgotten = on_forgotten

    def attempts(self) -> list[OrderAttempt]:
        """Every open attempt: running ones win over an earlier failure of the same id."""
        out = dict(self._failed)
        out.update({eid: attempt for eid, (attempt, _) in self._running.items()})
        return list(out.values())

    def started(self, endpoint_id: str, phone_number: str) -> None:
        attempt, count = self._running.get(endpoint_id, (None, 0))
        if attempt is None:
            attempt = OrderAttempt(
                endpoint_id=endpoint_id,
                phone_number=phone_number,
                status=OrderStatus.PENDING,
                at=_now(),
            )
        self._running[endpoint_id] = (attempt, count + 1)
        self.changed()

    def finished(
        self, endpoint_id: str, error: BandwidthError | None, *, known: bool = True
    ) -> None:
        """The order ended: succeeded (``error`` None), failed, or ``known=False`` when its
        outcome is not known (the request was cancelled)."""
        attempt, count = self._running.pop(endpoint_id)
        if count > 1:
            self._running[endpoint_id] = (attempt, count - 1)
        if known:
            # Re-inserted, so the newest failure is the last to be forgotten.
            self._failed.pop(endpoint_id, None)
        if known and error is not None:
            self._failed[endpoint_id] = OrderAttempt(
                endpoint_id=endpoint_id,
                phone_number=attempt.phone_number,
                status=OrderStatus.FAILED,
                at=_now(),
                error=f"{error.type or type(error).__name__}: {error.description}",
                order_id=error.order_id if isinstance(error, OrderFailed) else None,
            )
            while len(self._failed) > self._max_failed:
                self._failed.popitem(last=False)
                if self._on_forgotten is not None:
                    self._on_forgotten()
        self.changed()

    def changed(self) -> None:
        """Something the figures depend on changed (an order, a saved customer)."""
        if self.on_change is not None:
            self.on_change()

    def forget(self, endpoint_id: str) -> None:
        """The endpoint is gone at Bandwidth: its failure no longer matters."""
        if self._failed.pop(endpoint_id, None) is not None:
            self.changed()


class TrackedProvider:
    """An EmergencyProvider that tells an OrderTracker about endpoint orders."""

    def __init__(self, provider: EmergencyProvider, tracker: OrderTracker) -> None:
        self._provider = provider
        self._tracker = tracker

    @property
    def account_id(self) -> str:
        return self._provider.account_id

    async def create_address(self, address: Address, *, description: str) -> StandardizedAddress:
        return await self._provider.create_address(address, description=description)

    async def delete_address(self, address_id: str) -> None:
        await self._provider.delete_address(address_id)

    async def provision_endpoint(
        self, *, endpoint_id: str, phone_number: str, name: str, address_id: str
    ) -> Endpoint:
        self._tracker.started(endpoint_id, phone_number)
        try:
            endpoint = await self._provider.provision_endpoint(
                endpoint_id=endpoint_id,
                phone_number=phone_number,
                name=name,
                address_id=address_id,
            )
        except BandwidthError as exc:
            self._tracker.finished(endpoint_id, exc)
            raise
        except BaseException:
            # Cancelled or a bug: the order's outcome is unknown, so an earlier failure stays.
            self._tracker.finished(endpoint_id, None, known=False)
            raise
        self._tracker.finished(endpoint_id, None)
        return endpoint

    async def delete_endpoint(self, endpoint_id: str) -> None:
        await self._provider.delete_endpoint(endpoint_id)
        self._tracker.forget(endpoint_id)

    async def list_endpoints(self, *, address_id: str | None = None) -> list[Endpoint]:
        return await self._provider.list_endpoints(address_id=address_id)


@runtime_checkable
class BulkStateReader(Protocol):
    """A state store that reads every customer at once."""

    async def all_customers(self) -> list[CustomerState]: ...


class NotifyingStateStore:
    """A StateStore that calls ``on_write`` after each save or delete that succeeded."""

    def __init__(self, store: StateStore, on_write: Callable[[], None]) -> None:
        self._store = store
        self._on_write = on_write

    async def get(self, customer_id: str) -> CustomerState | None:
        return await self._store.get(customer_id)

    async def put(self, state: CustomerState) -> None:
        await self._store.put(state)
        self._on_write()

    async def delete(self, customer_id: str, *, version: int) -> None:
        await self._store.delete(customer_id, version=version)
        self._on_write()

    def lease(self, customer_id: str) -> contextlib.AbstractAsyncContextManager[Held]:
        return self._store.lease(customer_id)

    async def customer_ids(self) -> list[str]:
        return await self._store.customer_ids()

    async def all_customers(self) -> list[CustomerState]:
        """Every customer, in id order: in bulk where the store can (Redis: MGET)."""
        if isinstance(self._store, BulkStateReader):
            return await self._store.all_customers()
        out = []
        for cid in await self._store.customer_ids():
            state = await self._store.get(cid)
            if state is not None:
                out.append(state)
        return out

    async def owner(self, number: str) -> str | None:
        return await self._store.owner(number)

    async def ping(self) -> bool:
        return await self._store.ping()

    async def close(self) -> None:
        await self._store.close()


class CoverageMonitor:
    """Computes coverage from the provisioning state and the line records; feeds gauges."""

    def __init__(
        self,
        *,
        customers: Callable[[], Awaitable[list[CustomerState]]],
        lines: LineRecordWriter,
        tracker: OrderTracker,
        options: CoverageOptions,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._customers = customers
        self._lines = lines
        self._tracker = tracker
        self._options = options
        self._metrics = metrics
        self._clock = clock
        self._dirty = asyncio.Event()
        tracker.on_change = self.request_refresh

    @property
    def options(self) -> CoverageOptions:
        return self._options

    def request_refresh(self) -> None:
        """Something changed: recompute soon (coalesced, see ``min_gap``)."""
        self._dirty.set()

    async def current(self) -> Coverage:
        """Coverage now, read from the stores; the gauges are updated with it.

        Raises:
            ServiceError: 503 when the state or the line records cannot be read.
        """
        started = self._clock()
        try:
            states = await self._customers()
            records = await self._lines.all_lines()
        except StoreError as exc:
            self._count("error")
            raise ServiceError(
                503, "store_unavailable", f"line records could not be read: {exc}"
            ) from exc
        except StateError as exc:
            self._count("error")
            raise ServiceError(503, "state_unavailable", str(exc)) from exc
        except ServiceError:
            self._count("error")
            raise
        coverage = compute(states, records, self._tracker.attempts())
        self.publish(coverage)
        _LOG.debug(
            "coverage computed",
            extra={
                "lines": coverage.lines,
                "covered": coverage.covered,
                "seconds": round(self._clock() - started, 3),
            },
        )
        return coverage

    def publish(self, coverage: Coverage) -> None:
        """Set the gauges to ``coverage``."""
        self._count("ok")
        m = self._metrics
        if m is None:
            return
        for state in LINE_STATES:
            m.coverage_lines.labels(state.value).set(coverage.by_state[state])
        m.coverage_share.set(coverage.share)
        m.coverage_endpoints_pending.set(len(coverage.pending))
        m.coverage_endpoints_failed.set(len(coverage.failed))
        m.coverage_alert_below.set(self._options.alert_below)

    def _count(self, result: str) -> None:
        if self._metrics is not None:
            self._metrics.coverage_refreshes.labels(result).inc()

    async def run(self, stop: asyncio.Event) -> None:
        """Recompute every ``interval`` seconds and after writes until ``stop`` is set.

        However large the state, the background work stays under a tenth of the time: after
        a pass that took ``d`` seconds the next one waits at least ``9 d``.
        """
        while not stop.is_set():
            started = self._clock()
            self._dirty.clear()
            try:
                await self.current()
            except ServiceError as exc:
                _LOG.warning("coverage not computed: %s", exc.message)
            except Exception:
                _LOG.exception("coverage computation failed")
                self._count("error")
            took = self._clock() - started
            rest = max(self._options.min_gap, 9 * took)
            await _first(stop.wait(), self._dirty.wait(), timeout=max(self._options.interval, rest))
            wait = started + took + rest - self._clock()
            if wait > 0 and not stop.is_set():
                await _first(stop.wait(), timeout=wait)


async def _first(*waits: Awaitable[object], timeout: float) -> None:
    """Wait until one of ``waits`` finishes or ``timeout`` passes; cancel the rest."""
    tasks = [asyncio.ensure_future(w) for w in waits]
    try:
        await asyncio.wait(tasks, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
