"""Structured logs: one JSON object per line on stderr.

Fields passed with ``extra=`` become top-level keys, so a log line carries the Call-ID and
caller it is about. Nothing here formats secrets: callers never pass tokens or passwords.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message",
    "asctime",
    "taskName",
}


# One encoder for every line: ``json.dumps`` with options builds a new one per call.
_encode = json.JSONEncoder(default=str, separators=(",", ":")).encode


class JsonFormatter(logging.Formatter):
    """Formats a record as one line of JSON."""

    def __init__(self) -> None:
        super().__init__()
        self._second = -1
        self._prefix = ""

    def format(self, record: logging.LogRecord) -> str:
        second = int(record.created)
        if second != self._second:
            # One strftime per second, not per line: the edge logs every emergency call.
            self._second = second
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        out: dict[str, Any] = {
            "ts": f"{self._prefix}.{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and key[0] != "_":
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return _encode(out)


def configure(level: str = "INFO") -> None:
    """Send every log record of the process to stderr as JSON lines.

    A record does not look up the caller's source file, thread or process (the JSON has no
    field for them): ``findCaller`` walks the stack on every line otherwise.
    """
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # aiohttp's access log is one line per scrape; keep it at WARNING.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


class RateLimitedLog:
    """One log line per event until ``burst`` in a window, then a counted summary.

    For anything a peer can make happen once per message (a discarded datagram, a shed
    request): a flood then writes ``burst`` lines and one summary per ``interval``, such as
    ``12000 messages discarded in the last 10 s: malformed → 11950, stray_response → 50``,
    instead of a line per datagram. The summary is written by the first event after the
    window ends, or by :meth:`flush`, which the owner calls periodically.
    """

    def __init__(
        self,
        logger: logging.Logger,
        message: str,
        *,
        noun: str,
        interval: float = 10.0,
        burst: int = 5,
        level: int = logging.INFO,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self._message = message
        self._noun = noun
        self._interval = interval
        self._burst = burst
        self._level = level
        self._clock = clock
        self._start = clock()
        self._logged = 0
        self._counts: dict[str, int] = {}

    def hit(
        self,
        reason: str,
        extra: Mapping[str, object] | Callable[[], Mapping[str, object]] | None = None,
    ) -> None:
        """One event: logged in full while the window's burst lasts, else counted.

        ``extra`` may be a function that builds the fields: it is called only for a line
        that is written, so a flood past the burst formats nothing.
        """
        now = self._clock()
        if now - self._start >= self._interval:
            self.flush(now)
        counts = self._counts
        counts[reason] = counts.get(reason, 0) + 1
        if self._logged < self._burst:
            self._logged += 1
            if not self._logger.isEnabledFor(self._level):
                return
            if callable(extra):
                extra = extra()
            self._logger.log(self._level, self._message, extra=extra)

    def flush(self, now: float | None = None) -> None:
        """Write the summary of the window if events went unlogged in it; start a new one."""
        if now is None:
            now = self._clock()
        if now - self._start < self._interval:
            return
        counts = self._counts
        total = sum(counts.values())
        if total > self._logged:
            by_reason = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
            detail = ", ".join(f"{reason} → {count}" for reason, count in by_reason)
            self._logger.log(
                self._level,
                f"{total} {self._noun} in the last {now - self._start:.0f} s: {detail}",
                extra={"counts": dict(by_reason), "logged": self._logged},
            )
        self._start = now
        self._logged = 0
        self._counts = {}
