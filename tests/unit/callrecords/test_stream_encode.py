"""A call record's stream entry: the JSON it always was, written by one C encoder call."""

from __future__ import annotations

import enum
import json
import random
from typing import Any

import pytest

from e911_sip import build
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
    odd = odd_types()
    expected = [encode(record) for record in odd]
    monkeypatch.setattr(stream, "_encode_chunks", None)
    assert [encode(record) for record in odd] == expected == [reference(r) for r in odd]


@pytest.mark.skipif(
    "e911_sip.callrecords.book" in build.compiled_modules(),
    reason="a compiled class cannot be patched; the pure run checks the same code",
)
def test_a_record_is_written_out_without_building_its_dict(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    expected = [reference(record) for record in records()]

    def refuse(self: CallRecord) -> dict[str, Any]:
        raise AssertionError("to_dict ran")

    monkeypatch.setattr(CallRecord, "to_dict", refuse)
    assert [encode(record) for record in records()] == expected


class Status(enum.IntEnum):
    OK = 200


def odd_types() -> list[CallRecord]:
    """Values of other types than the fields declare: the encoder writes what to_dict has."""
    out = []
    for status, attempt, enriched, caller in (
        (True, 1, True, "c1"),
        (Status.OK, 1, True, "c2"),
        (200.0, 1, True, "c3"),
        (200, 1.0, True, "c4"),
        (200, True, 1, "c5"),
        (200, 1, True, 3215551234),
    ):
        record = CallRecord(call_id="x", number="911", invite_at=T0, status=200)
        try:
            record.status = status  # type: ignore[assignment]
            record.caller = caller  # type: ignore[assignment]
            record.trunks = [TrunkAttempt("t", attempt, enriched)]  # type: ignore[arg-type]
        except TypeError:
            # Compiled, the record's fields take only the types they declare.
            assert "e911_sip.callrecords.book" in build.compiled_modules()
            continue
        out.append(record)
    return out


def test_values_of_other_types_are_written_as_the_encoder_writes_them() -> None:
    for record in odd_types():
        assert encode(record) == reference(record)


def test_random_records_are_the_sorted_compact_json_of_to_dict() -> None:
    spread = random.Random(911)

    def text() -> str | None:
        if spread.random() < 0.2:
            return None
        alphabet = 'ab9@.-/ é"\\\n\t\u2028\U0001f4de'
        return "".join(spread.choice(alphabet) for _ in range(spread.randint(0, 12)))

    def when() -> float | None:
        return None if spread.random() < 0.3 else spread.uniform(-1e9, 4e9)

    for _ in range(500):
        record = CallRecord(
            call_id=text() or "c",
            number=spread.choice(["911", "933"]),
            invite_at=spread.uniform(0, 4e9),
            caller=text(),
            callback=text(),
            provider_endpoint=text(),
            level=spread.choice([None, "account", "site", "customer"]),
            outcome=text(),
            trunks=[
                TrunkAttempt(text() or "t", spread.randint(1, 5), spread.random() < 0.5, text())
                for _ in range(spread.randint(0, 3))
            ],
            status=spread.choice([None, 200, 487, 503, -1, 10**20]),
            answered_at=when(),
            bye_at=when(),
            end=text(),
        )
        assert encode(record) == reference(record)


def test_a_value_json_cannot_hold_raises_type_error() -> None:
    record = CallRecord(call_id="c1", number="911", invite_at=T0)
    try:
        record.status = object()  # type: ignore[assignment]
    except TypeError:
        # Compiled, such a record cannot be made.
        assert "e911_sip.callrecords.book" in build.compiled_modules()
        return
    with pytest.raises(TypeError, match="not JSON serializable"):
        encode(record)
