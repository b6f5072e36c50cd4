"""One record per emergency call, accumulated from the proxy core's events (pure: no I/O).

RAY BAUM's Act asks the CSP to show which location went with each 911 call. The edge feeds
every core event to a :class:`CallRecordBook` with the wall-clock time it happened; the book
keeps one small record per live emergency call (keyed by Call-ID) and moves it to
``finished()`` when the call is over:

- a final non-2xx response to the INVITE (``end`` = ``failed``, or ``cancelled`` for 487);
- the BYE of an answered call (``bye``);
- no BYE within ``max_age`` of the INVITE (``max_age``: the BYE went another way, or was
  lost), the table being full (``capacity``: the oldest call is flushed), or the edge
  shutting down (``shutdown``).

A record is never dropped here without being finished: an incomplete record (no BYE time)
still says which location and which trunks went with the call.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from e911_sip.proxy.core import (
    CallCompleted,
    EmergencyCall,
    EmergencyForwarded,
    Event,
    FailOpen,
    Failover,
)
from e911_sip.timefmt import utc_millis

END_REASONS = ("bye", "failed", "cancelled", "max_age", "capacity", "shutdown", "replaced")
"""Why a record was finished."""

LEVELS = ("account", "site", "customer")

CSV_COLUMNS = (
    "id",
    "call_id",
    "caller",
    "callback",
    "number",
    "provider_endpoint",
    "level",
    "outcome",
    "trunks",
    "status",
    "end",
    "invite_at",
    "answered_at",
    "bye_at",
)
"""Columns of the CSV export; ``trunks`` is ``trunk=result`` pairs joined by ``;``."""


class RecordError(ValueError):
    """A stored or streamed record that does not have the record's shape."""


def iso_time(epoch: float) -> str:
    """``epoch`` as ISO 8601 UTC with milliseconds (``2026-12-01T20:41:02.123Z``)."""
    return utc_millis(epoch)


def parse_time(text: str) -> float:
    """ISO 8601 (a bare date or a time without a zone is UTC) or epoch seconds → epoch.

    Raises:
        ValueError: neither.
    """
    try:
        return float(text)
    except ValueError:
        pass
    value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.timestamp()


def record_id(invite_at: float, call_id: str) -> str:
    """A key that sorts by INVITE time and is the same each time one call is stored."""
    digest = hashlib.sha1(call_id.encode("utf-8", "replace"), usedforsecurity=False)
    return f"{round(invite_at * 1000):013d}-{digest.hexdigest()[:12]}"


def time_key(epoch: float) -> str:
    """The prefix of :func:`record_id` for ``epoch``: ids compare with it by time."""
    return f"{max(0, round(epoch * 1000)):013d}"


@dataclass(slots=True)
class TrunkAttempt:
    """One trunk an emergency INVITE was sent to."""

    trunk: str
    attempt: int
    """1 for the first trunk, 2 after one failover, ..."""
    enriched: bool
    """False when the INVITE went as it came (fail-open or an enrichment error)."""
    result: str | None = None
    """The final status this trunk's answer produced (``200``, ``487``, ...), or the
    failover reason (``503``, ``timeout``, ``no_provisional``, ``transport``); None while
    the trunk has not answered."""

    # Written out, as the core's events are: compiled, this one is native, where the
    # generated one runs as Python. A field added here goes into it too.
    def __init__(self, trunk: str, attempt: int, enriched: bool, result: str | None = None) -> None:
        self.trunk = trunk
        self.attempt = attempt
        self.enriched = enriched
        self.result = result

    def to_dict(self) -> dict[str, Any]:
        return {
            "trunk": self.trunk,
            "attempt": self.attempt,
            "enriched": self.enriched,
            "result": self.result,
        }


@dataclass(slots=True, kw_only=True)
class CallRecord:
    """What one emergency call carried and how it went."""

    call_id: str
    number: str
    """The emergency number dialled (911 or 933)."""
    invite_at: float
    """Epoch seconds the INVITE arrived."""
    caller: str | None = None
    """The calling line (10 digits), None when the INVITE named none."""
    callback: str | None = None
    """The callback number sent in P-Asserted-Identity."""
    provider_endpoint: str | None = None
    """``{bw_account_id}/{endpoint_id}`` sent in Geolocation, None when none was sent."""
    level: str | None = None
    """Where in the cascade the endpoint came from (account, site, customer), if known."""
    outcome: str | None = None
    """The enrichment outcome: enriched, no_location, store_error, cached, invalid_record,
    no_caller, enrich_error or fail_open."""
    trunks: list[TrunkAttempt] = field(default_factory=list)
    status: int | None = None
    """The final status that went back to the softswitch; None if none did."""
    answered_at: float | None = None
    bye_at: float | None = None
    end: str | None = None
    """Why the record was finished (one of :data:`END_REASONS`)."""

    # Written out (see TrunkAttempt); ``trunks`` None is a new list, as the default factory.
    def __init__(
        self,
        *,
        call_id: str,
        number: str,
        invite_at: float,
        caller: str | None = None,
        callback: str | None = None,
        provider_endpoint: str | None = None,
        level: str | None = None,
        outcome: str | None = None,
        trunks: list[TrunkAttempt] | None = None,
        status: int | None = None,
        answered_at: float | None = None,
        bye_at: float | None = None,
        end: str | None = None,
    ) -> None:
        self.call_id = call_id
        self.number = number
        self.invite_at = invite_at
        self.caller = caller
        self.callback = callback
        self.provider_endpoint = provider_endpoint
        self.level = level
        self.outcome = outcome
        self.trunks = [] if trunks is None else trunks
        self.status = status
        self.answered_at = answered_at
        self.bye_at = bye_at
        self.end = end

    @property
    def id(self) -> str:
        return record_id(self.invite_at, self.call_id)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (times in ISO 8601 UTC), as the API, the export and the stores
        hold it."""
        return {
            "id": self.id,
            "call_id": self.call_id,
            "caller": self.caller,
            "callback": self.callback,
            "number": self.number,
            "provider_endpoint": self.provider_endpoint,
            "level": self.level,
            "outcome": self.outcome,
            "trunks": [t.to_dict() for t in self.trunks],
            "status": self.status,
            "end": self.end,
            # utc_millis itself, not iso_time's call around it: three times a record.
            "invite_at": utc_millis(self.invite_at),
            "answered_at": utc_millis(self.answered_at) if self.answered_at is not None else None,
            "bye_at": utc_millis(self.bye_at) if self.bye_at is not None else None,
        }

    def csv_row(self) -> list[str]:
        """The record's :data:`CSV_COLUMNS`, empty strings for what is unknown."""
        data = self.to_dict()
        data["trunks"] = ";".join(f"{t.trunk}={t.result or ''}" for t in self.trunks)
        return ["" if data[c] is None else str(data[c]) for c in CSV_COLUMNS]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CallRecord:
        """Read :meth:`to_dict`'s form back.

        Raises:
            RecordError: a field is missing or has the wrong type.
        """
        try:
            trunks = [
                TrunkAttempt(
                    trunk=str(t["trunk"]),
                    attempt=int(t["attempt"]),
                    enriched=bool(t["enriched"]),
                    result=None if t.get("result") is None else str(t["result"]),
                )
                for t in data.get("trunks") or []
            ]
            status = data.get("status")
            level = data.get("level")
            if level is not None and level not in LEVELS:
                raise RecordError(f"level {level!r} is not one of {', '.join(LEVELS)}")
            return cls(
                call_id=_text(data, "call_id"),
                number=_text(data, "number"),
                invite_at=parse_time(_text(data, "invite_at")),
                caller=_optional(data, "caller"),
                callback=_optional(data, "callback"),
                provider_endpoint=_optional(data, "provider_endpoint"),
                level=level,
                outcome=_optional(data, "outcome"),
                trunks=trunks,
                status=None if status is None else int(status),
                answered_at=_optional_time(data, "answered_at"),
                bye_at=_optional_time(data, "bye_at"),
                end=_optional(data, "end"),
            )
        except RecordError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise RecordError(f"not a call record: {exc!r}") from exc


def _text(data: Mapping[str, Any], key: str) -> str:
    value = data[key]
    if not isinstance(value, str) or not value:
        raise RecordError(f"{key}: expected a non-empty string, got {value!r}")
    return value


def _optional(data: Mapping[str, Any], key: str) -> str | None:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise RecordError(f"{key}: expected a string or null, got {value!r}")
    return value


def _optional_time(data: Mapping[str, Any], key: str) -> float | None:
    value = _optional(data, key)
    return None if value is None else parse_time(value)


@dataclass(frozen=True, slots=True, kw_only=True)
class BookOptions:
    """Bounds of the records in progress."""

    max_calls: int = 10_000
    """Emergency calls with a record in progress; a new call beyond it finishes the oldest
    (``end`` = ``capacity``)."""
    max_age: float = 14_400.0
    """Seconds after the INVITE at which a call with no BYE seen is finished (``max_age``)."""


class CallRecordBook:
    """Records of the emergency calls in progress, fed with core events and wall-clock time."""

    def __init__(self, options: BookOptions | None = None) -> None:
        self._options = options or BookOptions()
        # Insertion order is INVITE order: the first entry is the oldest call. Ordered, not
        # a dict: calls end roughly oldest first, and a dict finds its first entry by
        # scanning the slots emptied at its front (expiring many at once: their square).
        self._calls: OrderedDict[str, CallRecord] = OrderedDict()
        self._finished: list[CallRecord] = []
        self.evicted = 0
        """Records finished because the table was full."""

    @property
    def in_progress(self) -> int:
        return len(self._calls)

    @property
    def has_finished(self) -> bool:
        """True when :meth:`finished` has records to give."""
        return bool(self._finished)

    def finished(self) -> list[CallRecord]:
        """The records finished since the last call, oldest first (and forget them)."""
        out, self._finished = self._finished, []
        return out

    def event(self, event: Event, now: float) -> bool:
        """Apply one core event that happened at ``now`` (epoch seconds); True when
        :meth:`finished` has records to give (the caller need not ask)."""
        # By the event's own class (the core's events are not subclassed; the recorder
        # passes on only these five by class already), the two of every call first: the
        # isinstance chain before made CallCompleted, twice a call, pay for five tests.
        if type(event) is EmergencyCall:
            self._begin(event.call_id, event.number, now)
        elif type(event) is CallCompleted:
            self._completed(event, now)
        elif type(event) is EmergencyForwarded:
            call = self._calls.get(event.call_id)
            if call is not None:
                call.trunks.append(TrunkAttempt(event.trunk, event.attempt, event.enriched))
        elif type(event) is Failover:
            call = self._calls.get(event.call_id) if event.emergency else None
            if call is not None:
                _settle_trunk(call, event.trunk, event.reason)
        elif type(event) is FailOpen:
            call = self._calls.get(event.call_id)
            if call is not None:
                call.outcome = "fail_open"
        return bool(self._finished)

    def enrichment(
        self,
        call_id: str,
        *,
        outcome: str,
        caller: str | None,
        callback: str | None,
        provider_endpoint: str | None,
    ) -> None:
        """What the lookup and the enrichment decided for ``call_id``."""
        call = self._calls.get(call_id)
        if call is None:
            return
        call.caller = caller
        call.callback = callback
        if call.outcome == "fail_open":
            # The original INVITE already left: whatever the lookup found did not go out.
            return
        call.outcome = outcome
        call.provider_endpoint = provider_endpoint

    def expire(self, now: float) -> None:
        """Finish the calls whose INVITE is older than ``max_age``."""
        limit = now - self._options.max_age
        while self._calls:
            call = next(iter(self._calls.values()))
            if call.invite_at > limit:
                break
            self._finish(call, "max_age")

    def flush(self, reason: str = "shutdown") -> None:
        """Finish every call in progress with ``reason``."""
        for call in list(self._calls.values()):
            self._finish(call, reason)

    def _begin(self, call_id: str, number: str, now: float) -> None:
        previous = self._calls.get(call_id)
        if previous is not None:
            self._finish(previous, "replaced")
        while len(self._calls) >= self._options.max_calls > 0:
            self.evicted += 1
            self._finish(next(iter(self._calls.values())), "capacity")
        if self._options.max_calls <= 0:
            return
        self._calls[call_id] = CallRecord(call_id=call_id, number=number, invite_at=now)

    def _completed(self, event: CallCompleted, now: float) -> None:
        call = self._calls.get(event.call_id)
        if call is None:
            return
        if event.method == "BYE":
            if call.answered_at is not None:
                call.bye_at = now
                self._finish(call, "bye")
            return
        if event.method != "INVITE" or not event.emergency or call.status is not None:
            return
        call.status = event.status
        if event.trunk is not None:
            _settle_trunk(call, event.trunk, str(event.status))
        if 200 <= event.status < 300:
            call.answered_at = now
        else:
            self._finish(call, "cancelled" if event.status == 487 else "failed")

    def _finish(self, call: CallRecord, reason: str) -> None:
        self._calls.pop(call.call_id, None)
        call.end = reason
        self._finished.append(call)


def _settle_trunk(call: CallRecord, trunk: str, result: str) -> None:
    for attempt in reversed(call.trunks):
        if attempt.trunk == trunk and attempt.result is None:
            attempt.result = result
            return
