"""The log line written straight to the JSON handler: the bytes ``logger.info`` writes, and
``logger.info`` itself wherever the configuration is not the one ``configure`` installed."""

from __future__ import annotations

import enum
import io
import json
import logging
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import PurePosixPath
from typing import Any

import pytest

from e911_sip import logline, logs
from e911_sip.logs import configure

NAME = "e911_sip.edge"


class Color(enum.IntEnum):
    RED = 1


class Mode(enum.StrEnum):
    UDP = "udp"


class Text(str):
    def __str__(self) -> str:
        return "not this"


class Count(int):
    def __str__(self) -> str:
        return "not this"


class Thing:
    def __str__(self) -> str:
        return "thing \u260e"


CALL = {
    "call_id": "a84b4c76e66710@pc33.example.com",
    "caller": "3215550001",
    "number": "911",
    "outcome": "enriched",
    "enriched": True,
    "trunk": "bandwidth-a",
    "attempt": 1,
}

FIELDS: dict[str, dict[str, Any]] = {
    "call": CALL,
    "none_false": {"call_id": "c2", "caller": None, "enriched": False, "attempt": 0},
    "empty": {},
    "non_ascii": {"caller": "Zo\u00eb \u260e", "cl\u00e9": "\ud83d\ude00", "\u2192": "\u2028"},
    "control": {"peer": "\r\n\b\f\0", "error": '"q"\\'},
    "numbers": {"big": 10**30, "neg": -12, "ratio": 1e-7, "nan": float("nan"), "z": -0.0},
    "non_str": {
        "peer": ("127.0.0.1", 5060),
        "obj": Thing(),
        "path": PurePosixPath("/etc/\u00e9"),
        "color": Color.RED,
        "bytes": b"\xff",
        "set": {1},
    },
    "subclasses": {
        "text": Text("s\n\u00e9"),
        "count": Count(5),
        "mode": Mode.UDP,
        "one": 1,
        "true": True,
        "huge": 1e300,
        "inf": float("-inf"),
    },
    "nested": {
        "counts": {"malformed": 9900, 1: "one", None: "n", 2.5: "x"},
        "nested": {"a": [1, None, True, {"b": "\u00e9"}], "c": []},
    },
    # Names the line writes itself or a record does not take: the formatter's slow way.
    "clash_ts": {"ts": "mine", "call_id": "c"},
    "clash_level": {"level": "custom", "logger": "other"},
    "clash_exc": {"exc": "extra-exc", "after": 1},
    "private": {"_hidden": 1, "shown": 2},
    "empty_key": {"": "x", "call_id": "c"},
    "worker_given": {"worker": 9, "trunk": "b"},
}
FAST = {
    "call",
    "none_false",
    "empty",
    "non_ascii",
    "control",
    "numbers",
    "non_str",
    "nested",
    "subclasses",
    "worker_given",
}

MESSAGES = ("emergency call forwarded", "na\u00efve \u2192 %s %d \ud83d\ude00", "")


@pytest.fixture
def configured(monkeypatch: pytest.MonkeyPatch) -> Iterator[io.StringIO]:
    """configure() into a StringIO as the only handler (pytest's own taken off the root for
    the test), the clock pinned; the root's handlers, level and record factory restored."""
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    monkeypatch.setattr(time, "time", lambda: 1_795_000_000.007_3)
    root = logging.getLogger()
    saved = (list(root.handlers), root.level, logging.getLogRecordFactory())
    logging.setLogRecordFactory(logging.LogRecord)
    try:
        configure("INFO")
        yield stream
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in saved[0]:
            root.addHandler(handler)
        root.setLevel(saved[1])
        logging.setLogRecordFactory(saved[2])


@pytest.fixture
def records(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The messages of the records loggers make: none for a line written straight."""
    made: list[str] = []
    make = logging.Logger.makeRecord

    def counting(self: logging.Logger, *args: Any, **kwargs: Any) -> logging.LogRecord:
        record = make(self, *args, **kwargs)
        made.append(record.getMessage())
        return record

    monkeypatch.setattr(logging.Logger, "makeRecord", counting)
    return made


def only_ours() -> logs._JsonLines:
    """Take pytest's capture handlers off the root (it adds them around each test): the
    edge runs with the one handler of configure()."""
    root = logging.getLogger()
    ours = [h for h in root.handlers if isinstance(h, logs._JsonLines)]
    for handler in list(root.handlers):
        if handler not in ours:
            root.removeHandler(handler)
    (handler,) = ours
    return handler


def both_ways(
    stream: io.StringIO, write: Callable[[str, dict[str, Any]], None], msg: str, fields: Any
) -> tuple[str, str]:
    """What ``write`` wrote and what ``logger.info`` wrote, each on its own."""
    start = stream.tell()
    write(msg, fields)
    mine = stream.getvalue()[start:]
    start = stream.tell()
    logging.getLogger(NAME).info(msg, extra=fields)
    return mine, stream.getvalue()[start:]


def emit_info(msg: str, fields: dict[str, Any]) -> None:
    logline.emit_info(logging.getLogger(NAME), msg, fields)


@pytest.mark.parametrize("msg", MESSAGES)
@pytest.mark.parametrize("case", sorted(FIELDS))
def test_the_line_is_the_bytes_logger_info_writes(
    configured: io.StringIO, records: list[str], case: str, msg: str
) -> None:
    only_ours()
    given = dict(FIELDS[case])
    mine, theirs = both_ways(configured, emit_info, msg, given)
    assert mine == theirs
    assert mine.endswith("}\n") and mine.count("\n") == 1
    assert given == FIELDS[case] or case == "numbers"  # NaN != NaN; the dict is not changed
    # Written straight unless the formatter writes the line the slow way.
    assert records == ([msg] if case in FAST else [msg, msg])


@pytest.mark.parametrize("case", sorted(FIELDS))
def test_a_workers_line_is_the_bytes_logger_info_writes(
    configured: io.StringIO, records: list[str], case: str
) -> None:
    from e911_sip.app import tag_worker_logs

    only_ours()
    tag_worker_logs(3)
    given = dict(FIELDS[case])
    mine, theirs = both_ways(configured, emit_info, "emergency call forwarded", given)
    assert mine == theirs
    assert '"worker":3' in mine
    assert "worker" not in given or case == "worker_given"
    assert len(records) == (1 if case in FAST else 2)


def test_other_levels_and_loggers_are_written_straight(
    configured: io.StringIO, records: list[str]
) -> None:
    only_ours()
    for name, level in (
        (NAME, logging.WARNING),
        ("e911_sip.notify", logging.CRITICAL),
        ("", logging.ERROR),
        ("a.b.c", 25),
    ):
        logger = logging.getLogger(name)
        start = configured.tell()
        logline.emit(logger, level, "m", {"call_id": "c"})
        mine = configured.getvalue()[start:]
        start = configured.tell()
        logger.log(level, "m", extra={"call_id": "c"})
        assert mine == configured.getvalue()[start:]
    # The root is a RootLogger: the standard way, with the same bytes.
    assert records == ["m", "m", "m", "m", "m"]


@pytest.fixture
def level_names() -> Iterator[None]:
    """``logging``'s level names restored after the test renames some."""
    names, levels = dict(logging._levelToName), dict(logging._nameToLevel)
    try:
        yield
    finally:
        logging._levelToName.clear()
        logging._levelToName.update(names)
        logging._nameToLevel.clear()
        logging._nameToLevel.update(levels)


def test_a_level_named_after_configure_has_its_new_name(
    configured: io.StringIO, records: list[str], level_names: None
) -> None:
    only_ours()
    logger = logging.getLogger(NAME)
    # After configure(), and after a line of each level was written with the old name.
    logline.emit(logger, logging.INFO, "m", {"call_id": "c"})
    logline.emit(logger, 27, "m", {"call_id": "c"})
    assert [json.loads(line)["level"] for line in configured.getvalue().splitlines()] == [
        "INFO",
        "Level 27",
    ]
    logging.addLevelName(logging.INFO, "NOTICE")
    logging.addLevelName(27, "AUDIT")
    for level, name in ((logging.INFO, "NOTICE"), (27, "AUDIT")):
        start = configured.tell()
        logline.emit(logger, level, "m", {"call_id": "c"})
        mine = configured.getvalue()[start:]
        start = configured.tell()
        logger.log(level, "m", extra={"call_id": "c"})
        assert mine == configured.getvalue()[start:]
        assert json.loads(mine)["level"] == name
    # Written straight each time; the records are those of logger.log.
    assert records == ["m", "m"]


def test_the_second_and_the_millisecond_follow_the_clock(
    configured: io.StringIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    only_ours()
    for now in (1_795_000_000.0, 1_795_000_000.999_9, 1_795_000_001.5, 1_000_000_000.25):
        monkeypatch.setattr(time, "time", lambda now=now: now)
        mine, theirs = both_ways(configured, emit_info, "x", {"a": 1})
        assert mine == theirs


def test_a_level_added_since_configure_is_named(configured: io.StringIO) -> None:
    only_ours()
    logging.addLevelName(23, "NOTICE23")
    start = configured.tell()
    logline.emit(logging.getLogger(NAME), 23, "x", {})
    mine = configured.getvalue()[start:]
    assert '"level":"NOTICE23"' in mine
    start = configured.tell()
    logging.getLogger(NAME).log(23, "x")
    assert mine == configured.getvalue()[start:]


class Refuse(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != "refused"


def _added_handler(handler: logs._JsonLines) -> Callable[[], None]:
    other = logging.StreamHandler(io.StringIO())
    logging.getLogger(NAME).addHandler(other)
    return lambda: logging.getLogger(NAME).removeHandler(other)


def _second_root_handler(handler: logs._JsonLines) -> Callable[[], None]:
    other = logging.NullHandler()
    logging.getLogger().addHandler(other)
    return lambda: logging.getLogger().removeHandler(other)


def _logger_filter(handler: logs._JsonLines) -> Callable[[], None]:
    refuse = Refuse()
    logging.getLogger(NAME).addFilter(refuse)
    return lambda: logging.getLogger(NAME).removeFilter(refuse)


def _handler_filter(handler: logs._JsonLines) -> Callable[[], None]:
    refuse = Refuse()
    handler.addFilter(refuse)
    return lambda: handler.removeFilter(refuse)


def _raised_level(handler: logs._JsonLines) -> Callable[[], None]:
    logging.getLogger(NAME).setLevel(logging.WARNING)
    return lambda: logging.getLogger(NAME).setLevel(logging.NOTSET)


def _raised_handler_level(handler: logs._JsonLines) -> Callable[[], None]:
    handler.setLevel(logging.WARNING)
    return lambda: handler.setLevel(logging.NOTSET)


def _no_propagation(handler: logs._JsonLines) -> Callable[[], None]:
    logging.getLogger(NAME).propagate = False
    return lambda: setattr(logging.getLogger(NAME), "propagate", True)


def _propagation_as_an_int(handler: logs._JsonLines) -> Callable[[], None]:
    # What logging.config.fileConfig sets: the standard way reads it for its truth.
    logging.getLogger(NAME).propagate = 0  # type: ignore[assignment]
    return lambda: setattr(logging.getLogger(NAME), "propagate", True)


def _disabled_logger(handler: logs._JsonLines) -> Callable[[], None]:
    logging.getLogger(NAME).disabled = True
    return lambda: setattr(logging.getLogger(NAME), "disabled", False)


def _logging_disabled(handler: logs._JsonLines) -> Callable[[], None]:
    logging.disable(logging.INFO)
    return lambda: logging.disable(logging.NOTSET)


def _another_factory(handler: logs._JsonLines) -> Callable[[], None]:
    saved = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = logging.LogRecord(*args, **kwargs)
        record.host = "h1"
        return record

    logging.setLogRecordFactory(factory)
    return lambda: logging.setLogRecordFactory(saved)


def _another_formatter(handler: logs._JsonLines) -> Callable[[], None]:
    saved = handler.formatter
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s %(call_id)s"))
    return lambda: handler.setFormatter(saved)


def _formatter_subclass(handler: logs._JsonLines) -> Callable[[], None]:
    class Upper(logs.JsonFormatter):
        def format(self, record: logging.LogRecord) -> str:
            return super().format(record).upper()

    saved = handler.formatter
    handler.setFormatter(Upper())
    return lambda: handler.setFormatter(saved)


def _handler_replaced(handler: logs._JsonLines) -> Callable[[], None]:
    root = logging.getLogger()
    plain = logging.StreamHandler(handler.stream)
    plain.setFormatter(handler.formatter)
    root.removeHandler(handler)
    root.addHandler(plain)

    def undo() -> None:
        root.removeHandler(plain)
        root.addHandler(handler)

    return undo


def _no_handler(handler: logs._JsonLines) -> Callable[[], None]:
    root = logging.getLogger()
    root.removeHandler(handler)
    return lambda: root.addHandler(handler)


RECONFIGURED: dict[str, Callable[[logs._JsonLines], Callable[[], None]]] = {
    "added_handler": _added_handler,
    "second_root_handler": _second_root_handler,
    "logger_filter": _logger_filter,
    "handler_filter": _handler_filter,
    "raised_level": _raised_level,
    "raised_handler_level": _raised_handler_level,
    "no_propagation": _no_propagation,
    "propagation_as_an_int": _propagation_as_an_int,
    "disabled_logger": _disabled_logger,
    "logging_disabled": _logging_disabled,
    "another_factory": _another_factory,
    "another_formatter": _another_formatter,
    "formatter_subclass": _formatter_subclass,
    "handler_replaced": _handler_replaced,
    "no_handler": _no_handler,
}


@pytest.mark.parametrize("case", sorted(RECONFIGURED))
def test_a_reconfigured_logger_takes_the_standard_way(
    configured: io.StringIO,
    records: list[str],
    case: str,
) -> None:
    handler = only_ours()
    undo = RECONFIGURED[case](handler)
    try:
        for msg in ("emergency call forwarded", "refused"):
            mine, theirs = both_ways(configured, emit_info, msg, dict(CALL))
            assert mine == theirs
        made = list(records)
    finally:
        undo()
    # Every line went the standard way: a record for each, where the level lets one be made.
    disabled = case in ("raised_level", "logging_disabled", "disabled_logger")
    assert made == ([] if disabled else ["emergency call forwarded"] * 2 + ["refused"] * 2)
    # Back as configure() left it, the line is written straight again.
    del records[:]
    mine, theirs = both_ways(configured, emit_info, "again", dict(CALL))
    assert mine == theirs and records == ["again"]


class Broken(io.StringIO):
    def write(self, text: str) -> int:
        raise OSError("disk full")


def test_a_failed_write_is_reported_as_the_handler_reports_it(
    configured: io.StringIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    handler = only_ours()
    handler.setStream(Broken())
    reports = []
    for write in (emit_info, logging.getLogger(NAME).info):
        # Handler.handleError writes to sys.stderr (pytest's own once the test runs).
        report = io.StringIO()
        monkeypatch.setattr(sys, "stderr", report)
        if write is emit_info:
            emit_info("emergency call forwarded", dict(CALL))
        else:
            logging.getLogger(NAME).info("emergency call forwarded", extra=dict(CALL))
        reports.append(report.getvalue())
    mine, theirs = reports
    assert mine.startswith("--- Logging error ---\n")
    assert "OSError: disk full" in mine and "OSError: disk full" in theirs
    assert mine.splitlines()[-2:] == theirs.splitlines()[-2:]


def test_a_failing_check_falls_back_to_logger_info(
    configured: io.StringIO, records: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The edge writes this line after the INVITE went out: a failure of logline's own check
    # must not reach it. The line goes the standard way instead, the same bytes.
    only_ours()

    def broken() -> Any:
        raise RuntimeError("factory lookup failed")

    monkeypatch.setattr(logging, "getLogRecordFactory", broken)
    mine, theirs = both_ways(configured, emit_info, "emergency call forwarded", dict(CALL))
    assert mine == theirs and mine.count("\n") == 1
    start = configured.tell()
    logline.emit(logging.getLogger(NAME), logging.WARNING, "w", {"call_id": "c"})
    assert json.loads(configured.getvalue()[start:])["level"] == "WARNING"
    assert records == ["emergency call forwarded"] * 2 + ["w"]


@pytest.mark.parametrize("raise_exceptions", [True, False])
def test_a_handler_that_fails_its_check_is_reported_not_raised(
    configured: io.StringIO, monkeypatch: pytest.MonkeyPatch, raise_exceptions: bool
) -> None:
    # A formatter without its ``worker``: logline's check fails on it, and so does the
    # formatter on the standard way, inside the handler, which reports it as it reports a
    # failed line (Handler.handleError, on sys.stderr while logging.raiseExceptions is set).
    handler = only_ours()
    delattr(handler.formatter, "worker")
    monkeypatch.setattr(logging, "raiseExceptions", raise_exceptions)
    monkeypatch.setattr(sys, "stderr", report := io.StringIO())
    emit_info("emergency call forwarded", dict(CALL))
    logline.emit(logging.getLogger(NAME), logging.ERROR, "e", {})
    assert configured.getvalue() == ""
    if raise_exceptions:
        assert report.getvalue().count("--- Logging error ---") == 2
        assert "AttributeError" in report.getvalue()
    else:
        assert report.getvalue() == ""


def test_a_value_that_does_not_encode_fails_as_it_always_did(
    configured: io.StringIO, records: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    only_ours()
    # Handler.handleError's report beside the lines (pytest's sys.stderr once the test runs).
    monkeypatch.setattr(sys, "stderr", configured)
    cycle: list[object] = []
    cycle.append(cycle)
    mine, theirs = both_ways(configured, emit_info, "x", {"cycle": cycle})
    assert "ValueError: Circular reference detected" in mine
    assert mine.splitlines()[-2:] == theirs.splitlines()[-2:]
    # A name a record has: makeRecord's KeyError, as before.
    with pytest.raises(KeyError, match="Attempt to overwrite 'name'"):
        emit_info("x", {"name": "n"})
    assert records == ["x", "x"]


def test_the_fields_must_be_a_plain_dict_and_the_message_a_str(
    configured: io.StringIO, records: list[str]
) -> None:
    only_ours()

    class Fields(dict[str, Any]):
        pass

    class Text(str):
        pass

    mine, theirs = both_ways(configured, emit_info, "x", Fields(a=1))
    assert mine == theirs
    mine, theirs = both_ways(configured, emit_info, Text("y"), {"a": 1})
    assert mine == theirs
    assert records == ["x", "x", "y", "y"]
