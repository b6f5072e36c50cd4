"""The edge's collector passes: the young generations collected, the survivors frozen."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from e911_sip import app


@pytest.fixture
def unfrozen() -> Iterator[None]:
    """The test process's objects given back to the collector after the test."""
    try:
        yield
    finally:
        gc.unfreeze()


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


def test_a_pass_collects_the_young_generations_then_freezes(
    monkeypatch: pytest.MonkeyPatch, unfrozen: None
) -> None:
    calls: list[object] = []
    monkeypatch.setattr(gc, "collect", lambda generation=2: calls.append(("collect", generation)))
    monkeypatch.setattr(gc, "freeze", lambda: calls.append("freeze"))
    app.gc_pass()
    # Not a full collection: that also empties the free lists the next calls allocate from.
    assert calls == [("collect", 1), "freeze"]


def test_a_pass_frees_a_new_cycle_and_freezes_what_survives(unfrozen: None) -> None:
    app.gc_pass()
    frozen = gc.get_freeze_count()
    first, second = Node(), Node()
    first.other, second.other = second, first
    gone = weakref.ref(first)
    del first, second
    kept = [Node() for _ in range(10)]
    app.gc_pass()
    assert gone() is None
    assert gc.get_freeze_count() >= frozen + len(kept)
    assert gc.get_count()[0] < 10
