"""UTC times as text with milliseconds, the one form the edge writes into call records and
notification events (``2026-12-01T20:41:02.123Z``, RFC 3339 / ISO 8601).

Pure code on the standard library only, so the sans-IO call-record book and the notifier
both use it; written here rather than through ``datetime`` per call because a busy second's
records and events share that second's text.
"""

from __future__ import annotations

import functools
from datetime import UTC, datetime


def utc_millis(epoch: float) -> str:
    """``epoch`` as ``YYYY-MM-DDTHH:MM:SS.mmmZ``."""
    # What datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds") gives (the
    # microseconds rounded half to even, then cut to milliseconds) at a fraction of its cost.
    whole = int(epoch)
    micro = round((epoch - whole) * 1e6)
    if micro >= 1_000_000:
        whole += 1
        micro -= 1_000_000
    elif micro < 0:
        whole -= 1
        micro += 1_000_000
    return _second(whole) + _MILLIS[micro // 1000]


_MILLIS = tuple(f".{ms:03d}Z" for ms in range(1000))
"""The text after the second, by milliseconds: a call record writes three times a call."""


@functools.lru_cache(maxsize=256)
def _second(whole: int) -> str:
    return datetime.fromtimestamp(whole, UTC).strftime("%Y-%m-%dT%H:%M:%S")
