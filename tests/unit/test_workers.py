"""Several workers: ``[sip] workers``, the worker argument, the control channel and the
merged /metrics (a dead worker's counters stay in the totals)."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import socket
from pathlib import Path

import pytest

from e911_sip import __version__
from e911_sip.config import ConfigError, from_mapping
from e911_sip.metrics import (
    Metrics,
    additive_part,
    merge_families,
    parse_exposition,
    render_families,
)
from e911_sip.roles import WorkerSetup
from e911_sip.transport.control import ADOPT, LIVE, SupervisorSide, serve_worker_side
from tests.integration.harness import metric_value

REDIS = {"url": "redis://127.0.0.1:6379/0"}
UDP = {"listen": ["udp:127.0.0.1:5070"]}


@pytest.mark.parametrize(("value", "expected"), [(1, 1), (3, 3), ("2", 2)])
def test_workers_count(value: object, expected: int) -> None:
    config = from_mapping({"sip": {**UDP, "workers": value}, "store": REDIS})
    assert config.sip.workers == expected


def test_workers_default_and_auto() -> None:
    assert from_mapping({}).sip.workers == 1
    auto = from_mapping({"sip": {**UDP, "workers": "auto"}, "store": REDIS}).sip.workers
    assert auto == max(1, os.cpu_count() or 1)


@pytest.mark.parametrize(
    ("sip", "store", "words"),
    [
        ({**UDP, "workers": 0}, REDIS, "[sip] workers: must be 1 to 256"),
        ({**UDP, "workers": "many"}, REDIS, '[sip] workers: expected a number or "auto"'),
        ({**UDP, "workers": True}, REDIS, '[sip] workers: expected a number or "auto"'),
        (
            {"listen": ["tcp:127.0.0.1:5070"], "workers": 2},
            REDIS,
            "[sip] workers: more than one worker needs a udp listener",
        ),
        ({**UDP, "workers": 2}, {"url": "memory://"}, "[sip] workers: more than one worker needs"),
    ],
)
def test_workers_errors_name_the_key(
    sip: dict[str, object], store: dict[str, str], words: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        from_mapping({"sip": sip, "store": store})
    assert words in str(caught.value)


def test_worker_argument() -> None:
    assert WorkerSetup.parse("1:3:4:5") == WorkerSetup(slot=1, udp_fd=3, channel_fd=4, control_fd=5)
    assert WorkerSetup.parse("0:3:4:5:tcp=6:tls=7").listeners == {"tcp": 6, "tls": 7}
    for bad in ("1:2:3", "a:b:c:d", "1:2:3:-4", "0:3:4:5:udp=6", "0:3:4:5:tcp=x", "0:3:4:5:6"):
        with pytest.raises(ValueError, match="--worker"):
            WorkerSetup.parse(bad)


# -- merging ---------------------------------------------------------------------------------


def worker_metrics(invites: int, *, in_flight: int, store_up: int, limit: int) -> bytes:
    m = Metrics()
    m.requests.labels("INVITE", "emergency").inc(invites)
    m.enrich_seconds.observe(0.001)
    m.transactions.set(in_flight)
    m.store_up.set(store_up)
    m.overload_limit.labels("max_queue").set(limit)
    return m.render()


def test_merge_sums_counters_histograms_and_counts_but_not_shared_gauges() -> None:
    a = parse_exposition(worker_metrics(3, in_flight=10, store_up=1, limit=500))
    b = parse_exposition(worker_metrics(4, in_flight=5, store_up=0, limit=500))
    text = render_families(merge_families([a, b])).decode()
    assert metric_value(text, "e911_sip_requests_total", method="INVITE") == 7
    assert metric_value(text, "e911_sip_emergency_enrich_seconds_count") == 2
    assert metric_value(text, "e911_sip_emergency_enrich_seconds_bucket", le="+Inf") == 2
    assert metric_value(text, "e911_sip_transactions_in_flight") == 15
    assert metric_value(text, "e911_sip_store_up") == 0  # one worker's failure shows
    assert metric_value(text, "e911_sip_overload_limit", limit="max_queue") == 500
    # One release on the host, not one per worker.
    assert metric_value(text, "e911_sip_build_info", version=__version__) == 1
    assert "_created" not in text
    # The exposition stays valid Prometheus text with the same names and types.
    again = parse_exposition(text.encode())
    assert again["e911_sip_requests"].type == "counter"
    assert again["e911_sip_emergency_enrich_seconds"].type == "histogram"


def test_a_dead_workers_counters_stay_in_the_totals() -> None:
    alive = parse_exposition(worker_metrics(3, in_flight=10, store_up=1, limit=1))
    dead = parse_exposition(worker_metrics(4, in_flight=99, store_up=1, limit=1))
    retired = merge_families([{}, additive_part(dead)])
    text = render_families(merge_families([alive, retired])).decode()
    assert metric_value(text, "e911_sip_requests_total", method="INVITE") == 7
    assert metric_value(text, "e911_sip_transactions_in_flight") == 10  # its gauges are gone


# -- control channel -------------------------------------------------------------------------


async def test_control_channel_carries_readiness_and_metrics_and_sees_the_end() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    state = {"ready": False}
    lost = asyncio.Event()
    worker = asyncio.get_running_loop().create_task(
        serve_worker_side(
            theirs,
            render=lambda: b"# metrics\n",
            readiness=lambda: (state["ready"], {"status": "x"}),
            on_lost=lost.set,
            check_interval=0.01,
        )
    )
    side = SupervisorSide(ours)
    reading = asyncio.get_running_loop().create_task(side.run())
    try:
        async with asyncio.timeout(10):
            await side.reported.wait()
            assert side.ready is False and side.detail == {"status": "x"}
            state["ready"] = True
            while not side.ready:
                await asyncio.sleep(0.01)
        assert await side.metrics(timeout=10) == b"# metrics\n"
        reading.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reading
        async with asyncio.timeout(10):
            await lost.wait()
            await worker
    finally:
        worker.cancel()
        reading.cancel()


async def test_store_health_without_an_edge_pings_once_per_interval() -> None:
    """The supervisor (like provisioning alone) checks the store on a timer, not in a loop."""
    from e911_sip.app import watch_store_health

    pings = 0
    first = asyncio.Event()

    class Store:
        async def ping(self) -> bool:
            nonlocal pings
            pings += 1
            first.set()
            await asyncio.sleep(0)
            return True

    stop = asyncio.Event()
    metrics = Metrics()
    task = asyncio.get_running_loop().create_task(
        watch_store_health(Store(), metrics, stop, interval=3600)  # type: ignore[arg-type]
    )
    async with asyncio.timeout(10):
        await first.wait()
    for _ in range(20):
        await asyncio.sleep(0)
    assert pings == 1
    assert metric_value(metrics.render().decode(), "e911_sip_store_up") == 1
    stop.set()
    async with asyncio.timeout(10):
        await task


def test_check_config_says_how_many_workers_and_needs_udp_with_several(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from e911_sip.cli import main

    good = tmp_path / "good.toml"
    good.write_text('[sip]\nworkers = 2\n[store]\nurl = "redis://127.0.0.1:6379/0"\n')
    assert main(["check-config", "--config", str(good)]) == 0
    assert "edge workers:           2, supervised" in capsys.readouterr().out
    bad = tmp_path / "bad.toml"
    bad.write_text(
        '[sip]\nlisten = ["tls:127.0.0.1:5061"]\nworkers = 2\n'
        '[store]\nurl = "redis://127.0.0.1:6379/0"\n'
    )
    assert main(["check-config", "--config", str(bad)]) == 2
    assert "[sip] workers: more than one worker needs a udp listener" in (capsys.readouterr().err)


async def test_control_channel_hands_answered_calls_over_through_the_supervisor() -> None:
    loop = asyncio.get_running_loop()
    pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(2)]
    held = {0: [("a@x", True, 5.0), ("b@x", False, 6.0)], 1: []}
    adopted: dict[int, list[tuple[str, bool, float]]] = {0: [], 1: []}
    lives: list[tuple[int, ...]] = []
    got = asyncio.Event()

    def on_live(me: int, live: tuple[int, ...]) -> dict[int, list[tuple[str, bool, float]]]:
        lives.append(live)
        out = {1: held[me]} if me == 0 and held[me] else {}
        held[me] = []
        return out

    def on_adopt(me: int, dialogs: list[tuple[str, bool, float]]) -> None:
        adopted[me].extend(dialogs)
        got.set()

    workers = [
        loop.create_task(
            serve_worker_side(
                theirs,
                render=lambda: b"",
                readiness=lambda: (True, {}),
                on_lost=lambda: None,
                check_interval=0.01,
                on_live=functools.partial(on_live, n),
                on_adopt=functools.partial(on_adopt, n),
            )
        )
        for n, (_, theirs) in enumerate(pairs)
    ]
    sides = [SupervisorSide(ours) for ours, _ in pairs]
    # What the supervisor does: a hand-over to slot N goes to worker N as an adoption.
    for side in sides:
        side.on_handover = lambda slot, dialogs: sides[slot].send(
            ADOPT, json.dumps(dialogs).encode()
        )
    readers = [loop.create_task(side.run()) for side in sides]
    try:
        async with asyncio.timeout(10):
            for side in sides:
                await side.reported.wait()
            for side in sides:
                side.send(LIVE, b"[0, 1]")
            await got.wait()
        assert adopted == {0: [], 1: [("a@x", True, 5.0), ("b@x", False, 6.0)]}
        assert lives == [(0, 1), (0, 1)]
    finally:
        for task in (*workers, *readers):
            task.cancel()
