"""The notification queues' JSON: the same text and the same errors as ``json.dumps`` and
``json.loads`` with no options, through the encoder and scanner built once."""

from __future__ import annotations

import enum
import json
import math
from typing import Any

import pytest

from e911_sip.notify import queue
from e911_sip.notify.event import CallEvent, Resolution, Targets, deliveries


class Color(enum.IntEnum):
    RED = 1


class Mode(enum.StrEnum):
    UDP = "udp"


def _event(**changes: Any) -> CallEvent:
    fields: dict[str, Any] = {
        "call_id": "a84b4c76e66710@pc33.example.com",
        "caller": "3215550100",
        "callback": "3215550100",
        "dialed": "911",
        "provider_endpoint": "5551234/ep-0001",
        "outcome": "enriched",
        "received_at": 1_795_000_000.123_456,
    }
    fields.update(changes)
    return CallEvent(**fields)


def _payloads() -> list[Any]:
    event = _event(caller=None, callback="Zo\u00eb \u260e", provider_endpoint=None)
    resolution = Resolution(
        targets=Targets(
            webhooks=("https://alerts.example.com/e911?\u00e9=1",),
            emails=("s\u00e9curit\u00e9@example.com",),
            sms=("3215550199",),
        ),
        level="site",
        address="1600 Main St \u2013 Suite 200, Melbourne, FL",
        name="Caf\u00e9 \U0001f600",
    )
    return [
        _event().to_dict(),
        event.to_dict(),
        *(delivery.to_dict() for delivery in deliveries(event, resolution, Targets())),
        {"put": "17", "item": _event().to_dict()},
        {"done": "17"},
        {"item": {"call_id": "x"}, "reason": "permanent: 410 Gone \u2192 dead"},
        {
            "control": 'tab\there\nnew\u0000nul\u001f\u007f"q"\\b\u2028\ud800',
            "numbers": [0, -12, 10**30, 0.25, 1e-07, 1e300, -0.0, math.inf, -math.inf],
            "nan": math.nan,
            "consts": [True, False, None],
            "nested": {"a": [1, {"b": ()}], "c": {}, "d": []},
            "keys": {1: "one", None: "n", False: "f", 2.5: "x"},
            "enums": [Color.RED, Mode.UDP],
        },
        {},
        [],
        "just text \u00e9",
        3,
        None,
    ]


@pytest.mark.parametrize("index", range(len(_payloads())))
def test_dumps_writes_what_json_dumps_writes(index: int) -> None:
    item = _payloads()[index]
    assert queue.dumps(item) == json.dumps(item)


def test_dumps_fails_as_json_dumps_fails() -> None:
    with pytest.raises(TypeError, match="Object of type object is not JSON serializable"):
        queue.dumps({"a": object()})
    with pytest.raises(TypeError, match="keys must be str, int, float, bool or None"):
        queue.dumps({(1, 2): "tuple key"})
    cycle: dict[str, Any] = {}
    cycle["self"] = cycle
    with pytest.raises(ValueError, match="Circular reference detected"):
        queue.dumps(cycle)
    # A failure leaves nothing behind: the next item is written as it always is.
    item = _event().to_dict()
    assert queue.dumps(item) == json.dumps(item)


def test_dumps_without_the_c_encoder_is_json_dumps(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(queue, "_encode_c", None)
    for item in _payloads():
        assert queue.dumps(item) == json.dumps(item)


@pytest.mark.parametrize("index", range(len(_payloads())))
def test_loads_reads_what_json_loads_reads(index: int) -> None:
    text = json.dumps(_payloads()[index])
    value = queue.loads(text)
    assert json.dumps(value) == json.dumps(json.loads(text))
    assert type(value) is type(json.loads(text))


@pytest.mark.parametrize(
    "text",
    [
        '{"a": 1}',
        ' {"a": 1}',
        '{"a": 1}\n',
        '{"a": 1}{"b": 2}',
        '{"a": 1} }',
        '{"a": {"b": [1, 2.5, -0.0, 1e400, NaN, Infinity, -Infinity, true, null]}}',
        '{"\\u00e9\\ud83d\\ude00": "\\ud800", "a": "\u00e9"}',
        '{"a": 1, "a": 2}',
        "{}",
        "[1]",
        '"text"',
        "12",
        "\ufeff{}",
    ],
)
def test_loads_reads_well_formed_text_as_json_loads(text: str) -> None:
    try:
        expected = json.loads(text)
    except ValueError as exc:
        with pytest.raises(type(exc)) as raised:
            queue.loads(text)
        assert str(raised.value) == str(exc)
        return
    assert repr(queue.loads(text)) == repr(expected)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "{",
        "}",
        "{}}",
        '{"a": }',
        '{"a" 1}',
        '{"a": 1,}',
        "{'a': 1}",
        '{"a": "unterminated}',
        '{"a": "bad \\x escape"}',
        '{"a": "raw \n newline"}',
        '{"a": 01}',
        '{"a": nul}',
        "{a: 1}",
        '{"a": [1, 2}',
        "{\ufeff}",
        "\ufeff{}",
        '{"a": 1}{',
        "[" * 100_000 + "]" * 100_000,
        "{" + '"a":{' * 100_000 + "}" * 100_001,
    ],
)
def test_loads_fails_as_json_loads_fails(text: str) -> None:
    with pytest.raises((ValueError, RecursionError)) as expected:
        json.loads(text)
    with pytest.raises(type(expected.value)) as raised:
        queue.loads(text)
    assert str(raised.value) == str(expected.value)
    if isinstance(expected.value, json.JSONDecodeError):
        assert isinstance(raised.value, json.JSONDecodeError)
        assert (raised.value.pos, raised.value.lineno, raised.value.colno) == (
            expected.value.pos,
            expected.value.lineno,
            expected.value.colno,
        )


def test_loads_of_bytes_is_json_loads() -> None:
    raw: Any = b'{"a": "\xc3\xa9"}'
    assert queue.loads(raw) == json.loads(raw) == {"a": "\u00e9"}


def test_a_failed_read_leaves_nothing_behind() -> None:
    with pytest.raises(json.JSONDecodeError):
        queue.loads('{"call_id": "x", "caller": ')
    item = _event().to_dict()
    assert queue.loads(queue.dumps(item)) == item
