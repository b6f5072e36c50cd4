"""Fixtures that start real processes: redis-server, SIPp, the edge and the Bandwidth emulator.

A missing redis-server or sipp fails the test with the package to install; it never skips,
so a machine without them cannot pass the integration suite by accident.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.harness import (
    BandwidthEmulator,
    EdgeProcess,
    RedisServer,
    SilentTcpPeer,
    SilentUdpPeer,
    Sipp,
)

_HERE = Path(__file__).resolve().parent

_TOOLS = {"redis-server": "redis-server", "sipp": "sip-tester"}


def require_tool(name: str) -> None:
    """Fail the current test unless ``name`` is on PATH."""
    if shutil.which(name) is None:
        pytest.fail(
            f"{name} is not installed; integration tests need it "
            f"(Debian: apt-get install {_TOOLS.get(name, name)}; scripts/check installs it)",
            pytrace=False,
        )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test under tests/integration/ carries the integration marker."""
    for item in items:
        if _HERE in item.path.parents:
            item.add_marker(pytest.mark.integration)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A running redis-server on a free loopback port, stopped (by PID) after the test."""
    require_tool("redis-server")
    server = RedisServer(tmp_path)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def sipp(tmp_path: Path) -> Iterator[Sipp]:
    """A SIPp runner writing under tmp_path; stops any SIPp it started after the test."""
    require_tool("sipp")
    runner = Sipp(tmp_path)
    try:
        yield runner
    finally:
        runner.close()


@pytest.fixture
def edge_factory(tmp_path: Path) -> Iterator[Callable[..., EdgeProcess]]:
    """``edge_factory(config, timeout=15.0, **options)`` starts an edge and returns it once
    ready; ``options`` are EdgeProcess's (``command``, ``env``, ``ssl_context``).

    Every edge started through it is stopped after the test, even if the test failed.
    """
    started: list[EdgeProcess] = []

    def start(config: dict[str, Any], *, timeout: float = 15.0, **options: Any) -> EdgeProcess:
        edge = EdgeProcess(tmp_path, config, **options)
        started.append(edge)
        edge.start(timeout=timeout)
        return edge

    try:
        yield start
    finally:
        for edge in reversed(started):
            edge.stop()


@pytest.fixture
def processes() -> Iterator[list[EdgeProcess]]:
    """A list for the EdgeProcess objects a test starts itself (``harness.serve`` appends to
    it); each is stopped after the test, in the order started."""
    started: list[EdgeProcess] = []
    try:
        yield started
    finally:
        for process in started:
            process.stop()


@pytest.fixture
def emulator(tmp_path: Path) -> Iterator[BandwidthEmulator]:
    """The Bandwidth emulator in a process of its own, stopped (by PID) after the test."""
    running = BandwidthEmulator(tmp_path)
    try:
        running.start()
        yield running
    finally:
        running.stop()


@pytest.fixture
def silent_udp_peer() -> Iterator[SilentUdpPeer]:
    """A UDP trunk that receives and never answers; ``.uri`` for the edge config."""
    with SilentUdpPeer() as peer:
        yield peer


@pytest.fixture
def silent_tcp_peer() -> Iterator[SilentTcpPeer]:
    """A TCP trunk that accepts, receives and never answers; ``.uri`` for the edge config."""
    with SilentTcpPeer() as peer:
        yield peer
