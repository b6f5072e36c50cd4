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

The line is put together by the builder :meth:`JsonFormatter.format` uses for its usual line
(:class:`e911_sip.logjson.Pieces`), with the formatter's ``worker`` set on the fields as it
sets it on the record, and written by the same :func:`e911_sip.logjson.write`.
``tests/unit/test_logline.py`` writes each line both ways and compares the bytes. The level's
name is looked up per line in ``logging``'s own map (:data:`e911_sip.logs._level_names`), as
a record looks it up: a level named with ``logging.addLevelName`` after ``configure`` is
written with its new name.

The edge writes its per-call line after the INVITE went out, so nothing of this module's own
may raise to it: an exception in the check or in putting the line together (before anything
is written) sends the line the standard way, ``logger.log``, rather than dropping it. That
way writes it when it can, and otherwise fails as every other line of the process fails: a
handler's failure is reported by ``Handler.handleError`` (on stderr while
``logging.raiseExceptions`` is set) and not raised; what ``logger.log`` itself raises (a
field named as a record's attribute, a filter that raises) is raised here as there, a
programming error a test finds. The write's own failures are the handler's to report, as
for a line of ``logger.log``.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Final

from e911_sip import logjson, logs

_HANDLER: Final = logs._JsonLines
_FORMATTER: Final = logs.JsonFormatter
_RECORDS: Final = logs._Records
_LEVEL_NAMES: Final = logs._level_names
_INFO: Final = logging.INFO

_pieces: Final = logjson.Pieces()
"""The line's cached pieces: its own, not a formatter's (the line is built outside the
handler's lock, and a formatter may be replaced)."""


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
    try:
        handler = _json_handler(logger, level)
        if handler is None:
            return False
        worker = handler.formatter.worker
        if worker is not None:
            # As the formatter sets ``record.worker``: in its place if given, else last.
            fields = dict(fields)
            fields["worker"] = worker
        created = time.time()
        second = int(created)
        # What LogRecord and the factory of ``configure`` make ``msecs``.
        millis = int((created - second) * 1000)
        levelname = _LEVEL_NAMES.get(level) or logging.getLevelName(level)
        line = _pieces.line(second, millis, levelname, logger.name, msg, fields)
        lock = handler.lock
    except Exception:
        # The check or the line failed on something not as ``configure`` left it (a logger
        # or handler changed in a way the check does not expect, a patched function), with
        # nothing written: the standard way writes the line, or its handler reports the
        # failure through ``Handler.handleError``, as for any line.
        return False
    if not line:
        return False
    with lock:
        # Failures of the write are the handler's to report, as ``_JsonLines.emit``'s.
        logjson.write(handler, line, None, logger, level, msg, fields)
    return True


def emit(logger: logging.Logger, level: int, msg: str, fields: dict[str, Any]) -> None:
    """``logger.log(level, msg, extra=fields)``: the same line, written straight to the
    JSON handler where the configuration is the one ``configure`` installed."""
    if not _write(logger, level, msg, fields):
        logger.log(level, msg, extra=fields)


def emit_info(logger: logging.Logger, msg: str, fields: dict[str, Any]) -> None:
    """``logger.info(msg, extra=fields)``, as :func:`emit` writes it."""
    if not _write(logger, _INFO, msg, fields):
        logger.info(msg, extra=fields)
