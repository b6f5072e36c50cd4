"""How a batch of stream entries becomes one command, whatever carries it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from e911_sip.batching import XADD_ALL, StoredScript, write_batch


class _Transport:
    """Keeps what each callable was given; the awaitable is not run."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def command(self, *args: Any) -> Any:
        self.calls.append(("command", *args))
        return "sent"

    def script(self, script: StoredScript, keys: Sequence[str], args: Sequence[str | int]) -> Any:
        self.calls.append(("script", script, tuple(keys), tuple(args)))
        return "sent"


def test_one_entry_is_a_plain_xadd_trimmed_only_when_asked() -> None:
    t = _Transport()
    assert write_batch("s", "record", ["a"], 100, t.command, t.script) == "sent"
    write_batch("s", "item", ["b"], 0, t.command, t.script)
    assert t.calls == [
        ("command", "XADD", "s", "MAXLEN", "~", 100, "*", "record", "a"),
        ("command", "XADD", "s", "*", "item", "b"),
    ]


def test_several_entries_are_one_run_of_the_script_in_order() -> None:
    t = _Transport()
    write_batch("s", "item", ["a", "b", "c"], 7, t.command, t.script)
    write_batch("s", "item", ["d", "e"], 0, t.command, t.script)
    assert t.calls == [
        ("script", XADD_ALL, ("s",), (7, "item", "a", "b", "c")),
        ("script", XADD_ALL, ("s",), (0, "item", "d", "e")),
    ]
