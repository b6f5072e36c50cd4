"""Structured logs: one JSON object per line, extra fields at the top level."""

from __future__ import annotations

import json
import logging

from e911_sip.logs import JsonFormatter


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
