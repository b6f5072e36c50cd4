"""The control channel between the supervisor and one edge worker (an AF_UNIX stream pair).

Frames are a 4-byte length, a 1-byte kind and a payload. The worker sends its readiness
(``S``, JSON) when it changes and every few seconds, and answers a metrics request (``M``)
with its registry in Prometheus text (``m``). Either side seeing the other's end close
knows the other process is gone: the supervisor restarts the worker, and a worker whose
supervisor died drains and exits instead of serving on alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct
from collections.abc import Callable
from typing import Any

_FRAME = struct.Struct("!IB")
MAX_FRAME = 64 * 1024 * 1024
"""Largest payload accepted; a larger length means the stream is corrupt."""

STATUS = ord("S")
METRICS_REQUEST = ord("M")
METRICS_REPLY = ord("m")

STATUS_INTERVAL = 5.0
"""Seconds between status frames when nothing changed."""

Readiness = Callable[[], tuple[bool, dict[str, object]]]


def frame(kind: int, payload: bytes = b"") -> bytes:
    """One frame on the wire."""
    return _FRAME.pack(len(payload), kind) + payload


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes] | None:
    """The next (kind, payload); None at the end of the stream or on a corrupt length."""
    try:
        head = await reader.readexactly(_FRAME.size)
        length, kind = _FRAME.unpack(head)
        if length > MAX_FRAME:
            return None
        return kind, await reader.readexactly(length)
    except (asyncio.IncompleteReadError, ConnectionError):
        return None


async def serve_worker_side(
    sock: socket.socket,
    *,
    render: Callable[[], bytes],
    readiness: Readiness,
    on_lost: Callable[[], None],
    check_interval: float = 0.2,
) -> None:
    """Run the worker's end until the supervisor's end closes (then ``on_lost``) or the task
    is cancelled."""
    reader, writer = await asyncio.open_unix_connection(sock=sock)
    last: bytes | None = None

    async def report() -> None:
        nonlocal last
        since = 0.0
        while True:
            ready, detail = readiness()
            body = json.dumps({"ready": ready, "detail": detail}, default=str).encode()
            since += check_interval
            if body != last or since >= STATUS_INTERVAL:
                writer.write(frame(STATUS, body))
                last = body
                since = 0.0
            await asyncio.sleep(check_interval)

    reporting = asyncio.get_running_loop().create_task(report())
    try:
        while True:
            got = await read_frame(reader)
            if got is None:
                on_lost()
                return
            if got[0] == METRICS_REQUEST:
                writer.write(frame(METRICS_REPLY, render()))
    finally:
        reporting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reporting
        writer.close()


class SupervisorSide:
    """The supervisor's end of one worker's control channel."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._writer: asyncio.StreamWriter | None = None
        self._pending: asyncio.Future[bytes] | None = None
        self._asking = asyncio.Lock()
        self.ready = False
        self.detail: dict[str, Any] = {"status": "starting"}
        self.reported = asyncio.Event()
        """Set once the worker has sent its first status (its listener is running)."""

    async def run(self) -> None:
        """Read the worker's frames until its end closes."""
        reader, self._writer = await asyncio.open_unix_connection(sock=self._sock)
        try:
            while True:
                got = await read_frame(reader)
                if got is None:
                    return
                kind, payload = got
                if kind == STATUS:
                    try:
                        status = json.loads(payload)
                        self.ready = bool(status["ready"])
                        self.detail = dict(status["detail"])
                    except (ValueError, KeyError, TypeError):
                        continue
                    self.reported.set()
                elif kind == METRICS_REPLY and self._pending is not None:
                    if not self._pending.done():
                        self._pending.set_result(payload)
        finally:
            self.ready = False
            if self._pending is not None and not self._pending.done():
                self._pending.set_result(b"")
            self._writer.close()

    async def metrics(self, timeout: float) -> bytes | None:
        """The worker's metrics in Prometheus text; None when it does not answer in time."""
        async with self._asking:
            writer = self._writer
            if writer is None or writer.is_closing():
                return None
            self._pending = asyncio.get_running_loop().create_future()
            writer.write(frame(METRICS_REQUEST))
            try:
                async with asyncio.timeout(timeout):
                    payload = await self._pending
            except TimeoutError:
                return None
            finally:
                self._pending = None
            return payload or None
