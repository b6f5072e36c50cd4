"""The location store contract shared by the edge (reader) and provisioning (writer).

The Redis layout is part of the product's contract (see README, "Location store schema"):
one hash per line at ``{prefix}{10 digits}`` with field ``provider_endpoint`` =
``{bw_account_id}/{endpoint_id}`` (required) and optional ``callback`` (10 digits) and
``updated_at`` (ISO 8601, UTC).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

DEFAULT_KEY_PREFIX = "e911:line:"

_PROVIDER_ENDPOINT = re.compile(r"[A-Za-z0-9]+/[A-Za-z0-9]{1,64}")
_LINE = re.compile(r"[0-9]{10}")


class StoreError(Exception):
    """The store could not answer (down, slow, refused). Raised instead of client errors."""

    kind = "error"
    """The failure's label on ``e911_sip_store_lookup_failures_total``."""

    def __init__(self, message: str, *, incident: object | None = None) -> None:
        super().__init__(message)
        self.incident = incident
        """Shared by every lookup that one event failed (all on a dropped connection),
        so the circuit breaker counts the event once; None when the failure is this
        lookup's own."""


class StoreTimeout(StoreError):
    """The store did not answer within the lookup bound."""

    kind = "timeout"


class StoreUnreachable(StoreError):
    """A connection to the store could not be opened, or broke while a lookup waited."""

    kind = "connection"

    def __init__(
        self, message: str, *, incident: object | None = None, connect: bool = False
    ) -> None:
        super().__init__(message, incident=incident)
        self.connect = connect
        """True when no connection could be opened at all (refused, unreachable): strong
        evidence that the store is down, unlike a timeout or one dropped connection."""


class PoolExhausted(StoreError):
    """Every store connection stayed busy for as long as the lookup could wait."""

    kind = "pool_wait"


class StoreNotReady(Exception):
    """An in-memory store has not finished its first load: ask :meth:`LocationStore.lookup`
    instead of :meth:`ImmediateLocationStore.lookup_now`. Not a failure of the store."""


class InvalidRecord(StoreError):
    """A record that breaks the schema, holds bytes that are not UTF-8, or is not a hash:
    that line's problem, never the store's. The edge treats the line as unprovisioned."""

    kind = "invalid_record"


@dataclass(frozen=True, slots=True)
class LocationRecord:
    """A line's provisioned emergency location, as stored."""

    provider_endpoint: str
    """``{bw_account_id}/{endpoint_id}``: appended to the Geolocation base URL."""
    callback: str | None = None
    """10-digit NANP callback number, when it differs from the calling line."""
    updated_at: str | None = None
    """When provisioning last wrote the record (ISO 8601), for operators."""

    def to_fields(self) -> dict[str, str]:
        """The hash fields this record is stored as."""
        fields = {"provider_endpoint": self.provider_endpoint}
        if self.callback:
            fields["callback"] = self.callback
        if self.updated_at:
            fields["updated_at"] = self.updated_at
        return fields

    @classmethod
    def from_fields(cls, fields: Mapping[str, str]) -> LocationRecord:
        """Validate stored hash fields.

        Raises:
            InvalidRecord: ``provider_endpoint`` is missing or malformed, or ``callback`` is
                not 10 digits.
        """
        endpoint = fields.get("provider_endpoint", "")
        if not _PROVIDER_ENDPOINT.fullmatch(endpoint):
            raise InvalidRecord(f"provider_endpoint {endpoint!r} is not account/endpoint")
        callback = fields.get("callback") or None
        if callback is not None and not _LINE.fullmatch(callback):
            raise InvalidRecord(f"callback {callback!r} is not 10 digits")
        return cls(endpoint, callback, fields.get("updated_at") or None)


def check_line(line: str) -> str:
    """Return ``line`` if it is 10 digits, else raise ValueError."""
    if not _LINE.fullmatch(line):
        raise ValueError(f"line {line!r} is not a 10-digit NANP number")
    return line


class LocationStore(Protocol):
    """What the edge needs: one lookup per emergency call."""

    async def lookup(self, line: str) -> LocationRecord | None:
        """The record for a 10-digit line, or None when it has none.

        Raises:
            StoreError: the store could not answer; the caller falls back.
        """
        ...

    async def ping(self) -> bool:
        """True when the store answers; never raises."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...


@runtime_checkable
class DeadlineLocationStore(LocationStore, Protocol):
    """A store that bounds a lookup itself and says where the time went (waiting for a
    connection, or waiting for the answer)."""

    async def lookup_within(self, line: str, timeout: float) -> LocationRecord | None:
        """As :meth:`LocationStore.lookup`, answered or failed within ``timeout`` seconds.

        Raises:
            PoolExhausted: no connection became free in time.
            StoreTimeout: the answer did not come in time.
            StoreError: the store could not answer.
        """
        ...


@runtime_checkable
class ImmediateLocationStore(LocationStore, Protocol):
    """A store that can answer without waiting (in memory): the edge then enriches an
    emergency INVITE in the same turn of the event loop that received it."""

    def lookup_now(self, line: str) -> LocationRecord | None:
        """As :meth:`LocationStore.lookup`, synchronously.

        Raises:
            StoreNotReady: it cannot answer from memory yet; the caller awaits ``lookup``.
        """
        ...


@dataclass(frozen=True, slots=True)
class SyncState:
    """How an in-memory copy of the records stands against their source (``/readyz``)."""

    loaded: bool
    """A full load has completed at least once: lookups are answered from memory."""
    in_sync: bool
    """The copy follows the source right now."""
    records: int
    age: float
    """Seconds since the copy was last known to match the source (0 while in sync; infinite
    before the first load)."""
    loads: int
    """Full loads completed."""
    updates: int = 0
    """Records re-read after a change in the source."""


@runtime_checkable
class MirroredLocationStore(ImmediateLocationStore, Protocol):
    """An immediate store that holds a copy of another and keeps it current."""

    def state(self) -> SyncState:
        """Where the copy stands."""
        ...


class LineRecordWriter(Protocol):
    """What provisioning needs: atomic writes of line records."""

    async def put_records(
        self, records: Mapping[str, LocationRecord], deletions: frozenset[str] = frozenset()
    ) -> None:
        """Write several lines' records and delete others as one atomic step.

        A reader never sees half a record: each hash is replaced whole.

        Raises:
            StoreError: nothing was written.
        """
        ...

    async def all_lines(self) -> dict[str, LocationRecord]:
        """Every stored line record (for resync and audits); invalid ones are skipped."""
        ...

    async def delete_unchanged(self, records: Mapping[str, LocationRecord]) -> frozenset[str]:
        """Delete each line whose stored record is still exactly the one given (as
        :meth:`all_lines` read it), each as one atomic step; the lines deleted.

        A line another process wrote since it was read keeps its new record: an orphan
        pruned by one provisioning host must not take a record another host just wrote.

        Raises:
            StoreError: the store could not be reached (some lines may be deleted).
        """
        ...
