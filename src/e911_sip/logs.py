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
from itertools import islice
from typing import Any

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_FRESH = vars(logging.LogRecord("", 0, "", 0, "", (), None))
_STANDARD = frozenset(_FRESH) | {"message", "asctime", "taskName"}
_FIRST_EXTRA = len(_FRESH)
"""A plain LogRecord's ``__init__`` sets this many attributes before ``extra=`` adds its own:
the formatter skips them without looking at them."""

# A key the line itself writes: an extra field with one of these names takes the line's own
# place in the object (the dict the lines were first built with did that). A record with one,
# with an attribute of ``_STANDARD`` set after ``__init__`` (``message`` by another handler's
# formatter) or with an empty key goes the slow way, which writes what it always did.
_SLOW = _STANDARD | {"ts", "level", "logger", "msg", "exc", ""}

# One encoder for every line: ``json.dumps`` with options builds a new one per call.
_encode = json.JSONEncoder(default=str, separators=(",", ":")).encode
_string = json.encoder.encode_basestring_ascii
_c_encoder: Any = getattr(json.encoder, "c_make_encoder", None)
# The C encoder ``_encode`` builds per call, built once; without the circular-reference check
# (its memo would be shared by every line): a cycle raises RecursionError here, and the line
# is then encoded the slow way, which raises the ValueError it always did.
_encode_fields: Callable[[dict[str, Any], int], list[str]] | None = (
    None
    if _c_encoder is None
    else _c_encoder(None, str, _string, None, ":", ",", False, False, True)
)
_KEY_SETS = 1024
"""Sets of ``extra=`` keys a formatter remembers the check of (the product's lines have a few
dozen); beyond that each line is checked."""
_MILLIS = tuple(f'.{ms:03d}Z"' for ms in range(1000))


class JsonFormatter(logging.Formatter):
    """Formats a record as one line of JSON.

    The line is ``{"ts", "level", "logger", "msg", the extra fields in the order given,
    "exc"}``, written as ``json.JSONEncoder(default=str, separators=(",", ":"))`` writes that
    object. It is put together from cached pieces (the timestamp to the second, the level and
    logger names), the message, and one call of the C encoder for the extra fields: the edge
    writes a line for every emergency call.

    With :attr:`worker` set, every record it formats gets that ``worker`` attribute first, as
    a logging filter that sets it would have done before the record reached the formatter.
    """

    def __init__(self) -> None:
        super().__init__()
        self.worker: int | None = None
        """The edge worker's slot every line names (``worker``), or None for none."""
        self._second = -1
        self._prefix = ""
        self._heads: dict[tuple[str, str], str] = {}
        self._keys: dict[tuple[str, ...], bool] = {}
        """Sets of ``extra=`` keys, in order, seen: True for those :meth:`format` writes."""

    def format(self, record: logging.LogRecord) -> str:
        worker = self.worker
        if worker is not None:
            # One attribute set here instead of a filter: a handler with a filter goes
            # through ``Handler.handle``'s filter pass for every line.
            record.worker = worker
        second = int(record.created)
        if second != self._second:
            # One strftime per second, not per line.
            self._second = second
            self._prefix = '{"ts":"' + time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        if type(record) is not logging.LogRecord or _encode_fields is None:
            return self._as_dict(record)
        # ``extra=`` fields follow the attributes ``__init__`` set, in the order given.
        fields = dict(islice(record.__dict__.items(), _FIRST_EXTRA, None))
        if fields:
            # The same few sets of keys come again and again (a call's line has seven): each
            # is checked once.
            keys = tuple(fields)
            fast = self._keys.get(keys)
            if fast is None:
                # Every key starts after a NUL here, so "\0_" finds a key that starts with "_".
                fast = fields.keys().isdisjoint(_SLOW) and "\0_" not in "\0" + "\0".join(fields)
                if len(self._keys) < _KEY_SETS:
                    self._keys[keys] = fast
            if not fast:
                return self._as_dict(record)
            try:
                tail = "," + "".join(_encode_fields(fields, 0))[1:]
            except Exception:
                return self._as_dict(record)
        else:
            tail = "}"
        # ``getMessage`` inlined for the usual record (``msg`` a str, no ``%`` arguments):
        # ``object``, as a compiled build would otherwise check that ``msg`` is a str.
        msg: object = record.msg
        message = msg if type(msg) is str and not record.args else record.getMessage()
        millis = int(record.msecs)
        level = record.levelname
        name = record.name
        head = self._heads.get((level, name))
        if head is None:
            # As many as there are loggers and levels, which ``logging`` keeps for good too.
            head = f',"level":{_encode(level)},"logger":{_encode(name)},"msg":'
            self._heads[(level, name)] = head
        line = (
            self._prefix
            + (_MILLIS[millis] if 0 <= millis < 1000 else f'.{millis:03d}Z"')
            + head
            + _string(message)
        )
        if record.exc_info:
            # "exc" goes last: the closing brace of the encoded fields makes way for it.
            exc = ',"exc":' + _string(self.formatException(record.exc_info)) + "}"
            return line + (tail[:-1] + exc if fields else exc)
        return line + tail

    def _as_dict(self, record: logging.LogRecord) -> str:
        """The line built as a dict and encoded whole, as it always was: for the records
        :meth:`format` does not put together itself."""
        out: dict[str, Any] = {
            "ts": f"{self._prefix[7:]}.{int(record.msecs):03d}Z",
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
            stream = self.stream
            formatter = self.formatter
            line = self.format(record) if formatter is None else formatter.format(record)
            stream.write(line + self.terminator)
            if hasattr(stream, "flush"):
                stream.flush()
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)


_UNKNOWN_FILE = "(unknown file)"
"""The pathname ``Logger._log`` gives every record while ``logging._srcfile`` is None."""

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
_level_names: dict[int, str] = {}
"""The name ``logging.getLevelName`` gives each level it knows, as of the last
:func:`_name_levels` (at import and by :func:`configure`): a record looks its level up here
without a call per record; a level added since goes to the function."""


def _name_levels() -> None:
    """Fill :data:`_level_names` in place (it is bound elsewhere) from the public API."""
    names = {
        level: logging.getLevelName(level) for level in logging.getLevelNamesMapping().values()
    }
    _level_names.clear()
    _level_names.update(names)


_name_levels()


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
    _name_levels()
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
