"""The usual JSON log line, put together from cached pieces, and the write of a line.

:class:`e911_sip.logs.JsonFormatter` formats a record with :meth:`Pieces.line` and
:mod:`e911_sip.logline` writes a line without a record with it: one builder, so the two
write the same bytes by construction (``tests/unit/test_logline.py`` still compares them).
Both write with :func:`write`.

Compiled with mypyc (``e911_sip.build.COMPILED``): the line is built in compiled code on
both paths, though ``logs`` itself is not compiled (its formatter and handler subclass
``logging`` classes, which made it slower compiled).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any, Final

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_FRESH: Final[dict[str, Any]] = vars(logging.LogRecord("", 0, "", 0, "", (), None))
STANDARD: Final[frozenset[str]] = frozenset(_FRESH) | {"message", "asctime", "taskName"}
FIRST_EXTRA: Final[int] = len(_FRESH)
"""A plain LogRecord's ``__init__`` sets this many attributes before ``extra=`` adds its own:
the formatter skips them without looking at them."""

# A key the line itself writes: an extra field with one of these names takes the line's own
# place in the object (the dict the lines were first built with did that). A record with one,
# with an attribute of ``STANDARD`` set after ``__init__`` (``message`` by another handler's
# formatter) or with an empty key goes the slow way, which writes what it always did.
SLOW: Final[frozenset[str]] = STANDARD | {"ts", "level", "logger", "msg", "exc", ""}

# One encoder for every line: ``json.dumps`` with options builds a new one per call.
encode: Final[Callable[[object], str]] = json.JSONEncoder(default=str, separators=(",", ":")).encode
string: Final[Callable[[str], str]] = json.encoder.encode_basestring_ascii
_c_encoder: Any = getattr(json.encoder, "c_make_encoder", None)
# The C encoder ``encode`` builds per call, built once; without the circular-reference check
# (its memo would be shared by every line): a cycle raises RecursionError here, and the line
# is then encoded the slow way, which raises the ValueError it always did.
encode_fields: Final[Callable[[Any, int], Any] | None] = (
    None
    if _c_encoder is None
    else _c_encoder(None, str, string, None, ":", ",", False, False, True)
)
KEY_SETS: Final[int] = 1024
"""Sets of ``extra=`` keys a :class:`Pieces` remembers the check of (the product's lines
have a few dozen); beyond that each line is checked."""
MILLIS: Final[tuple[str, ...]] = tuple(f'.{ms:03d}Z"' for ms in range(1000))


class Pieces:
    """The parts of a line that repeat, and the line put together from them.

    The line is ``{"ts", "level", "logger", "msg", the extra fields in the order given}``,
    written as ``json.JSONEncoder(default=str, separators=(",", ":"))`` writes that object:
    the timestamp to the second, the level and logger names and each set of field names are
    encoded once and kept; the message and the values are encoded per line. The edge writes
    a line for every emergency call.
    """

    def __init__(self) -> None:
        self.stamp: tuple[int, str] = (-1, "")
        """The second and the line's start up to it: one tuple, so that a thread never sees
        one's second with another's text (``logline`` builds its lines outside any lock)."""
        self.heads: dict[tuple[str, str], str] = {}
        """``,"level":…,"logger":…,"msg":`` per level and logger name: as many as there are
        loggers and levels, which ``logging`` keeps for good too."""
        self.keys: dict[tuple[str, ...], tuple[str, ...]] = {}
        """Sets of field names, in order, seen: for those :meth:`line` writes, each name
        encoded with the separators around it (``,"call_id":``); () for the others."""

    def prefix(self, second: int) -> str:
        """``{"ts":"`` and the UTC time to ``second``: one strftime per second, not per line."""
        stamp = self.stamp
        if stamp[0] != second:
            stamp = (
                second,
                '{"ts":"' + time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)),
            )
            self.stamp = stamp
        return stamp[1]

    def line(
        self,
        second: int,
        millis: int,
        levelname: str,
        name: str,
        message: str,
        fields: dict[str, Any],
    ) -> str:
        """The line (its closing brace last), or "" where it is to be written the slow way:
        a field name of :data:`SLOW`, empty or starting with "_", not a string, or a value
        the encoder fails on."""
        if fields:
            keys = tuple(fields)
            names = self.keys.get(keys)
            if names is None:
                try:
                    # Every name starts after a NUL here, so "\0_" finds one starting with "_".
                    fast = fields.keys().isdisjoint(SLOW) and "\0_" not in "\0" + "\0".join(fields)
                except TypeError:
                    # A name that is not a string: the slow way fails on it, as it always did.
                    return ""
                # The C encoder writes a str key (a subclass's too) as the string it holds.
                names = tuple("," + string(key) + ":" for key in keys) if fast else ()
                if len(self.keys) < KEY_SETS:
                    self.keys[keys] = names
            if not names or encode_fields is None:
                return ""
            # The fields as one call of the C encoder writes the dict: each name then its
            # value, in order. The values a call's line has are written here, without the
            # encoder's list of pieces (most of its cost); any other goes to it.
            parts: list[str] = []
            i = 0
            try:
                for value in fields.values():
                    parts.append(names[i])
                    i += 1
                    if type(value) is str:
                        parts.append(string(value))
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
                        parts.append("".join(encode_fields(value, 0)))
            except Exception:
                return ""
            parts.append("}")
            tail = "".join(parts)
        else:
            tail = "}"
        head = self.heads.get((levelname, name))
        if head is None:
            head = f',"level":{encode(levelname)},"logger":{encode(name)},"msg":'
            self.heads[(levelname, name)] = head
        return (
            self.prefix(second)
            + (MILLIS[millis] if 0 <= millis < 1000 else f'.{millis:03d}Z"')
            + head
            + string(message)
            + tail
        )


def write(
    handler: Any,
    line: str,
    record: logging.LogRecord | None,
    logger: Any = None,
    level: int = 0,
    msg: str = "",
    fields: dict[str, Any] | None = None,
) -> None:
    """Write ``line`` and the handler's terminator to its stream and flush it, as
    ``StreamHandler.emit`` does, under the lock the caller holds.

    A failure goes to ``handler.handleError`` with ``record``; a caller that writes without
    one (``logline``) passes None and the logger, level, message and fields instead, of
    which the record is made only then.
    """
    try:
        stream = handler.stream
        stream.write(line + handler.terminator)
        if hasattr(stream, "flush"):
            stream.flush()
    except RecursionError:
        raise
    except Exception:
        # In the except block: handleError prints the exception being handled.
        if record is None:
            record = _record(logger, level, msg, fields or {})
        handler.handleError(record)


UNKNOWN_FILE: Final = "(unknown file)"
"""The pathname ``Logger._log`` gives every record while ``logging._srcfile`` is None."""
_UNKNOWN_FUNCTION: Final = "(unknown function)"


def _record(logger: Any, level: int, msg: str, fields: dict[str, Any]) -> logging.LogRecord:
    """The record ``logger`` would have made, for ``Handler.handleError`` to report."""
    record: logging.LogRecord = logger.makeRecord(
        logger.name, level, UNKNOWN_FILE, 0, msg, (), None, _UNKNOWN_FUNCTION
    )
    record.__dict__.update(fields)
    return record
