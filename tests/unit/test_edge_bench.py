"""bench/edge_bench.py drives the edge as app.py builds it: each call goes through whole."""

from __future__ import annotations

from bench.edge_bench import TIMER_EVERY, Bench


async def test_every_call_is_enriched_relayed_recorded_and_notified() -> None:
    bench = Bench(lines=50)
    await bench.start()
    try:
        calls = TIMER_EVERY + 5  # past one jump of the clock: the core retires transactions
        per_call = await bench.run(calls)
        assert per_call > 0
        assert bench.calls == calls
        assert bench.edge.waiting_for()["emergency_calls"] == 0
        publisher = bench.notify.publisher
        assert publisher is not None
        # The last events may still linger for company before their write.
        assert await bench.notify.events.depth() + publisher.pending == calls
        assert bench.transport.queue_depth == 0
    finally:
        await bench.close()
    assert bench.records == calls
