"""The call record accumulator, fed with the proxy core's events."""

from __future__ import annotations

import dataclasses
import inspect
import random
from datetime import UTC, datetime

import pytest

from e911_sip.callrecords.book import (
    CSV_COLUMNS,
    BookOptions,
    CallRecord,
    CallRecordBook,
    RecordError,
    TrunkAttempt,
    iso_time,
    parse_time,
    record_id,
    time_key,
)
from e911_sip.proxy.core import (
    CallCompleted,
    EmergencyCall,
    EmergencyForwarded,
    FailOpen,
    Failover,
    RequestRouted,
    Route,
)
from e911_sip.sip.message import Request, parse

T0 = 1_795_000_000.0
FIRST = "sip:trunk-a.example:5060"
SECOND = "sip:trunk-b.example:5060"


def invite(call_id: str) -> Request:
    message = parse(
        (
            "INVITE sip:911@edge SIP/2.0\r\n"
            "Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK1\r\n"
            "From: <sip:1321551234@127.0.0.1>;tag=a\r\n"
            "To: <sip:911@edge>\r\n"
            f"Call-ID: {call_id}\r\n"
            "CSeq: 1 INVITE\r\n"
            "Content-Length: 0\r\n\r\n"
        ).encode()
    )
    assert isinstance(message, Request)
    return message


def begin(book: CallRecordBook, call_id: str = "c1", at: float = T0, handle: int = 1) -> None:
    book.event(EmergencyCall(handle, invite(call_id), "911", call_id), at)


def enrich(book: CallRecordBook, call_id: str = "c1", endpoint: str | None = "5555/ep1") -> None:
    book.enrichment(
        call_id,
        outcome="enriched" if endpoint else "no_location",
        caller="1321551234",
        callback="1321551234" if endpoint else None,
        provider_endpoint=endpoint,
    )


def test_answered_call_with_failover_is_finished_by_its_bye() -> None:
    book = CallRecordBook()
    begin(book)
    enrich(book)
    book.event(EmergencyForwarded(1, "c1", FIRST, 1, True), T0 + 0.001)
    book.event(Failover("c1", True, FIRST, "503"), T0 + 0.2)
    book.event(EmergencyForwarded(1, "c1", SECOND, 2, True), T0 + 0.2)
    book.event(CallCompleted("c1", "INVITE", True, 200, SECOND), T0 + 1.5)
    assert book.finished() == [] and book.in_progress == 1
    book.event(CallCompleted("c1", "BYE", False, 200, None), T0 + 60.0)

    [record] = book.finished()
    assert book.in_progress == 0
    data = record.to_dict()
    assert data["call_id"] == "c1" and data["number"] == "911"
    assert data["caller"] == data["callback"] == "1321551234"
    assert data["provider_endpoint"] == "5555/ep1" and data["outcome"] == "enriched"
    assert [(t["trunk"], t["attempt"], t["result"]) for t in data["trunks"]] == [
        (FIRST, 1, "503"),
        (SECOND, 2, "200"),
    ]
    assert data["status"] == 200 and data["end"] == "bye"
    assert data["invite_at"] == iso_time(T0)
    assert data["answered_at"] == iso_time(T0 + 1.5)
    assert data["bye_at"] == iso_time(T0 + 60.0)
    assert CallRecord.from_dict(data).to_dict() == data


def test_cancelled_call_is_finished_by_the_487() -> None:
    book = CallRecordBook()
    begin(book)
    enrich(book)
    book.event(EmergencyForwarded(1, "c1", FIRST, 1, True), T0)
    book.event(CallCompleted("c1", "INVITE", True, 487, FIRST), T0 + 3)
    [record] = book.finished()
    assert record.end == "cancelled" and record.status == 487
    assert record.answered_at is None and record.bye_at is None
    assert record.trunks[0].result == "487"


def test_call_failing_on_every_trunk() -> None:
    book = CallRecordBook()
    begin(book)
    enrich(book)
    book.event(EmergencyForwarded(1, "c1", FIRST, 1, True), T0)
    book.event(Failover("c1", True, FIRST, "timeout"), T0 + 2)
    book.event(EmergencyForwarded(1, "c1", SECOND, 2, True), T0 + 2)
    book.event(CallCompleted("c1", "INVITE", True, 500, SECOND), T0 + 3)
    [record] = book.finished()
    assert record.end == "failed" and record.status == 500
    assert [t.result for t in record.trunks] == ["timeout", "500"]


def test_no_location_records_the_reason_and_no_endpoint() -> None:
    book = CallRecordBook()
    begin(book)
    enrich(book, endpoint=None)
    book.event(EmergencyForwarded(1, "c1", FIRST, 1, True), T0)
    book.event(CallCompleted("c1", "INVITE", True, 200, FIRST), T0 + 1)
    book.event(CallCompleted("c1", "BYE", False, 200, None), T0 + 9)
    [record] = book.finished()
    assert record.outcome == "no_location" and record.provider_endpoint is None
    assert record.caller == "1321551234" and record.callback is None


def test_fail_open_wins_over_a_late_lookup() -> None:
    book = CallRecordBook()
    begin(book)
    book.event(FailOpen(1, "c1"), T0 + 0.5)
    book.event(EmergencyForwarded(1, "c1", FIRST, 1, False), T0 + 0.5)
    enrich(book)  # the lookup came back after the original INVITE left
    book.event(CallCompleted("c1", "INVITE", True, 486, FIRST), T0 + 1)
    [record] = book.finished()
    assert record.outcome == "fail_open"
    assert record.provider_endpoint is None and record.caller == "1321551234"
    assert record.trunks[0].enriched is False


def test_a_call_without_bye_is_finished_after_max_age() -> None:
    book = CallRecordBook(BookOptions(max_age=100.0))
    begin(book, "old", T0)
    begin(book, "new", T0 + 50, handle=2)
    for call_id in ("old", "new"):
        book.event(CallCompleted(call_id, "INVITE", True, 200, FIRST), T0 + 51)
    book.expire(T0 + 99)
    assert book.finished() == []
    book.expire(T0 + 100)
    [record] = book.finished()
    assert record.call_id == "old" and record.end == "max_age" and record.bye_at is None
    assert record.answered_at is not None
    assert book.in_progress == 1


def test_a_full_table_finishes_the_oldest_call() -> None:
    book = CallRecordBook(BookOptions(max_calls=2))
    for n in range(3):
        begin(book, f"c{n}", T0 + n, handle=n)
    [record] = book.finished()
    assert record.call_id == "c0" and record.end == "capacity"
    assert book.in_progress == 2 and book.evicted == 1


def test_shutdown_flushes_every_call() -> None:
    book = CallRecordBook()
    begin(book, "a", handle=1)
    begin(book, "b", handle=2)
    book.flush()
    assert [(r.call_id, r.end) for r in book.finished()] == [("a", "shutdown"), ("b", "shutdown")]


def test_events_of_other_calls_are_ignored() -> None:
    book = CallRecordBook()
    book.event(RequestRouted("INVITE", Route.DEFAULT), T0)
    book.event(Failover("x", False, FIRST, "503"), T0)
    book.event(CallCompleted("x", "INVITE", False, 200, FIRST), T0)
    book.event(CallCompleted("x", "BYE", False, 200, None), T0)
    assert book.in_progress == 0 and book.finished() == []


def test_csv_row_and_ids() -> None:
    book = CallRecordBook()
    begin(book)
    enrich(book)
    book.event(EmergencyForwarded(1, "c1", FIRST, 1, True), T0)
    book.event(CallCompleted("c1", "INVITE", True, 487, FIRST), T0 + 1)
    [record] = book.finished()
    row = dict(zip(CSV_COLUMNS, record.csv_row(), strict=True))
    assert row["trunks"] == f"{FIRST}=487" and row["answered_at"] == ""
    assert record.id == record_id(T0, "c1") and record.id.startswith(time_key(T0))
    assert parse_time(iso_time(T0)) == T0
    assert parse_time("2026-12-01") == parse_time("2026-12-01T00:00:00Z")


def test_from_dict_refuses_what_is_not_a_record() -> None:
    with pytest.raises(RecordError):
        CallRecord.from_dict({"call_id": "x"})
    with pytest.raises(RecordError):
        CallRecord.from_dict(
            {"call_id": "x", "number": "911", "invite_at": iso_time(T0), "level": "planet"}
        )


def test_iso_time_is_what_datetime_writes_to_the_millisecond() -> None:
    def reference(epoch: float) -> str:
        text = datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds")
        return text.replace("+00:00", "Z")

    spread = random.Random(911)
    epochs = [spread.uniform(0, 4e9) for _ in range(5000)]
    epochs += [T0 + n / 7 for n in range(2000)]
    # Rounding edges: half a microsecond, the last microsecond of a second, before 1970.
    epochs += [T0 + 0.0005, T0 + 0.9995, T0 + 0.9999995, T0 + 0.0000005, 0.0, -1.5, -0.0004]
    for epoch in epochs:
        assert iso_time(epoch) == reference(epoch), epoch
    assert iso_time(1_796_000_000.123456) == "2026-11-30T00:53:20.123Z"


@pytest.mark.parametrize("cls", [CallRecord, TrunkAttempt], ids=lambda cls: cls.__name__)
def test_the_init_is_the_class_own_and_takes_every_field(cls: type) -> None:
    # Written out so that compiled it is native; the generated one is compiled from a
    # string. It must take each field, with the dataclass's default.
    init = cls.__dict__["__init__"]
    code = getattr(init, "__code__", None)
    assert code is None or code.co_filename != "<string>"
    fields = dataclasses.fields(cls)
    if code is not None:
        parameters = list(inspect.signature(init).parameters.values())[1:]
        assert [p.name for p in parameters] == [f.name for f in fields]
        for parameter, f in zip(parameters, fields, strict=True):
            if f.default_factory is not dataclasses.MISSING:
                assert parameter.default is None
            elif f.default is dataclasses.MISSING:
                assert parameter.default is inspect.Parameter.empty
            else:
                assert parameter.default == f.default
    bare = CallRecord(call_id="c1", number="911", invite_at=T0)
    assert (
        bare.trunks == []
        and bare.trunks is not CallRecord(call_id="c2", number="911", invite_at=T0).trunks
    )
    assert TrunkAttempt("t", 1, True) == TrunkAttempt(
        trunk="t", attempt=1, enriched=True, result=None
    )
