"""A structured log line written straight to the JSON handler, without a ``LogRecord``.

``logger.info(msg, extra=fields)`` goes through some ten functions of the standard library
(the record, the copy of ``extra`` into it, the walk up the loggers, the handler's filter
step and lock) before :class:`e911_sip.logs.JsonFormatter` writes a line, and the edge writes
one for every emergency call. :func:`emit` writes the same line itself when the logging
configuration is the one :func:`e911_sip.logs.configure` installed, and otherwise calls the
logger as before.

The configuration is read on every call, not cached behind a counter: a logger's
``propagate`` or ``disabled``, a handler's ``level`` or a formatter's ``worker`` are plain
attributes that anyone may set without a call that could bump one. Read from compiled code,
the dozen attributes cost a few hundred instructions. The line is written only where the
standard library's path would reach exactly one handler, of the class ``configure`` makes,
with no filter on it or on the logger, and a formatter of the class ``configure`` gives it;
everything else (another handler, a filter, a level that drops the line, a disabled logger,
``logging.disable``, another record factory, keys the formatter writes the slow way, a value
that does not encode) goes the standard way, which writes what it always did.

The line is put together as :meth:`JsonFormatter.format` puts together its usual line: the
same cached pieces, the same encoder for the fields, the formatter's ``worker`` set on the
fields as it sets it on the record. ``tests/unit/test_logline.py`` writes each line both ways
and compares the bytes.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Final

from e911_sip import logs

_HANDLER: Final = logs._JsonLines
_FORMATTER: Final = logs.JsonFormatter
_RECORDS: Final = logs._Records
_LEVEL_NAMES: Final = logs._level_names
_SLOW: Final = logs._SLOW
_MILLIS: Final = logs._MILLIS
_KEY_SETS: Final = logs._KEY_SETS
_encode: Final = logs._encode
_string: Final = logs._string
_encode_fields: Final = logs._encode_fields
_INFO: Final = logging.INFO
_UNKNOWN_FILE: Final = logs._UNKNOWN_FILE
_UNKNOWN_FUNCTION: Final = "(unknown function)"


class _Pieces:
    """The parts of a line that repeat, kept as :class:`JsonFormatter` keeps its own."""

    def __init__(self) -> None:
        self.stamp: tuple[int, str] = (-1, "")
        """The second and the line's start up to it: one tuple, so that a thread never sees
        one's second with another's text."""
        self.heads: dict[tuple[str, str], str] = {}
        self.keys: dict[tuple[str, ...], tuple[str, ...]] = {}
        """Sets of field names, in order, seen: for those the formatter writes itself, each
        name encoded with the separators around it (``,"call_id":``); () for the others."""

    def line(self, created: float, level: int, name: str, msg: str, fields: dict[str, Any]) -> str:
        """The line, or "" where the formatter would write it the slow way."""
        if fields:
            keys = tuple(fields)
            names = self.keys.get(keys)
            if names is None:
                try:
                    # The formatter's check: no name the line writes itself or a record has,
                    # none empty or starting with "_" (every name starts after a NUL here).
                    fast = fields.keys().isdisjoint(_SLOW) and "\0_" not in "\0" + "\0".join(fields)
                except TypeError:
                    # A name that is not a string: the formatter fails on it, as before.
                    return ""
                # The C encoder writes a str key (a subclass's too) as the string it holds.
                names = tuple("," + _string(key) + ":" for key in keys) if fast else ()
                if len(self.keys) < _KEY_SETS:
                    self.keys[keys] = names
            if not names or _encode_fields is None:
                return ""
            # The fields as the formatter's one call of the C encoder writes the dict: each
            # name then its value, in order. The values a call's line has are written here,
            # without the encoder's list of pieces (most of its cost); any other goes to it.
            parts: list[str] = []
            i = 0
            try:
                for value in fields.values():
                    parts.append(names[i])
                    i += 1
                    if type(value) is str:
                        parts.append(_string(value))
                    elif value is None:
                        parts.append("null")
                    elif value is True:
                        parts.append("true")
                    elif value is False:
                        parts.append("false")
                    elif type(value) is int:
                        # int's str is the repr the encoder writes (a subclass's may not be).
                        parts.append(str(value))
                    else:
                        parts.append("".join(_encode_fields(value, 0)))
            except Exception:
                return ""
            parts.append("}")
            tail = "".join(parts)
        else:
            tail = "}"
        second = int(created)
        stamp = self.stamp
        if stamp[0] != second:
            stamp = (
                second,
                '{"ts":"' + time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)),
            )
            self.stamp = stamp
        # What LogRecord and the factory of ``configure`` make ``msecs``.
        millis = int((created - second) * 1000)
        levelname = _LEVEL_NAMES.get(level) or logging.getLevelName(level)
        head = self.heads.get((levelname, name))
        if head is None:
            head = f',"level":{_encode(levelname)},"logger":{_encode(name)},"msg":'
            self.heads[(levelname, name)] = head
        return (
            stamp[1]
            + (_MILLIS[millis] if 0 <= millis < 1000 else f'.{millis:03d}Z"')
            + head
            + _string(msg)
            + tail
        )


_pieces: Final = _Pieces()


def _json_handler(logger: Any, level: int) -> Any:
    """The handler ``configure`` installed if a record of ``level`` from ``logger`` would
    reach it and only it, through no filter; else None.

    Untyped: ``logging.config.fileConfig`` sets ``propagate`` to an int, and these are read
    for their truth, as ``Logger.callHandlers`` reads them.
    """
    if type(logger) is not logging.Logger or logger.disabled or logger.filters:
        return None
    if not logger.isEnabledFor(level):
        return None
    found: Any = None
    node: Any = logger
    while node:
        handlers = node.handlers
        if handlers:
            if found is not None or len(handlers) != 1:
                return None
            found = handlers[0]
        if not node.propagate:
            break
        node = node.parent
    if (
        type(found) is not _HANDLER
        or found.filters
        or found.lock is None
        or level < found.level
        or type(found.formatter) is not _FORMATTER
    ):
        return None
    factory = logging.getLogRecordFactory()
    if factory is not logging.LogRecord and type(factory) is not _RECORDS:
        # Another factory may add attributes, which the line would carry.
        return None
    return found


def _write(logger: Any, level: int, msg: str, fields: dict[str, Any]) -> bool:
    """Write the line to the handler of ``configure``; False where that is not the way
    the standard one would go, with nothing written."""
    if type(msg) is not str or type(fields) is not dict:
        return False
    handler = _json_handler(logger, level)
    if handler is None:
        return False
    worker = handler.formatter.worker
    if worker is not None:
        # As the formatter sets ``record.worker``: in its place if given, else last.
        fields = dict(fields)
        fields["worker"] = worker
    line = _pieces.line(time.time(), level, logger.name, msg, fields)
    if not line:
        return False
    with handler.lock:
        # What ``_JsonLines.emit`` does with the formatter's line.
        stream = handler.stream
        try:
            stream.write(line + handler.terminator)
            if hasattr(stream, "flush"):
                stream.flush()
        except RecursionError:
            raise
        except Exception:
            handler.handleError(_record(logger, level, msg, fields))
    return True


def _record(logger: Any, level: int, msg: str, fields: dict[str, Any]) -> logging.LogRecord:
    """The record ``logger`` would have made, for ``Handler.handleError`` to report."""
    record: logging.LogRecord = logger.makeRecord(
        logger.name, level, _UNKNOWN_FILE, 0, msg, (), None, _UNKNOWN_FUNCTION
    )
    record.__dict__.update(fields)
    return record


def emit(logger: logging.Logger, level: int, msg: str, fields: dict[str, Any]) -> None:
    """``logger.log(level, msg, extra=fields)``: the same line, written straight to the
    JSON handler where the configuration is the one ``configure`` installed."""
    if not _write(logger, level, msg, fields):
        logger.log(level, msg, extra=fields)


def emit_info(logger: logging.Logger, msg: str, fields: dict[str, Any]) -> None:
    """``logger.info(msg, extra=fields)``, as :func:`emit` writes it."""
    if not _write(logger, _INFO, msg, fields):
        logger.info(msg, extra=fields)
