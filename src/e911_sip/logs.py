"""Structured logs: one JSON object per line on stderr.

Fields passed with ``extra=`` become top-level keys, so a log line carries the Call-ID and
caller it is about. Nothing here formats secrets: callers never pass tokens or passwords.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Mapping
from itertools import islice
from typing import Any

from e911_sip import logjson

_STANDARD = logjson.STANDARD
_FIRST_EXTRA = logjson.FIRST_EXTRA
_SLOW = logjson.SLOW
_encode = logjson.encode
_string = logjson.string
_encode_fields = logjson.encode_fields
_KEY_SETS = logjson.KEY_SETS


class JsonFormatter(logging.Formatter):
    """Formats a record as one line of JSON.

    The line is ``{"ts", "level", "logger", "msg", the extra fields in the order given,
    "exc"}``, written as ``json.JSONEncoder(default=str, separators=(",", ":"))`` writes that
    object. :class:`e911_sip.logjson.Pieces` puts it together from cached pieces (the
    timestamp to the second, the level and logger names, the field names), the message and
    the values, in compiled code: the edge writes a line for every emergency call. A record
    it does not put together is encoded whole as a dict (:meth:`_as_dict`).

    With :attr:`worker` set, every record it formats gets that ``worker`` attribute first, as
    a logging filter that sets it would have done before the record reached the formatter.
    """

    def __init__(self) -> None:
        super().__init__()
        self.worker: int | None = None
        """The edge worker's slot every line names (``worker``), or None for none."""
        self._pieces = logjson.Pieces()

    def format(self, record: logging.LogRecord) -> str:
        worker = self.worker
        if worker is not None:
            # One attribute set here instead of a filter: a handler with a filter goes
            # through ``Handler.handle``'s filter pass for every line.
            record.worker = worker
        if type(record) is not logging.LogRecord:
            return self._as_dict(record)
        # ``getMessage`` inlined for the usual record (``msg`` a str, no ``%`` arguments).
        msg = record.msg
        message = msg if type(msg) is str and not record.args else record.getMessage()
        level = record.levelname
        name = record.name
        if type(level) is not str or type(name) is not str or type(message) is not str:
            # The builder takes strings (compiled, it checks): a record made by hand.
            return self._as_dict(record)
        # ``extra=`` fields follow the attributes ``__init__`` set, in the order given.
        line = self._pieces.line(
            int(record.created),
            int(record.msecs),
            level,
            name,
            message,
            dict(islice(record.__dict__.items(), _FIRST_EXTRA, None)),
        )
        if not line:
            return self._as_dict(record)
        if record.exc_info:
            # "exc" goes last: the line's closing brace makes way for it.
            exc = self.formatException(record.exc_info)
            return line[:-1] + ',"exc":' + _string(exc) + "}"
        return line

    def _as_dict(self, record: logging.LogRecord) -> str:
        """The line built as a dict and encoded whole, as it always was: for the records
        :meth:`format` does not put together itself."""
        prefix = self._pieces.prefix(int(record.created))
        out: dict[str, Any] = {
            "ts": f"{prefix[7:]}.{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            # ``key[:1]``: an empty key is written as any other, not an IndexError.
            if key not in _STANDARD and key[:1] != "_":
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return _encode(out)


class _JsonLines(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler that writes and flushes under the lock ``Handler.handle`` holds
    already (``StreamHandler.emit`` calls ``flush``, which takes it again)."""

    def handle(self, record: logging.LogRecord) -> bool:
        lock = self.lock
        if self.filters or lock is None:
            # A worker's tag, a test's filter: ``Handler.handle`` runs them as it always did.
            return bool(super().handle(record))
        # What ``Handler.handle`` does with no filter, without its calls around it: a line
        # per emergency call goes through here.
        with lock:
            self.emit(record)
        return True

    def emit(self, record: logging.LogRecord) -> None:
        try:
            formatter = self.formatter
            line = self.format(record) if formatter is None else formatter.format(record)
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)
            return
        logjson.write(self, line, record)


_UNKNOWN_FILE = logjson.UNKNOWN_FILE

_PLAIN_FIELDS = (
    "name",
    "msg",
    "args",
    "levelname",
    "levelno",
    "pathname",
    "filename",
    "module",
    "exc_info",
    "exc_text",
    "stack_info",
    "lineno",
    "funcName",
    "created",
    "msecs",
    "relativeCreated",
    "thread",
    "threadName",
    "processName",
    "process",
)
"""What ``LogRecord.__init__`` sets, in its order, on the Python this was written for (3.11)
with no thread or process looked up: :class:`_Records` is used only where a plain record has
exactly these."""


class _Records:
    """The log record factory :func:`configure` installs: records of the class
    ``logging.LogRecord``, with the attributes ``LogRecord.__init__`` would set, in its
    order and with its values, put in as one dict built from a template.

    ``LogRecord.__init__`` works out from the pathname, per record, a file name and a module
    name that are the same for every record here (``(unknown file)``: no record looks up its
    caller's file) and sets some twenty attributes one at a time, a quarter of the cost of a
    log line. A record with ``%`` arguments, another pathname, or thread or process fields
    turned back on is made by ``LogRecord`` itself.
    """

    def __init__(self, start: float) -> None:
        self._start = start
        probe = logging.LogRecord("", logging.INFO, _UNKNOWN_FILE, 0, "", (), None)
        self._template = dict(vars(probe))

    def __call__(
        self,
        name: str,
        level: int,
        pathname: str,
        lineno: int,
        msg: object,
        args: Any,
        exc_info: Any,
        func: str | None = None,
        sinfo: str | None = None,
        **kwargs: Any,
    ) -> logging.LogRecord:
        if (
            args
            or kwargs
            or pathname != _UNKNOWN_FILE
            or logging.logThreads
            or logging.logProcesses
            or logging.logMultiprocessing
        ):
            return logging.LogRecord(
                name, level, pathname, lineno, msg, args, exc_info, func, sinfo, **kwargs
            )
        created = time.time()
        record = _new_record(logging.LogRecord)
        # ``dict(template, **changes)`` keeps the template's order: the formatter finds the
        # ``extra=`` fields after these, as after ``__init__``'s own.
        record.__dict__ = dict(
            self._template,
            name=name,
            msg=msg,
            args=args,
            levelname=_level_names.get(level) or logging.getLevelName(level),
            levelno=level,
            exc_info=exc_info,
            stack_info=sinfo,
            lineno=lineno,
            funcName=func,
            created=created,
            msecs=int((created - int(created)) * 1000) + 0.0,
            relativeCreated=(created - self._start) * 1000,
        )
        return record


_new_record = object.__new__
_level_names: dict[int, str] = getattr(logging, "_levelToName", {})
"""``logging``'s own map from each level to its name, which ``logging.addLevelName`` changes
in place: a record (and a line of :mod:`e911_sip.logline`) looks its level up here without
a call per record, and a level named or renamed at any time has its new name at once, as
``LogRecord`` gives it. ``logging`` keeps the map private (it has been there since 3.4) and
never binds another; without it, this is empty and every level goes to
``logging.getLevelName``. The private map, not a copy made with the public API: no public
call tells that a name changed short of ``getLevelName`` per line (a Python call, several
hundred instructions), and a copy keeps a renamed level's old name."""


def _install_records() -> None:
    """Install :class:`_Records` where it makes what ``LogRecord`` makes: the default
    factory in place, a plain record with :data:`_PLAIN_FIELDS`, the start time known."""
    start = getattr(logging, "_startTime", None)
    if logging.getLogRecordFactory() is not logging.LogRecord or not isinstance(start, float):
        return
    probe = logging.LogRecord("", logging.INFO, _UNKNOWN_FILE, 0, "", (), None)
    if tuple(vars(probe)) == _PLAIN_FIELDS:
        logging.setLogRecordFactory(_Records(start))


def configure(level: str = "INFO") -> None:
    """Send every log record of the process to stderr as JSON lines.

    A record does not look up the caller's source file, thread or process (the JSON has no
    field for them): ``findCaller`` walks the stack on every line otherwise.
    """
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    _install_records()
    handler = _JsonLines(sys.stderr)
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
