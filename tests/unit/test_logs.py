"""Structured logs: one JSON object per line, extra fields at the top level."""

from __future__ import annotations

import enum
import functools
import io
import json
import logging
import sys
import time
from pathlib import PurePosixPath
from typing import Any

import pytest

from e911_sip import logs
from e911_sip.logs import JsonFormatter, RateLimitedLog, configure


def record(msg: str, **extra: object) -> logging.LogRecord:
    rec = logging.LogRecord("e911_sip.edge", logging.WARNING, __file__, 1, msg, (), None)
    rec.__dict__.update(extra)
    return rec


def test_one_json_object_with_the_call_fields() -> None:
    line = JsonFormatter().format(
        record("emergency call without location", call_id="c1", caller="3215551234")
    )
    assert "\n" not in line
    data = json.loads(line)
    assert data["level"] == "WARNING" and data["logger"] == "e911_sip.edge"
    assert data["msg"] == "emergency call without location"
    assert (data["call_id"], data["caller"]) == ("c1", "3215551234")
    assert data["ts"].endswith("Z") and data["ts"][10] == "T"


def test_exceptions_are_kept_on_the_same_line() -> None:
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        import sys

        rec = record("enrichment failed")
        rec.exc_info = sys.exc_info()
    data = json.loads(JsonFormatter().format(rec))
    assert "RuntimeError: boom" in data["exc"]


def test_values_that_are_not_json_are_written_as_text() -> None:
    data = json.loads(JsonFormatter().format(record("x", peer=("127.0.0.1", 5060), obj=object())))
    assert data["peer"] == ["127.0.0.1", 5060]
    assert data["obj"].startswith("<object object")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def limited() -> tuple[RateLimitedLog, Clock, Capture]:
    logger = logging.getLogger("e911_sip.test.ratelimit")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    for old in list(logger.handlers):
        logger.removeHandler(old)
    capture = Capture()
    logger.addHandler(capture)
    clock = Clock()
    log = RateLimitedLog(
        logger, "message discarded", noun="messages discarded", burst=3, clock=clock
    )
    return log, clock, capture


def test_a_flood_writes_a_burst_then_one_counted_summary_per_window() -> None:
    log, clock, capture = limited()
    for n in range(10_000):
        log.hit("malformed" if n % 100 else "stray_response", {"peer": f"p{n}"})
        clock.now += 0.0005  # 5 s in all
    assert [r.getMessage() for r in capture.records] == ["message discarded"] * 3
    assert capture.records[0].__dict__["peer"] == "p0"
    log.flush()  # the window is not over yet: nothing
    assert len(capture.records) == 3
    clock.now += 5.0
    log.flush()
    summary = capture.records[-1]
    assert summary.getMessage() == (
        "10000 messages discarded in the last 10 s: malformed → 9900, stray_response → 100"
    )
    assert summary.__dict__["counts"] == {"malformed": 9900, "stray_response": 100}
    # A new window starts with a fresh burst; a quiet window writes nothing.
    log.hit("malformed", {"peer": "again"})
    assert capture.records[-1].__dict__["peer"] == "again"
    clock.now += 20.0
    log.flush()
    assert len(capture.records) == 5


def test_the_first_event_after_a_window_writes_its_summary() -> None:
    log, clock, capture = limited()
    for _ in range(5):
        log.hit("malformed")
    clock.now += 12.0
    log.hit("unparsable")
    messages = [r.getMessage() for r in capture.records]
    assert messages == ["message discarded"] * 3 + [
        "5 messages discarded in the last 12 s: malformed → 5",
        "message discarded",
    ]


def test_fields_built_by_a_function_are_built_only_for_lines_written() -> None:
    log, clock, capture = limited()
    built: list[int] = []

    def fields(n: int) -> dict[str, object]:
        built.append(n)
        return {"peer": f"p{n}"}

    for n in range(100):
        log.hit("malformed", functools.partial(fields, n))
    assert built == [0, 1, 2]
    assert [r.__dict__["peer"] for r in capture.records] == ["p0", "p1", "p2"]


# -- the exact bytes of a line ------------------------------------------------------------
# Written by the formatter as it was before its fast path (a dict through
# ``json.JSONEncoder(default=str, separators=(",", ":"))``): the same records must keep
# giving the same bytes, field order, escaping and timestamp included.


class Color(enum.IntEnum):
    RED = 1


class Mode(enum.StrEnum):
    UDP = "udp"


class Thing:
    def __str__(self) -> str:
        return "thing \u260e"


class Text(str):
    pass


def at(
    msg: str,
    *,
    args: tuple[object, ...] = (),
    level: int = logging.INFO,
    name: str = "e911_sip.edge",
    created: float = 1_795_000_000.0,
    msecs: float = 7.0,
    exc_info: Any = None,
    extra: dict[str, object] | None = None,
    **more: object,
) -> logging.LogRecord:
    rec = logging.LogRecord(name, level, "(unknown file)", 0, msg, args, exc_info)
    rec.created = created
    rec.msecs = msecs
    rec.__dict__.update(extra or {})
    rec.__dict__.update(more)
    return rec


def pinned_records() -> dict[str, logging.LogRecord]:
    return {
        "forwarded": at(
            "emergency call forwarded",
            call_id="a84b4c76e66710@pc33.example.com",
            caller="3215550001",
            number="911",
            outcome="enriched",
            enriched=True,
            trunk="bandwidth-a",
            attempt=1,
        ),
        "none_false": at(
            "emergency call forwarded",
            msecs=999.9,
            call_id="c2",
            caller=None,
            number=None,
            outcome=None,
            enriched=False,
            trunk=None,
            attempt=0,
        ),
        "unicode": at(
            "na\u00efve \u2192 \u260e \U0001f600",
            level=logging.WARNING,
            caller="Zo\u00eb \u260e",
            removed=["<cid:\u00e9@x>", "\U0001f600"],
        ),
        "control": at(
            'tab\there\nnew\x00nul\x1f\x7f"q"\\b\u2028\ud800',
            peer="\r\n\x08\x0c",
            error="\u00e9\x00",
        ),
        "numbers": at(
            "%d of %s",
            args=(3, "x"),
            count=-12,
            big=10**30,
            latency=0.25,
            ratio=1e-7,
            huge=1e300,
            nan=float("nan"),
            inf=float("inf"),
            ninf=float("-inf"),
            neg_zero=-0.0,
        ),
        "containers": at(
            "x",
            level=logging.ERROR,
            counts={"malformed": 9900, "stray_response": 100},
            peer=("127.0.0.1", 5060),
            nested={"a": [1, None, True, {"b": "\u00e9"}], "c": ()},
            empty={},
            obj=Thing(),
            path=PurePosixPath("/etc/\u00e9"),
            keys={1: "one", None: "n", False: "f", 2.5: "x"},
        ),
        "enums": at("x", color=Color.RED, mode=Mode.UDP, strsub=Text("s\n")),
        "critical": at(
            "emergency call failed on every trunk",
            level=logging.CRITICAL,
            created=1_795_000_059.0,
            msecs=0.0,
            call_id="c3",
        ),
        "private": at("x", _private="hidden", worker=2, message="stale", asctime="stale"),
        "clash": at(
            "x",
            extra={
                "level": "custom",
                "ts": "mine",
                "logger": "other",
                "msg2": 1,
                "exc": "extra-exc",
            },
            after=1,
        ),
        "exc": at(
            "enrichment failed",
            level=logging.ERROR,
            exc_info=(RuntimeError, RuntimeError("boom \u260e"), None),
            call_id="c4",
        ),
        "exc_clash": at(
            "enrichment failed",
            level=logging.ERROR,
            exc_info=(ValueError, ValueError("v"), None),
            exc="mine",
            call_id="c5",
        ),
        "other_logger": at(
            "ok", name="aiohttp.access", level=logging.DEBUG, created=1_000_000_000.5, msecs=500.0
        ),
    }


PINNED = {
    "forwarded": (
        '{"ts":"2026-11-18T11:06:40.007Z","level":"INFO","logger":"e911_sip.edge",'
        '"msg":"emergency call forwarded","call_id":"a84b4c76e66710@pc33.example.com",'
        '"caller":"3215550001","number":"911","outcome":"enriched","enriched":true,'
        '"trunk":"bandwidth-a","attempt":1}'
    ),
    "none_false": (
        '{"ts":"2026-11-18T11:06:40.999Z","level":"INFO","logger":"e911_sip.edge",'
        '"msg":"emergency call forwarded","call_id":"c2","caller":null,"number":null,'
        '"outcome":null,"enriched":false,"trunk":null,"attempt":0}'
    ),
    "unicode": (
        '{"ts":"2026-11-18T11:06:40.007Z","level":"WARNING","logger":"e911_sip.edge",'
        '"msg":"na\\u00efve \\u2192 \\u260e \\ud83d\\ude00","caller":"Zo\\u00eb \\u260e",'
        '"removed":["<cid:\\u00e9@x>","\\ud83d\\ude00"]}'
    ),
    "control": (
        '{"ts":"2026-11-18T11:06:40.007Z","level":"INFO","logger":"e911_sip.edge",'
        '"msg":"tab\\there\\nnew\\u0000nul\\u001f\\u007f\\"q\\"\\\\b\\u2028\\ud800",'
        '"peer":"\\r\\n\\b\\f","error":"\\u00e9\\u0000"}'
    ),
    "numbers": (
        '{"ts":"2026-11-18T11:06:40.007Z","level":"INFO","logger":"e911_sip.edge",'
        '"msg":"3 of x","count":-12,"big":1000000000000000000000000000000,"latency":0.25,'
        '"ratio":1e-07,"huge":1e+300,"nan":NaN,"inf":Infinity,"ninf":-Infinity,'
        '"neg_zero":-0.0}'
    ),
    "containers": (
        '{"ts":"2026-11-18T11:06:40.007Z","level":"ERROR","logger":"e911_sip.edge",'
        '"msg":"x","counts":{"malformed":9900,"stray_response":100},'
        '"peer":["127.0.0.1",5060],"nested":{"a":[1,null,true,{"b":"\\u00e9"}],"c":[]},'
        '"empty":{},"obj":"thing \\u260e","path":"/etc/\\u00e9","keys":{"1":"one",'
        '"null":"n","false":"f","2.5":"x"}}'
    ),
    "enums": (
        '{"ts":"2026-11-18T11:06:40.007Z","level":"INFO","logger":"e911_sip.edge",'
        '"msg":"x","color":1,"mode":"udp","strsub":"s\\n"}'
    ),
    "critical": (
        '{"ts":"2026-11-18T11:07:39.000Z","level":"CRITICAL","logger":"e911_sip.edge",'
        '"msg":"emergency call failed on every trunk","call_id":"c3"}'
    ),
    "private": (
        '{"ts":"2026-11-18T11:06:40.007Z","level":"INFO","logger":"e911_sip.edge",'
        '"msg":"x","worker":2}'
    ),
    "clash": (
        '{"ts":"mine","level":"custom","logger":"other","msg":"x","msg2":1,'
        '"exc":"extra-exc","after":1}'
    ),
    "exc": (
        '{"ts":"2026-11-18T11:06:40.007Z","level":"ERROR","logger":"e911_sip.edge",'
        '"msg":"enrichment failed","call_id":"c4","exc":"RuntimeError: boom \\u260e"}'
    ),
    "exc_clash": (
        '{"ts":"2026-11-18T11:06:40.007Z","level":"ERROR","logger":"e911_sip.edge",'
        '"msg":"enrichment failed","exc":"ValueError: v","call_id":"c5"}'
    ),
    "other_logger": (
        '{"ts":"2001-09-09T01:46:40.500Z","level":"DEBUG","logger":"aiohttp.access","msg":"ok"}'
    ),
}


@pytest.mark.parametrize("case", sorted(PINNED))
def test_the_line_is_byte_for_byte_what_it_was(case: str) -> None:
    assert JsonFormatter().format(pinned_records()[case]) == PINNED[case]


def test_one_formatter_gives_the_same_bytes_for_every_record_in_turn() -> None:
    # The formatter caches per second and per logger: a record after another must not
    # inherit the other's timestamp, level or name.
    formatter = JsonFormatter()
    for _ in range(2):
        records = pinned_records()
        assert {case: formatter.format(records[case]) for case in PINNED} == PINNED


def test_a_record_of_another_class_gives_the_same_bytes() -> None:
    class Custom(logging.LogRecord):
        pass

    rec = at("emergency call forwarded", call_id="c1", attempt=2)
    custom = Custom("e911_sip.edge", logging.INFO, "(unknown file)", 0, rec.msg, (), None)
    custom.created, custom.msecs = rec.created, rec.msecs
    custom.__dict__.update(call_id="c1", attempt=2)
    assert JsonFormatter().format(custom) == JsonFormatter().format(rec)


def test_an_exception_with_its_traceback_is_the_formatted_text() -> None:
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        rec = at("enrichment failed", level=logging.ERROR, exc_info=sys.exc_info(), call_id="c6")
    formatter = JsonFormatter()
    text = formatter.formatException(rec.exc_info)  # type: ignore[arg-type]
    assert "Traceback" in text
    assert formatter.format(rec) == (
        '{"ts":"2026-11-18T11:06:40.007Z","level":"ERROR","logger":"e911_sip.edge",'
        '"msg":"enrichment failed","call_id":"c6","exc":' + json.dumps(text) + "}"
    )


def test_the_handler_writes_one_line_per_record_through_filters(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        configure("INFO")
        (handler,) = root.handlers

        class Tag(logging.Filter):
            def filter(self, record: logging.LogRecord) -> bool:
                record.worker = 3
                return True

        handler.addFilter(Tag())
        logger = logging.getLogger("e911_sip.edge")
        logger.info("emergency call forwarded", extra={"call_id": "c7", "enriched": True})
        logger.debug("not written")
        logger.warning("trunk is down", extra={"trunk": "b"})
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in saved[0]:
            root.addHandler(handler)
        root.setLevel(saved[1])
    lines = stream.getvalue().split("\n")
    assert lines[-1] == ""
    first, second = (json.loads(line) for line in lines[:-1])
    assert list(first) == ["ts", "level", "logger", "msg", "call_id", "enriched", "worker"]
    assert first["call_id"] == "c7" and first["enriched"] is True and first["worker"] == 3
    assert (second["level"], second["trunk"], second["worker"]) == ("WARNING", "b", 3)


def test_a_cycle_in_a_field_fails_as_it_always_did() -> None:
    loop: list[object] = []
    loop.append(loop)
    with pytest.raises(ValueError, match="Circular reference detected"):
        JsonFormatter().format(at("x", loop=loop))


def test_a_value_whose_text_fails_raises_the_same_error() -> None:
    class Broken:
        def __str__(self) -> str:
            raise LookupError("no text")

    formatter = JsonFormatter()
    with pytest.raises(LookupError, match="no text"):
        formatter.format(at("x", obj=Broken()))
    # Nothing of the failed line stays behind for the next one.
    assert formatter.format(pinned_records()["forwarded"]) == PINNED["forwarded"]


def test_an_empty_extra_key_is_written_not_an_error() -> None:
    # The slow way takes it: the line is the dict encoded whole, as for any other key.
    for formatter in (JsonFormatter(), JsonFormatter()):
        line = formatter.format(at("x", extra={"": 1, "call_id": "c"}))
        assert line.endswith('"msg":"x","":1,"call_id":"c"}')
        line = formatter.format(at("x", extra={"call_id": "c", "": None}))
        assert line.endswith('"msg":"x","call_id":"c","":null}')


def test_an_empty_extra_key_is_logged_through_the_handler(configured: io.StringIO) -> None:
    logging.getLogger("e911_sip.edge").info("x", extra={"": "v", "call_id": "c"})
    lines = configured.getvalue().splitlines()
    assert len(lines) == 1 and "Logging error" not in configured.getvalue()
    assert list(json.loads(lines[0]).items())[3:] == [("msg", "x"), ("", "v"), ("call_id", "c")]


def test_the_call_fields_take_the_fast_path(monkeypatch: pytest.MonkeyPatch) -> None:
    # The per-call line must not fall back to building and encoding a whole dict.
    def slow(self: JsonFormatter, record: logging.LogRecord) -> str:
        raise AssertionError("slow path")

    monkeypatch.setattr(JsonFormatter, "_as_dict", slow)
    formatter = JsonFormatter()
    for case in ("forwarded", "none_false", "unicode", "numbers", "containers", "exc"):
        assert formatter.format(pinned_records()[case]) == PINNED[case]
    assert formatter.format(at("no fields")) == (
        '{"ts":"2026-11-18T11:06:40.007Z","level":"INFO","logger":"e911_sip.edge",'
        '"msg":"no fields"}'
    )


# -- the records and the handler of configure() ----------------------------------------------


@pytest.fixture
def configured(monkeypatch: pytest.MonkeyPatch) -> Any:
    """configure() into a StringIO; the root's handlers and the record factory restored."""
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
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


def test_configure_makes_records_as_log_record_makes_them(
    configured: io.StringIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    factory = logging.getLogRecordFactory()
    assert factory is not logging.LogRecord
    monkeypatch.setattr(time, "time", lambda: 1_795_000_000.007_3)
    for args in (
        ("e911_sip.edge", logging.INFO, "(unknown file)", 0, "forwarded", (), None, None, None),
        ("x", logging.ERROR, "(unknown file)", 0, "m", (), (ValueError, None, None), "f", "st"),
        ("e911_sip", logging.WARNING, "(unknown file)", 0, "%d of %s", (3, "x"), None),
        ("e911_sip", logging.INFO, "(unknown file)", 0, "%(a)s", ({"a": 1},), None),
        ("e911_sip", logging.INFO, __file__, 12, "a file", (), None, "test"),
    ):
        made = factory(*args)
        plain = logging.LogRecord(*args)
        assert type(made) is logging.LogRecord
        assert list(vars(made).items()) == list(vars(plain).items())
        assert made.getMessage() == plain.getMessage()


def test_a_logged_line_is_the_formatters_line_of_a_plain_record(
    configured: io.StringIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(time, "time", lambda: 1_795_000_000.007_3)
    fields = {"call_id": "c1", "caller": None, "enriched": True, "attempt": 1}
    logging.getLogger("e911_sip.edge").info("emergency call forwarded", extra=fields)
    logging.getLogger("e911_sip.edge").warning("%d of %s", 3, "x", extra={"trunk": "b"})
    plain = logging.LogRecord(
        "e911_sip.edge", logging.INFO, "(unknown file)", 0, "emergency call forwarded", (), None
    )
    plain.__dict__.update(fields)
    lines = configured.getvalue().split("\n")
    assert lines[0] == JsonFormatter().format(plain)
    assert lines[0].startswith('{"ts":"2026-11-18T11:06:40.007Z","level":"INFO"')
    assert json.loads(lines[1])["msg"] == "3 of x"


def test_a_line_without_filters_skips_the_filter_step(
    configured: io.StringIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(self: logging.Filterer, record: logging.LogRecord) -> bool:
        raise AssertionError("filter step ran")

    monkeypatch.setattr(logging.Filterer, "filter", refuse)
    logger = logging.getLogger("e911_sip.edge")
    # Logger.handle runs the logger's own (empty) filter step: call the handler directly.
    (handler,) = [h for h in logging.getLogger().handlers if isinstance(h, logs._JsonLines)]
    assert handler.handle(logger.makeRecord("e911_sip.edge", logging.INFO, "", 0, "x", (), None))
    assert json.loads(configured.getvalue())["msg"] == "x"


def test_the_check_of_each_set_of_keys_is_remembered_within_a_bound() -> None:
    formatter = JsonFormatter()
    for _ in range(2):
        records = pinned_records()
        assert {case: formatter.format(records[case]) for case in PINNED} == PINNED
    # One entry per set of keys, the slow ones ("private", "clash", "exc_clash") included.
    sets = {tuple(vars(r))[20:] for r in pinned_records().values()} - {()}
    assert len(formatter._pieces.keys) == len(sets)
    for n in range(logs._KEY_SETS + 10):
        line = formatter.format(at("x", **{f"k{n}": n}))
        assert line.endswith(f'"msg":"x","k{n}":{n}}}')
    assert len(formatter._pieces.keys) == logs._KEY_SETS
    assert formatter.format(at("x", _hidden=1, shown=2)).endswith('"msg":"x","shown":2}')


def test_a_worker_tag_is_set_by_the_json_formatter_without_a_filter(
    configured: io.StringIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    from e911_sip.app import tag_worker_logs

    root = logging.getLogger()
    (json_handler,) = [h for h in root.handlers if isinstance(h, logs._JsonLines)]
    plain = io.StringIO()
    other = logging.StreamHandler(plain)
    other.setFormatter(logging.Formatter("%(message)s worker=%(worker)s"))
    root.addHandler(other)
    tag_worker_logs(3)
    # The JSON lines skip the filter step; the other handler's records are tagged by one.
    assert json_handler.filters == [] and len(other.filters) == 1
    logger = logging.getLogger("e911_sip.edge")
    logger.info("emergency call forwarded", extra={"call_id": "c7", "enriched": True})
    logger.warning("x", extra={"worker": 9, "trunk": "b"})
    first, second = (json.loads(line) for line in configured.getvalue().splitlines())
    assert list(first) == ["ts", "level", "logger", "msg", "call_id", "enriched", "worker"]
    assert first["worker"] == 3
    # A worker field given with ``extra=`` is replaced in place, as the filter replaced it.
    assert list(second) == ["ts", "level", "logger", "msg", "worker", "trunk"]
    assert second["worker"] == 3
    assert plain.getvalue() == "emergency call forwarded worker=3\nx worker=3\n"


@pytest.mark.parametrize("case", sorted(PINNED))
def test_a_worker_line_is_what_the_filter_made_it(case: str) -> None:
    formatter = JsonFormatter()
    formatter.worker = 5
    tag = logging.Filter()
    filtered = pinned_records()[case]
    filtered.worker = 5  # what the filter did before the record reached the formatter
    assert tag.filter(filtered)
    assert formatter.format(pinned_records()[case]) == JsonFormatter().format(filtered)
