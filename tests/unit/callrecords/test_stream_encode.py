"""A call record's stream entry: the JSON it always was, written by one C encoder call."""

from __future__ import annotations

import json
from typing import Any

import pytest

from e911_sip.callrecords import stream
from e911_sip.callrecords.book import CallRecord, TrunkAttempt
from e911_sip.callrecords.stream import decode, encode

T0 = 1_795_000_000.123_456


def records() -> list[CallRecord]:
    full = CallRecord(
        call_id="a84b4c76e66710@pc33.example.com",
        number="911",
        invite_at=T0,
        caller="3215551234",
        callback="3215550000",
        provider_endpoint="5551234/ep-0001",
        level="site",
        outcome="enriched",
        trunks=[
            TrunkAttempt("sip:trunk-a.example:5060", 1, True, "503"),
            TrunkAttempt("sip:trunk-b.example:5060", 2, True, "200"),
        ],
        status=200,
        answered_at=T0 + 2.5,
        bye_at=T0 + 61.000_5,
        end="bye",
    )
    bare = CallRecord(call_id="c1", number="933", invite_at=0.0)
    # Non-ASCII and characters JSON escapes, in text a peer chose.
    odd = CallRecord(
        call_id='é"\\\n\u2028\U0001f4de',
        number="911",
        invite_at=-1.5,
        caller="3215551234",
        outcome="fail_open",
        trunks=[TrunkAttempt("sip:ü.example", 1, False)],
        status=487,
        end="cancelled",
    )
    return [full, bare, odd]


def reference(record: CallRecord) -> str:
    return json.dumps(record.to_dict(), separators=(",", ":"), sort_keys=True)


@pytest.mark.parametrize("record", records(), ids=["full", "bare", "odd"])
def test_the_entry_is_the_sorted_compact_json_of_to_dict(record: CallRecord) -> None:
    text = encode(record)
    assert text == reference(record)
    assert text.isascii()
    assert decode(text) == CallRecord.from_dict(record.to_dict())


def test_no_json_encoder_is_built_per_record(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a JSONEncoder ran for a record")

    expected = [reference(record) for record in records()]
    monkeypatch.setattr(json.JSONEncoder, "iterencode", refuse)
    assert [encode(record) for record in records()] == expected


def test_without_the_c_encoder_the_entry_is_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    expected = [encode(record) for record in records()]
    monkeypatch.setattr(stream, "_encode_chunks", None)
    assert [encode(record) for record in records()] == expected


def test_a_value_json_cannot_hold_raises_type_error() -> None:
    record = CallRecord(call_id="c1", number="911", invite_at=T0)
    record.status = object()  # type: ignore[assignment]
    with pytest.raises(TypeError, match="not JSON serializable"):
        encode(record)
