"""The supervisor: ``serve`` with ``[sip] workers`` above 1.

It binds the shared UDP socket and runs the :class:`~e911_sip.transport.dispatch.Dispatcher`
on it (and binds the TCP/TLS listening sockets, which worker 0 serves), starts one edge
worker process per slot (``python -m e911_sip serve --role edge
--worker ...``, inheriting the shared socket to send from, its datagram channel and its
control channel), and starts again, after a backoff, a worker that exits unasked; the others
are not touched. It serves ``/metrics`` (its own series, merged with every worker's),
``/healthz`` and ``/readyz`` (ready while every worker is ready), and with ``--role all``
the provisioning API, once, in this process. On SIGTERM it forwards SIGTERM to every worker
and keeps dispatching until each has finished its own drain, which keeps emergency dialogs.

Slot numbers, not PIDs, own Call-IDs: a restarted worker takes back the Call-IDs of its slot
(only transactions started elsewhere during its absence are cut short).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import signal
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web

from e911_sip import app
from e911_sip.config import Config, UntrustedAction
from e911_sip.metrics import (
    CONTENT_TYPE,
    Family,
    Metrics,
    SupervisorMetrics,
    additive_part,
    merge_families,
    parse_exposition,
    render_families,
)
from e911_sip.proxy.trust import TrustPolicy
from e911_sip.roles import Role
from e911_sip.sip.uri import parse_uri
from e911_sip.transport.control import ADOPT, LIVE, Dialogs, SupervisorSide
from e911_sip.transport.dispatch import DROP_REASONS, Dispatcher, channel_pair
from e911_sip.transport.udp import bind_udp

log = logging.getLogger("e911_sip.supervisor")

STREAM_BACKLOG = 1024
"""Connections the kernel queues on a stream listener, also while worker 0 restarts."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SupervisorOptions:
    """How the supervisor restarts and watches its workers."""

    restart_backoff: float = 0.5
    """Seconds before the first restart of a worker that exited; doubled each time it exits
    again soon after starting."""
    restart_backoff_max: float = 30.0
    """The longest wait before a restart."""
    stable_after: float = 60.0
    """A worker that ran this long before exiting is restarted after the first backoff."""
    start_timeout: float = 60.0
    """Seconds a new worker has to report its listener running before it is killed."""
    scrape_timeout: float = 2.0
    """Seconds a worker has to answer for its metrics."""
    scrape_interval: float = 5.0
    """Seconds between background reads of each worker's counters, so the totals of a worker
    that dies are kept (what it counted since the last read is lost)."""


@dataclass(slots=True)
class _Slot:
    index: int
    backoff: float
    process: asyncio.subprocess.Process | None = None
    control: SupervisorSide | None = None
    counted: dict[str, Family] = field(default_factory=dict)
    """The worker's counters and histograms as last read."""


class Supervisor:
    """Runs ``config.sip.workers`` edge workers behind one UDP address."""

    def __init__(
        self,
        config: Config,
        *,
        metrics: SupervisorMetrics | None = None,
        options: SupervisorOptions | None = None,
    ) -> None:
        self.config = config
        self.metrics = metrics or SupervisorMetrics()
        self.options = options or SupervisorOptions()
        self._slots = [
            _Slot(index=i, backoff=self.options.restart_backoff) for i in range(config.sip.workers)
        ]
        self._sock: socket.socket | None = None
        self._listeners: dict[str, socket.socket] = {}
        """Stream listening sockets, served by worker 0: connections wait in their backlog
        while it restarts."""
        self._dispatcher: Dispatcher | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()
        self._env = dict(os.environ)
        """The workers' environment: with no key file configured, a dialog key made for this
        start, so a worker finishes the calls another one set up (a trunk's BYE, a late 2xx)
        after that one dies. It stays in memory and in the workers' environment only."""
        if config.security.dialog_key is None:
            self._env[app.DIALOG_KEY_ENV] = secrets.token_bytes(32).hex()
        self._retired: dict[str, Family] = {}
        """Counters of workers that exited: /metrics keeps adding them, so totals never
        fall."""
        for state in ("configured", "live", "ready"):
            self.metrics.workers.labels(state)
        self.metrics.workers.labels("configured").set(config.sip.workers)
        self.metrics.workers.labels("live").set_function(lambda: len(self.live))
        self.metrics.workers.labels("ready").set_function(
            lambda: sum(1 for s in self._slots if self._slot_ready(s))
        )
        for reason in DROP_REASONS:
            self.metrics.dispatch_dropped.labels(reason)

    def _admit(self) -> Callable[[str], bool] | None:
        """Whose requests the dispatcher forwards: with ``[security] untrusted = drop``, the
        softswitch's and the trunks' only, as each worker would decide (a worker parses no
        request from anyone else either); with ``reject`` everyone's, so a worker answers
        403."""
        security = self.config.security
        if security.untrusted is not UntrustedAction.DROP:
            return None
        options = app.proxy_options(self.config, ())
        policy = TrustPolicy(
            trusted_sources=security.trusted_sources,
            trunk_hosts=[
                parse_uri(t).host for t in (*options.emergency_trunks, *options.default_trunks)
            ],
        )
        return policy.may_receive

    def _announce_live(self) -> None:
        """Tell every worker the live slots, so each hands the answered calls whose
        Call-IDs moved to the worker that now receives them (and their BYE)."""
        if self._dispatcher is None:
            return
        payload = json.dumps(list(self._dispatcher.live)).encode()
        for slot in self._slots:
            if slot.control is not None:
                slot.control.send(LIVE, payload)

    def _adopt(self, slot: int, dialogs: Dialogs) -> None:
        """Pass answered calls a worker handed over to worker ``slot``, if it is live (one
        that is not gets them from the others when it is: they still hold them)."""
        if not dialogs or slot not in self.live:
            return
        control = self._slots[slot].control
        if control is not None:
            control.send(ADOPT, json.dumps(dialogs).encode())
        log.info("answered calls handed over", extra={"worker": slot, "dialogs": len(dialogs)})

    def _on_drop(self, reason: str) -> None:
        self.metrics.dispatch_dropped.labels(reason).inc()
        if reason == "untrusted_source":
            self.metrics.discarded.labels(reason).inc()

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        """Bind the shared UDP socket and start every worker.

        Raises:
            OSError: the address cannot be bound.
        """
        address = next(a for a in self.config.sip.listen if a.transport == "udp")
        sock = self._sock = bind_udp(address.host, address.port)
        for stream in self.config.sip.listen:
            if stream.transport == "udp":
                continue
            family = socket.AF_INET6 if ":" in stream.host else socket.AF_INET
            listener = socket.socket(family, socket.SOCK_STREAM)
            try:
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                listener.bind((stream.host, stream.port))
                listener.listen(STREAM_BACKLOG)
                listener.setblocking(False)
            except OSError:
                listener.close()
                for other in self._listeners.values():
                    other.close()
                sock.close()
                raise
            self._listeners[stream.transport] = listener
        self._dispatcher = Dispatcher(
            sock,
            max_datagram=self.config.sip.max_message_size,
            on_drop=self._on_drop,
            claims=bool(self._listeners),
            admit=self._admit(),
        )
        dispatcher = self._dispatcher
        self.metrics.dispatched.set_function(lambda: dict(dispatcher.dispatched))
        self.metrics.dispatch_claims.set_function(lambda: dispatcher.claims)
        dispatcher.start()
        loop = asyncio.get_running_loop()
        for slot in self._slots:
            self._tasks.append(loop.create_task(self._run_slot(slot)))
        self._tasks.append(loop.create_task(self._scrape_forever()))
        log.info(
            "supervisor running",
            extra={"workers": len(self._slots), "listen": str(address)},
        )

    @property
    def live(self) -> tuple[int, ...]:
        """The worker slots datagrams go to now."""
        return self._dispatcher.live if self._dispatcher is not None else ()

    def pids(self) -> dict[int, int | None]:
        """Each slot's current worker PID (None while it is being restarted)."""
        return {
            s.index: (s.process.pid if s.process and s.process.returncode is None else None)
            for s in self._slots
        }

    async def _run_slot(self, slot: _Slot) -> None:
        """Start the slot's worker, and again each time it exits unasked."""
        loop = asyncio.get_running_loop()
        while not self._stopping.is_set():
            started = loop.time()
            try:
                code = await self._run_once(slot)
            except OSError as exc:
                log.error(
                    "could not start a worker", extra={"worker": slot.index, "error": str(exc)}
                )
                code = None
            if self._stopping.is_set():
                return
            ran = loop.time() - started
            if ran >= self.options.stable_after:
                slot.backoff = self.options.restart_backoff
            log.error(
                "worker exited: restarting it",
                extra={
                    "worker": slot.index,
                    "exit_code": code,
                    "ran_seconds": round(ran, 3),
                    "restart_in_seconds": slot.backoff,
                },
            )
            self.metrics.worker_restarts.labels(str(slot.index)).inc()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(slot.backoff):
                    await self._stopping.wait()
            slot.backoff = min(slot.backoff * 2, self.options.restart_backoff_max)

    async def _run_once(self, slot: _Slot) -> int | None:
        """Run one worker process of ``slot`` until it exits; its exit code."""
        if self._sock is None or self._dispatcher is None:
            raise RuntimeError("the supervisor has not been started")
        ours, theirs = channel_pair()
        control_ours, control_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        fds = (self._sock.fileno(), theirs.fileno(), control_theirs.fileno())
        spec = [str(n) for n in (slot.index, *fds)]
        listeners = self._listeners if slot.index == 0 else {}
        spec += [f"{name}={listener.fileno()}" for name, listener in listeners.items()]
        command = [sys.executable, "-m", "e911_sip", "serve", "--role", "edge"]
        if self.config.source is not None:
            command += ["--config", str(self.config.source.resolve())]
        command += ["--worker", ":".join(spec)]
        try:
            process = await asyncio.create_subprocess_exec(
                *command,
                pass_fds=(*fds, *(listener.fileno() for listener in listeners.values())),
                stdin=asyncio.subprocess.DEVNULL,
                env=self._env,
            )
        except OSError:
            ours.close()
            control_ours.close()
            raise
        finally:
            theirs.close()
            control_theirs.close()
        control = SupervisorSide(control_ours)
        control.on_handover = self._adopt
        slot.process, slot.control = process, control
        loop = asyncio.get_running_loop()
        reading = loop.create_task(control.run())
        exited = loop.create_task(process.wait())
        log.info("worker started", extra={"worker": slot.index, "pid": process.pid})
        try:
            reported = loop.create_task(control.reported.wait())
            await asyncio.wait(
                (reported, exited),
                timeout=self.options.start_timeout,
                return_when=asyncio.FIRST_COMPLETED,
            )
            reported.cancel()
            if control.reported.is_set() and not exited.done():
                # Its listener reads the channel now: hand it its Call-IDs.
                self._dispatcher.attach(slot.index, ours)
                log.info(
                    "worker receiving",
                    extra={"worker": slot.index, "pid": process.pid, "live": self.live},
                )
                self._announce_live()
            elif not exited.done():
                log.error(
                    "worker did not start in time: killing it",
                    extra={"worker": slot.index, "pid": process.pid},
                )
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
            return await exited
        finally:
            self._dispatcher.detach(slot.index)
            self._announce_live()
            ours.close()
            if not exited.done():
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await exited
            reading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reading
            # What it counted stays in the totals.
            self._retired = merge_families([self._retired, slot.counted])
            slot.counted = {}
            slot.control = None

    async def drain(self, force: asyncio.Event) -> None:
        """SIGTERM every worker and wait for each to finish its drain; ``force`` sends a
        second SIGTERM (the worker then stops without waiting). Dispatching goes on until
        the last worker has exited, so answered emergency calls keep their BYE."""
        self._stopping.set()
        self._signal_all(signal.SIGTERM)
        slots = self._tasks[: len(self._slots)]
        if not force.is_set():
            forcing = asyncio.get_running_loop().create_task(force.wait())
            try:
                await asyncio.wait([*slots, forcing], return_when=asyncio.FIRST_COMPLETED)
                while not forcing.done() and not all(t.done() for t in slots):
                    await asyncio.wait([*slots, forcing], return_when=asyncio.FIRST_COMPLETED)
            finally:
                forcing.cancel()
        if not all(t.done() for t in slots):
            log.warning("second signal: workers stop without waiting")
            self._signal_all(signal.SIGTERM)
            await asyncio.wait(slots)
        log.info("every worker has stopped")

    def _signal_all(self, signum: int) -> None:
        for slot in self._slots:
            if slot.process is not None and slot.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    slot.process.send_signal(signum)

    async def close(self) -> None:
        """Stop dispatching and end every worker still running (SIGKILL: after a drain
        there are none)."""
        self._stopping.set()
        if self._dispatcher is not None:
            self._dispatcher.stop()
        self._signal_all(signal.SIGKILL)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        for listener in self._listeners.values():
            listener.close()
        self._listeners.clear()

    # -- what /readyz and /metrics show ----------------------------------------------------
    def _slot_ready(self, slot: _Slot) -> bool:
        return (
            slot.control is not None
            and slot.control.ready
            and slot.index in self.live
            and slot.process is not None
            and slot.process.returncode is None
        )

    def readiness(self) -> tuple[bool, dict[str, object]]:
        """Ready while every worker is ready and none is draining: a host missing a worker
        serves its share of calls on the others, but an operator and a load balancer should
        see it until the restart completes."""
        workers: list[dict[str, object]] = []
        for slot in self._slots:
            detail = slot.control.detail if slot.control is not None else {}
            workers.append(
                {
                    "worker": slot.index,
                    "pid": self.pids()[slot.index],
                    "ready": self._slot_ready(slot),
                    "status": detail.get("status", "starting"),
                }
            )
        draining = self._stopping.is_set()
        ready = not draining and all(w["ready"] for w in workers)
        status = "draining" if draining else ("ready" if ready else "not_ready")
        return ready, {"status": status, "workers": workers, "live": list(self.live)}

    async def _read_worker(self, slot: _Slot) -> dict[str, Family]:
        """The worker's families, or its last-read counters when it does not answer; empty
        when it exited meanwhile (its counters are in the retired totals then)."""
        control = slot.control
        text = await control.metrics(self.options.scrape_timeout) if control else None
        if control is None or slot.control is not control:
            return {}
        if text is None:
            return dict(slot.counted)
        parsed = parse_exposition(text)
        slot.counted = additive_part(parsed)
        return parsed

    async def render(self, own: Metrics | None = None) -> bytes:
        """Prometheus text over this process and every worker."""
        parts: list[dict[str, Family]] = [parse_exposition(self.metrics.render())]
        if own is not None:
            parts.append(parse_exposition(own.render()))
        parts += await asyncio.gather(*(self._read_worker(s) for s in self._slots))
        # Read after the workers: one that exited while being read is counted here once.
        parts.append(self._retired)
        return render_families(merge_families(parts))

    async def _scrape_forever(self) -> None:
        while True:
            await asyncio.sleep(self.options.scrape_interval)
            await asyncio.gather(*(self._read_worker(s) for s in self._slots))

    def ops_app(self, metrics: Metrics | None) -> web.Application:
        """``/metrics``, ``/healthz`` and ``/readyz`` over every worker."""

        async def metrics_handler(_: web.Request) -> web.Response:
            body = await self.render(metrics)
            return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

        async def healthz(_: web.Request) -> web.Response:
            return web.json_response({"status": "ok"})

        async def readyz(_: web.Request) -> web.Response:
            ready, details = self.readiness()
            return web.json_response(details, status=200 if ready else 503)

        application = web.Application()
        application.router.add_get("/metrics", metrics_handler)
        application.router.add_get("/healthz", healthz)
        application.router.add_get("/readyz", readyz)
        return application


async def serve(config: Config, *, role: Role) -> int:
    """``serve`` with several workers: this process supervises them (and runs provisioning
    with ``--role all``). Returns the exit code."""
    supervisor = Supervisor(config)
    return await app.run(config, role=role, supervision=supervisor)
