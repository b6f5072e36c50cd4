"""Structured logs: one JSON object per line, extra fields at the top level."""

from __future__ import annotations

import functools
import json
import logging

from e911_sip.logs import JsonFormatter, RateLimitedLog


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
