"""The control channel between the supervisor and one edge worker (an AF_UNIX stream pair).

Frames are a 4-byte length, a 1-byte kind and a payload. The worker sends its readiness
(``S``, JSON) when it changes and every few seconds, and answers a metrics request (``M``)
with its registry in Prometheus text (``m``). When a worker comes or goes, the supervisor
tells every worker the live slots (``L``); each hands the answered calls whose Call-IDs now
reach another worker to that worker (``H`` to the supervisor, ``A`` from it), so the drain
of the worker that will receive a call's BYE is the one that waits for it. Either side
seeing the other's end close knows the other process is gone: the supervisor restarts the
worker, and a worker whose supervisor died drains and exits instead of serving on alone.
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

LIVE = ord("L")
"""Supervisor to worker: the slots live now (JSON list), after a worker came or went."""
HANDOVER = ord("H")
"""Worker to supervisor: answered calls that now belong to another slot (JSON
``{"to": slot, "dialogs": [[call_id, emergency, answered_at], ...]}``)."""
ADOPT = ord("A")
"""Supervisor to worker: answered calls handed over to it (JSON list, as above)."""

Dialogs = list[tuple[str, bool, float]]
"""(Call-ID, emergency, answered at) of answered calls whose BYE a drain waits for."""

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
    on_live: Callable[[tuple[int, ...]], dict[int, Dialogs]] | None = None,
    on_adopt: Callable[[Dialogs], None] | None = None,
) -> None:
    """Run the worker's end until the supervisor's end closes (then ``on_lost``) or the task
    is cancelled. ``on_live(live)`` returns the answered calls to hand over, by slot;
    ``on_adopt`` takes those handed to this worker."""
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
            kind, payload = got
            if kind == METRICS_REQUEST:
                writer.write(frame(METRICS_REPLY, render()))
            elif kind == LIVE and on_live is not None:
                live = _slots(payload)
                if live is not None:
                    for slot, dialogs in on_live(live).items():
                        body = {"to": slot, "dialogs": dialogs}
                        writer.write(frame(HANDOVER, json.dumps(body).encode()))
            elif kind == ADOPT and on_adopt is not None:
                dialogs = _dialogs(payload)
                if dialogs:
                    on_adopt(dialogs)
    finally:
        reporting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reporting
        writer.close()


def _slots(payload: bytes) -> tuple[int, ...] | None:
    try:
        value = json.loads(payload)
    except ValueError:
        return None
    if not isinstance(value, list) or not all(type(v) is int for v in value):
        return None
    return tuple(value)


def _dialogs(value: object) -> Dialogs:
    """The well-formed entries of a dialog list (raw JSON bytes or already decoded)."""
    if isinstance(value, bytes | bytearray):
        try:
            value = json.loads(value)
        except ValueError:
            return []
    if not isinstance(value, list):
        return []
    out: Dialogs = []
    for item in value:
        if (
            isinstance(item, list)
            and len(item) == 3
            and isinstance(item[0], str)
            and isinstance(item[1], bool)
            and isinstance(item[2], int | float)
        ):
            out.append((item[0], item[1], float(item[2])))
    return out


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
        self.on_handover: Callable[[int, Dialogs], None] | None = None
        """Called with (slot, dialogs) for the answered calls this worker hands over."""

    def send(self, kind: int, payload: bytes) -> None:
        """One frame to the worker, if its end is open (a worker that is gone has no use
        for it)."""
        writer = self._writer
        if writer is not None and not writer.is_closing():
            writer.write(frame(kind, payload))

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
                elif kind == HANDOVER and self.on_handover is not None:
                    try:
                        body = json.loads(payload)
                        slot = body["to"]
                    except (ValueError, KeyError, TypeError):
                        continue
                    if type(slot) is int:
                        self.on_handover(slot, _dialogs(body.get("dialogs")))
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
