"""The composition root: builds every part from a Config and runs them until a signal.

Only this module (and the CLI) turns configuration into objects. Roles: ``edge`` runs the SIP
edge, ``provisioning`` the provisioning API, ``all`` both in one process sharing one location
store (the embedded single-box mode).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import gc
import logging
import os
import resource
import signal
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit

from aiohttp import web

from e911_sip import __version__, build, logs
from e911_sip.batching import Pauses
from e911_sip.callrecords.book import CallRecord
from e911_sip.callrecords.recorder import CallRecorder
from e911_sip.callrecords.stream import (
    LocalHandoff,
    RecordSink,
    RecordSource,
    RedisStreamSink,
    RedisStreamSource,
)
from e911_sip.config import (
    Config,
    ConfigError,
    HttpsConfig,
    StartTls,
    TlsConfig,
    UntrustedAction,
    server_tls_context,
)
from e911_sip.edge import Edge, EdgeOptions
from e911_sip.metrics import Metrics
from e911_sip.notify.channels import (
    Channel,
    EmailChannel,
    EmailOptions,
    SmsChannel,
    SmsOptions,
    WebhookChannel,
    WebhookOptions,
)
from e911_sip.notify.dispatch import NO_TARGET, Notifier, Publisher
from e911_sip.notify.event import CallEvent, Resolution
from e911_sip.notify.queue import FileQueue, Queue, QueueError, RedisStreamQueue
from e911_sip.opshttp import build_ops_app
from e911_sip.policy.emergency import emergency_number
from e911_sip.policy.enrich import EnrichOptions, ExistingGeolocation
from e911_sip.provisioning.api import build_provisioning_app
from e911_sip.provisioning.audit import AuditLog, JsonlAuditLog, MemoryAuditLog, RedisAuditLog
from e911_sip.provisioning.bandwidth import BandwidthClient
from e911_sip.provisioning.calls import (
    CallQuery,
    CallRecordKeeper,
    CallStore,
    KeeperOptions,
    build_call_store,
    level_resolver,
)
from e911_sip.provisioning.coverage_monitor import (
    CoverageMonitor,
    CoverageOptions,
    NotifyingStateStore,
    OrderTracker,
    TrackedProvider,
)
from e911_sip.provisioning.emulator import EmulatorOptions, serve_emulator
from e911_sip.provisioning.imports import (
    FileJobStore,
    ImportRunner,
    JobStore,
    MemoryJobStore,
    RedisJobStore,
)
from e911_sip.provisioning.messaging import BandwidthMessageSender
from e911_sip.provisioning.service import ProvisioningService, ServiceOptions
from e911_sip.provisioning.state import (
    FileStateStore,
    MemoryStateStore,
    RedisStateStore,
    StateStore,
)
from e911_sip.proxy.admission import LoadSignal, Priority, classify
from e911_sip.proxy.core import ProxyCore, ProxyOptions
from e911_sip.proxy.routing import LocalAddress
from e911_sip.roles import Role, WorkerSetup
from e911_sip.sip.transaction import TimerSettings
from e911_sip.sip.uri import Uri
from e911_sip.store import schema
from e911_sip.store.base import LineRecordWriter, LocationStore, StoreError
from e911_sip.store.memory import MemoryStore
from e911_sip.store.mirror import MirroredRedisStore, MirrorOptions
from e911_sip.store.redis import RedisStore, connect
from e911_sip.store.resilient import LookupOptions, ResilientLookup
from e911_sip.store.resp import RespStreamWriter
from e911_sip.store.sentinel import master_changes
from e911_sip.transport.control import Dialogs, serve_worker_side
from e911_sip.transport.dispatch import (
    ClaimingSink,
    WorkerStreamTransport,
    WorkerUdpTransport,
    pick,
)
from e911_sip.transport.limits import CLOSE_REASONS, ConnectionTable, StreamLimits
from e911_sip.transport.stream import TcpTransport
from e911_sip.transport.udp import UdpOptions, UdpTransport

log = logging.getLogger("e911_sip.app")


class Supervision(Protocol):
    """A process that runs the edge in worker processes (see ``supervisor.py``)."""

    async def start(self) -> None:
        """Bind the shared listener and start the workers."""
        ...

    def ops_app(self, metrics: Metrics | None) -> web.Application:
        """The operations endpoints over every worker and ``metrics`` of this process."""
        ...

    async def drain(self, force: asyncio.Event) -> None:
        """Have every worker drain, and wait for them."""
        ...

    async def close(self) -> None:
        """Stop everything still running."""
        ...


def check_role(config: Config, role: Role) -> None:
    """Refuse combinations that cannot work.

    Raises:
        ConfigError: provisioning alone with the in-memory store would write line records
            no edge can read.
    """
    if role is Role.PROVISIONING and config.store.url.startswith("memory://"):
        raise ConfigError(
            "[store] url: --role provisioning writes line records for edges in other "
            "processes; use redis://, or run --role all for the embedded single box"
        )
    if role is Role.PROVISIONING and not config.provisioning.tokens:
        raise ConfigError("[provisioning] tokens: --role provisioning needs at least one token")


def _redis(url: str) -> bool:
    return url.startswith(("redis://", "rediss://", "unix://"))


def schema_urls(config: Config, *, provisioning: bool) -> list[tuple[str, str]]:
    """``([section] key, url)`` of each Redis database whose data layout a process uses: the
    line records' (every role), and with ``provisioning`` the state's when it is another
    database."""
    urls = [("[store] url", config.store.url)] if _redis(config.store.url) else []
    state = config.provisioning.state_url
    if provisioning and _redis(state) and state != config.store.url:
        urls.append(("[provisioning] state_url", state))
    return urls


async def schema_status(
    config: Config, *, writer: bool, provisioning: bool | None = None
) -> list[tuple[str, str, schema.SchemaCheck | str]]:
    """For each of :func:`schema_urls` (``provisioning`` defaults to ``writer``): what the
    schema check concluded, or why Redis could not be asked. A ``writer`` (provisioning)
    also records this release's version there.

    Raises:
        SchemaRefused: one database holds a layout this release must not use.
    """
    out: list[tuple[str, str, schema.SchemaCheck | str]] = []
    timeout = max(config.store.socket_timeout, 1.0)
    wanted = writer if provisioning is None else provisioning
    for where, url in schema_urls(config, provisioning=wanted):
        try:
            verdict = await schema.check(url, writer=writer, socket_timeout=timeout)
        except schema.SchemaRefused as exc:
            raise schema.SchemaRefused(f"{where}: {exc}") from exc
        except StoreError as exc:
            out.append((where, url, str(exc)))
        else:
            out.append((where, url, verdict))
    return out


async def check_schema(config: Config, *, writer: bool) -> None:
    """Refuse to start on data of another schema major (docs/operations.md, Upgrading).

    Redis being unreachable is not a reason to stay down: the edge must route 911 calls
    without it, so the check is skipped with a warning.

    Raises:
        ConfigError: the data's layout must not be used by this release.
    """
    try:
        found = await schema_status(config, writer=writer)
    except schema.SchemaRefused as exc:
        log.error("refusing to start: %s", exc, extra={"schema": str(schema.CURRENT)})
        raise ConfigError(str(exc)) from exc
    for where, _url, verdict in found:
        if isinstance(verdict, str):
            log.warning("data schema not checked: %s", verdict, extra={"where": where})
            continue
        log.info(
            "data schema: %s",
            verdict.message,
            extra={
                "where": where,
                "stored": verdict.stored,
                "release": str(verdict.current),
                "written": str(verdict.write) if writer and verdict.write else None,
            },
        )


def build_store(
    config: Config, *, mirror: bool = True
) -> MemoryStore | RedisStore | MirroredRedisStore:
    """The location store the config names; ``mirror=False`` for processes that only write
    (provisioning alone, resync), which have no use for a copy in memory."""
    if config.store.url.startswith("memory://"):
        if config.store.seed_file is not None:
            try:
                return MemoryStore.from_file(config.store.seed_file)
            except (OSError, ValueError) as exc:
                raise ConfigError(f"[store] seed_file: {exc}") from exc
        return MemoryStore()
    direct = RedisStore(
        url=config.store.url,
        key_prefix=config.store.key_prefix,
        socket_timeout=config.store.socket_timeout,
        pool_size=config.store.pool_size,
        pool_timeout=config.store.pool_timeout,
    )
    if not (mirror and config.store.mirror):
        return direct
    return MirroredRedisStore(
        url=config.store.url,
        direct=direct,
        options=MirrorOptions(key_prefix=config.store.key_prefix),
    )


def local_addresses(config: Config) -> tuple[LocalAddress, ...]:
    """Our SIP addresses as peers should see them."""
    advertise = config.sip.advertise
    return tuple(LocalAddress(a.transport, advertise or a.host, a.port) for a in config.sip.listen)


DIALOG_KEY_ENV = "E911_SIP_DIALOG_KEY"
"""Where a supervisor hands its workers the dialog key it made (hex), when the config names
no key file: each worker then recognises the calls the others set up."""


def dialog_key(config: Config, *, worker: bool) -> bytes | None:
    """The key behind branches, tags and Record-Route stamps: the configured file's, else the
    supervisor's for a worker, else None (the core makes one for this process)."""
    if config.security.dialog_key is not None:
        return config.security.dialog_key
    if worker:
        value = os.environ.get(DIALOG_KEY_ENV)
        if value:
            return bytes.fromhex(value)
    return None


def emergency_policy(numbers: frozenset[str]) -> Callable[[Uri], str | None]:
    """:func:`emergency_number` bound to the configured ``numbers``.

    A closure, not ``functools.partial(emergency_number, numbers=numbers)``: a partial with a
    keyword copies it into a new dict and calls through the keyword path (which the compiled
    function then parses) on every call, and this runs for every INVITE and every datagram.
    """

    def policy(uri: Uri) -> str | None:
        return emergency_number(uri, numbers)

    return policy


def datagram_classifier(numbers: frozenset[str]) -> Callable[[bytes], Priority]:
    """:func:`classify` bound to :func:`emergency_policy`, for the UDP adapter's read: a
    closure, for the reason :func:`emergency_policy` gives."""
    policy = emergency_policy(numbers)

    def classify_datagram(data: bytes) -> Priority:
        return classify(data, policy)

    return classify_datagram


def proxy_options(
    config: Config,
    local: tuple[LocalAddress, ...],
    load: LoadSignal | None = None,
    *,
    key: bytes | None = None,
) -> ProxyOptions:
    """The proxy core's options from the config; ``load`` tells it when to shed, ``key`` is
    :func:`dialog_key`'s."""
    numbers = frozenset(config.emergency.numbers)
    overload = config.overload
    return ProxyOptions(
        local=local,
        emergency_classifier=emergency_policy(numbers),
        max_transactions=overload.max_transactions,
        shed_transactions=overload.shed_transactions,
        max_contexts=overload.max_contexts,
        overload=load.shed_reason if load is not None else lambda: None,
        retry_after=overload.retry_after,
        emergency_trunks=(*config.emergency.trunks, *config.emergency.fallback_trunks()),
        default_trunks=config.default.trunks,
        provisional_timeout=config.emergency.provisional_timeout,
        fail_open_after=config.emergency.fail_open_after,
        trying_after=config.emergency.trying_after,
        timer_c=config.sip.timer_c,
        timers=TimerSettings(t1=config.sip.t1, t2=config.sip.t2, t4=config.sip.t4),
        max_message_size=config.sip.max_message_size,
        max_headers=config.sip.max_headers,
        trusted_sources=config.security.trusted_sources,
        reject_untrusted=config.security.untrusted is UntrustedAction.REJECT,
        keep_device_geolocation=(
            config.emergency.existing_geolocation is not ExistingGeolocation.REMOVE
        ),
        max_trunk_dialogs=config.security.max_trunk_dialogs,
        trunk_dialog_max_age=config.security.trunk_dialog_max_age,
        dialog_key=key,
        emergency_probe=config.emergency.probe,
        default_probe=config.default.probe,
    )


def raise_nofile_limit() -> int | None:
    """Raise the soft open-file limit to the hard one; returns the soft limit now in force
    (None: unlimited).

    Every connection, outbound trunk connection and HTTP client holds a descriptor; at the
    common default of 1024 a modest connection flood made accept() fail and reset the
    softswitch's connection and /metrics along with it.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft != hard:
        # An unlimited hard limit still stops at the kernel's nr_open (1048576 by default).
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1_048_576)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-file limit", extra={"error": str(exc)})
    return open_file_limit()


def open_file_limit() -> int | None:
    """The soft open-file limit in force; None when unlimited."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return None if soft == resource.RLIM_INFINITY else soft


FD_HEADROOM = 256
"""Descriptors kept free of stream connections: the store, HTTP clients, listeners, logs."""


def stream_limits(config: Config, nofile: int | None = None) -> StreamLimits:
    """The stream connection bounds from ``[tcp]``, fitted under the open-file limit.

    When ``nofile`` cannot hold ``max_connections`` and ``max_outbound`` plus
    :data:`FD_HEADROOM`, the inbound cap (and its trusted reserve, to a quarter) is lowered:
    a table that outgrows the descriptors makes accept() fail for everyone, the softswitch and
    ``/metrics`` included, where a cap refuses outsiders only.
    """
    tcp = config.tcp
    max_connections = tcp.max_connections
    reserve = tcp.trusted_reserve
    if nofile is not None and nofile - tcp.max_outbound - FD_HEADROOM < max_connections:
        max_connections = max(8, nofile - tcp.max_outbound - FD_HEADROOM)
        reserve = min(reserve, max_connections // 4)
        log.warning(
            "open-file limit too low for [tcp] max_connections: lowered",
            extra={
                "nofile": nofile,
                "max_connections": max_connections,
                "trusted_reserve": reserve,
            },
        )
    return dataclasses.replace(tcp, max_connections=max_connections, trusted_reserve=reserve)


def tls_contexts(tls: TlsConfig) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """The (server, client) contexts for TLS listeners and TLS trunks.

    Both present our certificate (mutual TLS between proxies, RFC 3261 §26.3.2.2) and
    verify the peer against ``ca_file``; the client side also checks the trunk's name or IP.

    Raises:
        ConfigError: a certificate, key or CA file cannot be loaded.
    """
    minimum = ssl.TLSVersion.TLSv1_3 if tls.minimum_version == "1.3" else ssl.TLSVersion.TLSv1_2
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED, check_hostname
    server.verify_mode = ssl.CERT_REQUIRED if tls.verify_client else ssl.CERT_OPTIONAL
    for context in (server, client):
        context.minimum_version = minimum
        try:
            if tls.certificate is not None:
                context.load_cert_chain(tls.certificate, tls.private_key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"[tls] certificate: cannot load it with its key: {exc}") from exc
        try:
            if tls.ca_file is not None:
                context.load_verify_locations(cafile=tls.ca_file)
            else:
                context.load_default_certs(
                    ssl.Purpose.SERVER_AUTH if context is client else ssl.Purpose.CLIENT_AUTH
                )
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"[tls] ca_file: cannot load it: {exc}") from exc
    return server, client


def watch_send_backlog(metrics: Metrics, transport: UdpTransport) -> None:
    """Publish the UDP listener's send backlog as a gauge."""
    metrics.send_backlog.set_function(lambda: transport.send_backlog)


@dataclass(slots=True)
class RunningEdge:
    """An edge and its transports, for the lifecycle to drain and close."""

    edge: Edge
    transports: list[UdpTransport | TcpTransport]
    claims: list[ClaimingSink] = dataclasses.field(default_factory=list)
    """A worker's stream sinks: the Call-IDs they claimed stay this worker's."""

    def hand_over(self, slot: int, live: tuple[int, ...]) -> dict[int, Dialogs]:
        """The answered calls whose messages now go to another live worker, taken out of
        this one's edge (see :meth:`Edge.hand_over`)."""

        def owner(call_id: str) -> int:
            raw = call_id.encode("latin-1", "replace")
            if any(sink.claimed(raw) for sink in self.claims):
                return slot
            return pick(raw, live) if live else slot

        return self.edge.hand_over(owner, slot)


async def start_edge(
    config: Config,
    store: LocationStore,
    metrics: Metrics,
    *,
    recorder: CallRecorder | None = None,
    notify: Publisher | None = None,
    worker: WorkerSetup | None = None,
) -> RunningEdge:
    """Bind the SIP listeners and return the running edge; a ``worker`` receives its UDP
    datagrams from the supervisor's dispatcher and sends from the shared socket.

    The stream connection table asks the core's trust policy whether a source is the
    softswitch: trusted sources are never refused a connection because outsiders filled it.

    Raises:
        OSError: a listener could not be bound.
        ConfigError: the TLS certificate, key or CA file cannot be loaded.
    """
    local = local_addresses(config)
    overload = config.overload
    load = LoadSignal(
        max_lag=overload.max_lag,
        max_queue=overload.max_queue,
        max_queue_delay=overload.max_queue_delay,
        queue_delay_sustain=overload.queue_delay_sustain,
    )
    key = dialog_key(config, worker=worker is not None)
    core = ProxyCore(options=proxy_options(config, local, load, key=key), entropy=os.urandom)
    for name, value in (
        ("max_lag_seconds", overload.max_lag),
        ("max_queue", overload.max_queue),
        ("max_queue_delay_seconds", overload.max_queue_delay),
        ("queue_delay_sustain_seconds", overload.queue_delay_sustain),
        ("queue_limit", overload.queue_limit),
        ("shed_transactions", overload.shed_transactions),
        ("max_transactions", overload.max_transactions),
        ("max_contexts", overload.max_contexts),
        ("send_backlog", UdpOptions().send_backlog),
    ):
        metrics.overload_limit.labels(name).set(value)
    numbers = frozenset(config.emergency.numbers)
    udp_options = UdpOptions(
        classify=datagram_classifier(numbers),
        queue_limit=overload.queue_limit,
        batch=overload.batch,
        max_datagram=config.sip.max_message_size,
    )
    emergency = config.emergency
    failures = metrics.store_lookup_failures
    lookup = ResilientLookup(
        store,
        options=LookupOptions(
            timeout=emergency.lookup_timeout,
            cache_size=emergency.cache_size,
            cache_max_age=emergency.cache_max_age,
            breaker=emergency.breaker,
        ),
        on_failure=lambda kind: failures.labels(kind).inc(),
        on_breaker=lambda state: metrics.set_store_breaker(state.value),
        on_skip=metrics.store_lookups_skipped.inc,
    )
    edge = Edge(
        core=core,
        store=store,
        lookup=lookup,
        metrics=metrics,
        options=EdgeOptions(
            enrich=EnrichOptions(
                geolocation_base_url=emergency.geolocation_base_url,
                existing_geolocation=emergency.existing_geolocation,
                pai_domain=emergency.pai_domain,
                fallback_domain=local[0].host,
            ),
            drain_timeout=config.shutdown.drain_timeout,
            emergency_drain_timeout=config.shutdown.emergency_drain_timeout,
            dialog_drain_timeout=config.shutdown.dialog_drain_timeout,
            min_drain_time=config.shutdown.min_drain_time,
            lag_interval=overload.lag_interval,
        ),
        load=load,
        recorder=recorder,
        notify=notify.publish if notify is not None else None,
    )
    server_ssl: ssl.SSLContext | None = None
    client_ssl: ssl.SSLContext | None = None
    if any(a.transport == "tls" for a in config.sip.listen):
        server_ssl, client_ssl = tls_contexts(config.tls)
    table = ConnectionTable(
        stream_limits(config, open_file_limit()),
        is_trusted=core.trust.is_trusted,
        on_close=lambda name, reason: metrics.stream_closed.labels(name, reason).inc(),
    )
    transports: list[UdpTransport | TcpTransport] = []
    claims: list[ClaimingSink] = []
    channel = socket.socket(fileno=worker.channel_fd) if worker is not None else None
    try:
        for address in config.sip.listen:
            transport: UdpTransport | TcpTransport
            if address.transport == "udp" and channel is not None and worker is not None:
                transport = WorkerUdpTransport(
                    edge,
                    shared_fd=worker.udp_fd,
                    channel=channel,
                    options=udp_options,
                    load=load,
                    on_drop=edge.datagram_dropped,
                )
            elif address.transport == "udp":
                transport = UdpTransport(
                    edge,
                    host=address.host,
                    port=address.port,
                    options=udp_options,
                    load=load,
                    on_drop=edge.datagram_dropped,
                )
            else:
                tls = address.transport == "tls"
                if worker is not None and channel is not None:
                    # Worker 0 serves the supervisor's listening socket; the others open
                    # outbound connections only. Both claim what their streams carry.
                    sink = ClaimingSink(edge, channel)
                    claims.append(sink)
                    transport = WorkerStreamTransport(
                        sink,
                        listen_fd=worker.listeners.get(address.transport),
                        host=address.host,
                        port=address.port,
                        connect_timeout=config.sip.tcp_connect_timeout,
                        max_message_size=config.sip.max_message_size,
                        table=table,
                        server_ssl=server_ssl if tls else None,
                        client_ssl=client_ssl if tls else None,
                        server_name=config.tls.server_name if tls else None,
                    )
                else:
                    transport = TcpTransport(
                        edge,
                        host=address.host,
                        port=address.port,
                        connect_timeout=config.sip.tcp_connect_timeout,
                        max_message_size=config.sip.max_message_size,
                        table=table,
                        server_ssl=server_ssl if tls else None,
                        client_ssl=client_ssl if tls else None,
                        server_name=config.tls.server_name if tls else None,
                    )
                for reason in CLOSE_REASONS:
                    metrics.stream_closed.labels(address.transport, reason)
                for direction in ("inbound", "outbound"):
                    metrics.stream_connections.labels(address.transport, direction).set_function(
                        functools.partial(
                            table.count, address.transport, inbound=direction == "inbound"
                        )
                    )
            await transport.start()
            if isinstance(transport, UdpTransport):
                watch_send_backlog(metrics, transport)
            transports.append(transport)
            edge.add_transport(address.transport, transport)
            log.info("sip listener bound", extra={"listen": str(address)})
    except OSError:
        for transport in transports:
            await transport.close()
        raise
    edge.start()
    return RunningEdge(edge, transports, claims)


@contextlib.asynccontextmanager
async def serve_http(
    app: web.Application, host: str, port: int, *, tls: HttpsConfig | None, section: str
) -> AsyncIterator[None]:
    """Serve an aiohttp application for the duration of the block, over HTTPS when ``tls``
    is set (the context is built here from the files, so a start reads them afresh).

    Raises:
        ConfigError: a TLS file of ``[section]`` cannot be used.
        OSError: the address cannot be bound.
    """
    context = server_tls_context(tls, section) if tls is not None else None
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, reuse_address=True, ssl_context=context)
        await site.start()
        yield
    finally:
        await runner.cleanup()


def http_url(host: str, port: int, tls: HttpsConfig | None) -> str:
    """The base URL of a listener, for the log."""
    shown = f"[{host}]" if ":" in host else host
    return f"{'https' if tls is not None else 'http'}://{shown}:{port}"


def build_state(config: Config) -> StateStore:
    """The provisioning state backend ``[provisioning] state_url`` names."""
    url = config.provisioning.state_url
    if url.startswith("file://"):
        return FileStateStore(Path(url[len("file://") :]))
    if url.startswith("memory://"):
        return MemoryStateStore()
    return RedisStateStore(
        url=url, key_prefix=config.provisioning.key_prefix, leases=config.provisioning.leases
    )


def build_job_store(config: Config) -> JobStore:
    """Where bulk import jobs live: beside the provisioning state (``[provisioning]
    state_url``), so a job survives a restart whenever the state does."""
    url = config.provisioning.state_url
    keep = config.provisioning.imports.import_keep_jobs
    if url.startswith("file://"):
        state = Path(url[len("file://") :])
        return FileJobStore(state.parent / f"{state.stem}.imports", keep=keep)
    if url.startswith("memory://"):
        return MemoryJobStore(keep=keep)
    return RedisJobStore(
        url=url,
        key_prefix=config.provisioning.key_prefix,
        keep=keep,
        leases=config.provisioning.leases,
    )


async def start_imports(
    config: Config,
    service: ProvisioningService,
    metrics: Metrics,
    stack: contextlib.AsyncExitStack,
) -> ImportRunner:
    """The bulk importer, with every job a previous process left unfinished resumed; its
    jobs stop (to resume at the next start) when ``stack`` closes."""
    jobs = build_job_store(config)
    stack.push_async_callback(jobs.close)
    runner = ImportRunner(
        service=service, store=jobs, options=config.provisioning.imports, metrics=metrics
    )
    stack.push_async_callback(runner.close)
    resumed = await runner.resume()
    if resumed:
        log.info("unfinished import jobs resumed", extra={"jobs": resumed})
    return runner


def build_audit(config: Config) -> AuditLog:
    """The audit trail backend ``[provisioning] audit_url`` names."""
    url = config.provisioning.audit_url
    if url.startswith("file://"):
        return JsonlAuditLog(Path(url[len("file://") :]))
    if url.startswith("memory://"):
        return MemoryAuditLog()
    return RedisAuditLog(url=url, stream=config.provisioning.audit_stream)


def record_sink(config: Config, handoff: LocalHandoff | None) -> RecordSink | None:
    """Where an edge writes call records: the in-process handoff of the embedded box, or the
    Redis stream on ``[store] url``; None when nothing would keep them."""
    if not config.records.enabled:
        return None
    if config.store.url.startswith("memory://"):
        return handoff
    return RedisStreamSink(
        url=config.store.url,
        stream=config.records.stream,
        maxlen=config.records.stream_maxlen,
        timeout=max(config.store.socket_timeout, 1.0),
    )


def record_source(config: Config, handoff: LocalHandoff | None) -> RecordSource | None:
    """Where provisioning reads call records (see :func:`record_sink`)."""
    if not config.records.enabled:
        return None
    if config.store.url.startswith("memory://"):
        return handoff
    return RedisStreamSource(
        url=config.store.url,
        stream=config.records.stream,
        group=config.records.group,
        consumer=config.records.consumer,
        timeout=max(config.store.socket_timeout, 2.0),
    )


def build_recorder(config: Config, sink: RecordSink, metrics: Metrics) -> CallRecorder:
    """The edge's call recorder with the ``[records]`` bounds."""
    records = config.records
    return CallRecorder(
        sink=sink,
        metrics=metrics,
        options=records.recorder,
    )


def build_calls(config: Config) -> CallStore:
    """The durable call record store ``[records] store_url`` names."""
    return build_call_store(config.records.store_url, key_prefix=config.records.key_prefix)


@contextlib.asynccontextmanager
async def provisioning_service(
    config: Config,
    lines: LineRecordWriter,
    metrics: Metrics | None,
    *,
    orders: OrderTracker | None = None,
    state: StateStore | None = None,
) -> AsyncIterator[ProvisioningService]:
    """A provisioning service with its Bandwidth client and backends, closed on exit.

    With ``orders``, endpoint orders are reported to it (coverage figures). ``state``
    replaces the store ``[provisioning] state_url`` names (it is closed on exit all the same).
    """
    state = state if state is not None else build_state(config)
    audit = build_audit(config)
    try:
        async with BandwidthClient(config.bandwidth.client) as client:
            yield ProvisioningService(
                provider=client if orders is None else TrackedProvider(client, orders),
                lines=lines,
                state=state,
                audit=audit,
                # Seeded demo records belong to no account; resync must not prune them.
                options=ServiceOptions(resync_prunes_orphan_lines=config.store.seed_file is None),
                metrics=metrics,
            )
    finally:
        await state.close()
        await audit.close()


def build_coverage(
    config: Config,
    state: NotifyingStateStore,
    lines: LineRecordWriter,
    orders: OrderTracker,
    metrics: Metrics,
) -> CoverageMonitor:
    """The coverage figures of ``GET /v1/coverage`` and the ``e911_sip_coverage_*`` gauges."""
    return CoverageMonitor(
        customers=state.all_customers,
        lines=lines,
        tracker=orders,
        options=CoverageOptions(
            interval=config.provisioning.coverage_interval,
            alert_below=config.provisioning.coverage_alert_below,
        ),
        metrics=metrics,
    )


async def start_emulator(config: Config, stack: contextlib.AsyncExitStack) -> None:
    """Serve the bundled emulator at ``[bandwidth] api_base`` for the life of ``stack``."""
    bw = config.bandwidth.client
    url = urlsplit(bw.api_base)
    if url.hostname is None or url.port is None:
        raise ConfigError("[bandwidth] api_base: run_emulator needs http://HOST:PORT/api/v2")
    options = EmulatorOptions(
        client_id=bw.client_id, client_secret=bw.client_secret, account_id=bw.account_id
    )
    stop = asyncio.Event()
    ready = asyncio.Event()
    task = asyncio.create_task(
        serve_emulator(
            options, host=url.hostname, port=url.port, ready=lambda _port: ready.set(), stop=stop
        )
    )

    async def shutdown() -> None:
        stop.set()
        await task

    stack.push_async_callback(shutdown)
    waiter = asyncio.create_task(ready.wait())
    await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    if not ready.is_set():
        waiter.cancel()
        task.result()  # raises the bind error
    log.warning(
        "serving the Bandwidth emulator in-process; not for production",
        extra={"api_base": bw.api_base},
    )


async def watch_store_health(
    store: LocationStore, metrics: Metrics, stop: asyncio.Event, interval: float = 1.0
) -> None:
    """Keep ``e911_sip_store_up`` true in a process without an edge (provisioning alone, or
    the supervisor of several workers): one PING every ``interval``."""
    while not stop.is_set():
        metrics.store_up.set(1 if await store.ping() else 0)
        try:
            async with asyncio.timeout(interval):
                await stop.wait()
        except TimeoutError:
            pass


@dataclass(slots=True)
class NotifyParts:
    """The notification queues, and the edge's publisher when this process runs an edge."""

    events: Queue
    deliveries: Queue
    publisher: Publisher | None

    async def close(self) -> None:
        await self.events.close()
        await self.deliveries.close()


def notification_dropped(metrics: Metrics) -> Callable[[CallEvent], None]:
    """What the edge does with a notification event its full backlog cannot take: count it,
    and log it through a rate limiter (a line per event while a burst lasts, then a summary)."""
    counter = metrics.notification_events_dropped
    dropped_log = logs.RateLimitedLog(
        log,
        "notification event dropped: the backlog is full (the queue is unreachable or not "
        "keeping up)",
        noun="notification events dropped",
        level=logging.ERROR,
    )

    def dropped(event: CallEvent) -> None:
        counter.inc()
        dropped_log.hit("backlog_full", lambda: {"call_id": event.call_id})

    return dropped


def notification_without_target(metrics: Metrics) -> Callable[[CallEvent], None]:
    """What the notifier does with a call that has nobody to notify: count it
    (``e911_sip_notifications_total{channel="none",outcome="no_target"}``) and log it, a line
    per call while a burst lasts and then a summary: a box with no targets configured takes
    every 911 call this way, and a WARNING line each would cost more than the call."""
    counter = metrics.notifications.labels("none", "no_target")
    no_target_log = logs.RateLimitedLog(
        log, NO_TARGET, noun="emergency calls with no notification target", level=logging.WARNING
    )

    def no_target(event: CallEvent) -> None:
        counter.inc()
        no_target_log.hit("no_target", lambda: {"call_id": event.call_id, "caller": event.caller})

    return no_target


def build_notify(
    config: Config, *, edge: bool, on_dropped: Callable[[CallEvent], None] = lambda event: None
) -> NotifyParts | None:
    """The ``[notify]`` queues: Redis streams next to the line records, else journal files
    (``queue_file``) or memory. None when notifications are disabled."""
    n = config.notify
    if not n.enabled:
        return None
    if config.store.url.startswith("memory://"):
        if n.queue_file is None:
            log.warning("[notify] queue_file is unset: queued notifications are lost on a restart")
            events: Queue = FileQueue(None)
            deliveries: Queue = FileQueue(None)
        else:
            try:
                n.queue_file.parent.mkdir(parents=True, exist_ok=True)
                events = FileQueue(n.queue_file)
                deliveries = FileQueue(n.queue_file.with_name(n.queue_file.name + ".deliveries"))
            except (OSError, ValueError) as exc:
                raise ConfigError(f"[notify] queue_file: {exc}") from exc
    else:
        consumer = n.consumer or "notifier"
        # Through store.redis.connect, not RedisStreamQueue.from_url: that is where every
        # Redis URL form (redis+sentinel:// too) is understood. No replica acknowledgements:
        # the publisher retries a failed batch, and a batch the master applied but no replica
        # confirmed would be queued (and notified) twice. The edge's events are written on a
        # pipelined connection of their own (one for every emergency call: redis-py's
        # per-command cost was a large share of the call's), each write within 5 s as the
        # client's socket timeout bounded it; it opens on the first write.
        events = RedisStreamQueue(
            connect(config.store.url, socket_timeout=5.0, replica_acks=False),
            stream=f"{n.key_prefix}events",
            dead_list=f"{n.key_prefix}dead",
            consumer=consumer,
            writer=RespStreamWriter.open(config.store.url, timeout=5.0),
        )
        deliveries = RedisStreamQueue(
            connect(config.store.url, socket_timeout=5.0, replica_acks=False),
            stream=f"{n.key_prefix}deliveries",
            dead_list=f"{n.key_prefix}dead",
            consumer=consumer,
        )
    publisher = None
    if edge:
        publisher = Publisher(events, numbers=frozenset(n.numbers), on_dropped=on_dropped)
    return NotifyParts(events=events, deliveries=deliveries, publisher=publisher)


def notify_channels(config: Config) -> dict[str, Channel]:
    """The channels ``[notify]`` configures: webhooks always (contacts may name them),
    email with ``smtp_url``, SMS with ``sms_from`` (through Bandwidth's Messaging API)."""
    n = config.notify
    channels: dict[str, Channel] = {
        "webhook": WebhookChannel(
            WebhookOptions(
                secret=n.webhook_secret.encode() if n.webhook_secret else None,
                timeout=n.webhook_timeout,
            )
        )
    }
    if n.smtp_url is not None:
        starttls = {StartTls.AUTO: None, StartTls.ALWAYS: True, StartTls.NEVER: False}
        context: ssl.SSLContext | None = None
        if n.smtp_ca_file is not None:
            try:
                context = ssl.create_default_context(cafile=str(n.smtp_ca_file))
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(f"[notify] smtp_ca_file: cannot load it: {exc}") from exc
        try:
            channels["email"] = EmailChannel(
                EmailOptions(
                    smtp_url=n.smtp_url,
                    sender=n.email_from,
                    username=n.smtp_username,
                    password=n.smtp_password,
                    starttls=starttls[n.smtp_starttls],
                    timeout=n.smtp_timeout,
                    tls_context=context,
                )
            )
        except ValueError as exc:
            raise ConfigError(f"[notify] smtp_url: {exc}") from exc
    if n.sms_from is not None:
        sender = BandwidthMessageSender(
            BandwidthClient(config.bandwidth.client),
            sender=n.sms_from,
            application_id=n.sms_application_id,
            owns_client=True,
        )
        channels["sms"] = SmsChannel(sender, SmsOptions(rate=n.sms_rate))
    return channels


async def run_notifier(
    config: Config,
    parts: NotifyParts,
    metrics: Metrics,
    service: ProvisioningService | None,
    stop: asyncio.Event,
) -> None:
    """Deliver notifications until ``stop``; targets unreachable at start are retried, not
    errors."""
    n = config.notify

    async def resolve(event: CallEvent) -> Resolution:
        if service is None:
            return Resolution()
        return await service.notification_context(event.caller)

    channels = notify_channels(config)
    notifier = Notifier(
        events=parts.events,
        deliveries=parts.deliveries,
        channels=channels,
        resolve=resolve,
        options=n.delivery,
        on_outcome=lambda channel, outcome: metrics.notifications.labels(channel, outcome).inc(),
        on_latency=lambda channel, seconds: metrics.notification_seconds.labels(channel).observe(
            seconds
        ),
        on_no_target=notification_without_target(metrics),
    )
    log.info(
        "notifier running",
        extra={"channels": sorted(channels), "numbers": list(n.numbers)},
    )
    try:
        await notifier.run(stop)
    finally:
        for channel in channels.values():
            await channel.close()


async def watch_notify_queues(
    parts: NotifyParts, metrics: Metrics, stop: asyncio.Event, interval: float = 5.0
) -> None:
    """Keep the queue-depth and dead-letter gauges current."""
    while not stop.is_set():
        try:
            metrics.notification_queue.labels("events").set(await parts.events.depth())
            metrics.notification_queue.labels("deliveries").set(await parts.deliveries.depth())
            metrics.notification_dead_letters.set(await parts.deliveries.dead_count())
        except QueueError:
            pass
        try:
            async with asyncio.timeout(interval):
                await stop.wait()
        except TimeoutError:
            pass


GC_FREEZE_INTERVAL = 0.1
"""Seconds between moves of surviving objects out of the collector's reach: each pass walks
what this many seconds of calls left alive, so the pause grows with the interval while the
collector's CPU per call does not (docs/decisions.md)."""


GC_YOUNG_THRESHOLD = 50_000
"""Objects allocated (net of those freed) before an automatic young collection."""


def tune_gc() -> None:
    """Start the process with everything made so far out of the collector's reach, and make
    the automatic young collections rare.

    :func:`keep_gc_young` already walks every object made since its last pass; the automatic
    collections between its passes (every 700 allocations by default, ten a second at 100
    calls/s) walked the same objects once or twice more and freed almost nothing, since
    reference counting frees what the core drops. They stay as a bound for a burst that
    allocates more than ``GC_YOUNG_THRESHOLD`` objects before the next pass.
    """
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)


async def keep_gc_young(stop: asyncio.Event, interval: float = GC_FREEZE_INTERVAL) -> None:
    """Collect, then freeze, every ``interval``: no collection ever walks a large heap.

    Transactions must live 32 s (Timers D, J, L, M over UDP), so at a few hundred calls a
    second the heap holds hundreds of thousands of objects; a full collection of that took
    close to a second on a 2-core host, long enough for every caller to retransmit. The
    core is free of reference cycles (a test holds it to that), so reference counting frees
    what it drops. Each round collects what was allocated since the last one, then freezes
    the survivors, keeping every pass of the collector over at most ``interval`` worth of
    objects.
    """
    # One future per pass (batching.Pauses): ten passes a second made asyncio.timeout's
    # cancellation and exceptions around Event.wait() a cost of their own.
    with Pauses(stop) as pauses:
        while not stop.is_set():
            gc_pass()
            await pauses.sleep(interval)


def gc_pass() -> None:
    """One pass of :func:`keep_gc_young`: collect the young generations, then freeze.

    Every pass freezes what survives it, so the generations hold only what was allocated
    since the last pass (the oldest only what an automatic collection moved there in the
    meantime, which ``GC_YOUNG_THRESHOLD`` makes rare). A full collection walked the same
    few objects and also emptied the interpreter's free lists of floats, tuples, lists,
    dicts and frames, which the next calls then allocated again from the system allocator.
    """
    gc.collect(1)
    gc.freeze()


class _WorkerTag(logging.Filter):
    def __init__(self, slot: int) -> None:
        super().__init__()
        self.slot = slot

    def filter(self, record: logging.LogRecord) -> bool:
        record.worker = self.slot
        return True


def tag_worker_logs(slot: int) -> None:
    """Every line a worker logs names its slot: the workers share the supervisor's stderr.

    The JSON formatter sets the slot on each record itself; a handler with another formatter
    gets a filter that sets it.
    """
    for handler in logging.getLogger().handlers:
        formatter = handler.formatter
        if isinstance(formatter, logs.JsonFormatter):
            formatter.worker = slot
        else:
            handler.addFilter(_WorkerTag(slot))


def supervisor_lost(stop: asyncio.Event) -> None:
    """A worker's supervisor is gone: no datagram will reach it again, so it drains."""
    if not stop.is_set():
        log.error("supervisor lost: draining")
        stop.set()


async def run(
    config: Config,
    *,
    role: Role = Role.ALL,
    worker: WorkerSetup | None = None,
    supervision: Supervision | None = None,
) -> int:
    """Run until SIGTERM/SIGINT; a second signal skips the drain. Returns the exit code.

    ``worker``: this process is one edge worker of a supervisor (no HTTP listener; its
    readiness and metrics go over the control channel). ``supervision``: this process is the
    supervisor; the edge runs in its workers, and provisioning (``--role all``) here.
    """
    logs.configure(config.log.level)
    if worker is not None:
        tag_worker_logs(worker.slot)
    check_role(config, role)
    await check_schema(config, writer=role is not Role.EDGE and bool(config.provisioning.tokens))
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    force = asyncio.Event()
    edge_here = role in (Role.EDGE, Role.ALL) and supervision is None

    def on_signal(name: str) -> None:
        if stop.is_set():
            log.warning("second signal: stopping without waiting", extra={"signal": name})
            force.set()
        else:
            log.info("signal received: draining", extra={"signal": name})
            stop.set()

    # A worker shares the terminal's process group: Ctrl-C reaches it too, and the
    # supervisor's forwarded SIGTERM would then count as a second signal and cut the drain.
    signals = (signal.SIGTERM,) if worker is not None else (signal.SIGTERM, signal.SIGINT)
    if worker is not None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    for sig in signals:
        loop.add_signal_handler(sig, on_signal, sig.name)

    nofile = raise_nofile_limit()
    log.info("open-file limit", extra={"nofile": nofile})
    log.info("build", extra={"version": __version__, "build": build.describe()})
    metrics = Metrics()
    metrics.store_master_changes.set_function(lambda: float(master_changes()))
    store = build_store(config, mirror=edge_here)
    running: RunningEdge | None = None
    watch_stop = asyncio.Event()
    keeper_stop = asyncio.Event()
    recorder: CallRecorder | None = None
    keeper: CallRecordKeeper | None = None
    calls: CallStore | None = None
    source: RecordSource | None = None
    service: ProvisioningService | None = None
    coverage: CoverageMonitor | None = None
    notify = build_notify(
        config,
        edge=edge_here,
        on_dropped=notification_dropped(metrics),
    )
    provisioning = role in (Role.PROVISIONING, Role.ALL) and worker is None
    if provisioning and not config.provisioning.tokens:
        log.warning("provisioning API not started: [provisioning] tokens is empty")
        provisioning = False
    # The embedded box hands records over in-process, to its own provisioning side.
    handoff = (
        LocalHandoff(max_records=config.records.recorder.queue_size)
        if provisioning and role is Role.ALL
        else None
    )
    link: asyncio.Task[None] | None = None
    try:
        async with contextlib.AsyncExitStack() as stack:
            if edge_here:
                sink = record_sink(config, handoff)
                if sink is not None:
                    recorder = build_recorder(config, sink, metrics)
                elif config.records.enabled:
                    log.warning(
                        "emergency call records not kept: the memory:// store has no "
                        "provisioning in this process to hand them to"
                    )
                publisher = notify.publisher if notify is not None else None
                running = await start_edge(
                    config, store, metrics, recorder=recorder, notify=publisher, worker=worker
                )
            if provisioning:
                if config.bandwidth.run_emulator:
                    await start_emulator(config, stack)
                orders = OrderTracker(
                    max_failed=CoverageOptions().max_failed_orders,
                    on_forgotten=metrics.coverage_orders_forgotten.inc,
                )
                # Every save asks for fresh coverage figures.
                state = NotifyingStateStore(build_state(config), on_write=orders.changed)
                service = await stack.enter_async_context(
                    provisioning_service(config, store, metrics, orders=orders, state=state)
                )
                coverage = build_coverage(config, state, store, orders, metrics)
                if isinstance(store, MemoryStore):
                    # An in-memory line store starts empty (or from its seed file): rebuild the
                    # records of every provisioned line before the first call can need one.
                    report = await service.resync(who="startup")
                    log.info("line records rebuilt from provisioning state", extra=report.to_dict())
                source = record_source(config, handoff)
                if source is not None:
                    calls = build_calls(config)
                    keeper = CallRecordKeeper(
                        source=source,
                        store=calls,
                        metrics=metrics,
                        options=KeeperOptions(retention=config.records.retention_days * 86_400.0),
                        resolve_level=level_resolver(service),
                    )
                imports = await start_imports(config, service, metrics, stack)
                tokens = {token: name for name, token in config.provisioning.tokens.items()}
                prov = config.provisioning
                phost, pport = prov.listen
                await stack.enter_async_context(
                    serve_http(
                        build_provisioning_app(
                            service,
                            tokens=tokens,
                            calls=calls,
                            imports=imports,
                            coverage=coverage,
                        ),
                        phost,
                        pport,
                        tls=prov.tls,
                        section="provisioning",
                    )
                )
                log.info(
                    "provisioning API listening",
                    extra={
                        "listen": http_url(phost, pport, prov.tls),
                        "client_certificates": prov.tls is not None
                        and prov.tls.client_ca_file is not None,
                    },
                )

            def readiness() -> tuple[bool, dict[str, object]]:
                if running is not None:
                    return running.edge.readiness()
                draining = stop.is_set()
                return (not draining, {"status": "draining" if draining else "ready"})

            host, port = config.http.listen
            if supervision is not None:
                stack.push_async_callback(supervision.close)
                await supervision.start()
            if worker is not None:
                link = loop.create_task(
                    serve_worker_side(
                        socket.socket(fileno=worker.control_fd),
                        render=metrics.render,
                        readiness=readiness,
                        on_lost=functools.partial(supervisor_lost, stop),
                        on_live=(
                            functools.partial(running.hand_over, worker.slot)
                            if running is not None
                            else None
                        ),
                        on_adopt=running.edge.adopt if running is not None else None,
                    )
                )
            else:
                await stack.enter_async_context(
                    serve_http(
                        supervision.ops_app(metrics)
                        if supervision is not None
                        else build_ops_app(metrics=metrics, readiness=readiness),
                        host,
                        port,
                        tls=config.http.tls,
                        section="http",
                    )
                )
            tune_gc()
            log.info(
                "e911-sip running",
                extra={
                    "role": role.value,
                    "workers": config.sip.workers,
                    "http": http_url(host, port, config.http.tls),
                    "store": (
                        "memory"
                        if isinstance(store, MemoryStore)
                        else "redis, mirrored in memory"
                        if isinstance(store, MirroredRedisStore)
                        else "redis"
                    ),
                    "config": str(config.source) if config.source else "built-in defaults",
                },
            )
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(keep_gc_young(watch_stop))
                if isinstance(store, MirroredRedisStore):
                    # Keeps following Redis through the drain: answered 911 dialogs and
                    # late calls still read current records.
                    tasks.create_task(store.run(watch_stop))
                if running is not None:
                    tasks.create_task(running.edge.watch_store(watch_stop))
                    tasks.create_task(running.edge.monitor_load(watch_stop))
                else:
                    # Provisioning alone writes the same store: its health is this process's
                    # too, and e911_sip_store_up must not read 0 because no edge sets it.
                    tasks.create_task(watch_store_health(store, metrics, watch_stop))
                if notify is not None:
                    tasks.create_task(watch_notify_queues(notify, metrics, watch_stop))
                    if notify.publisher is not None:
                        tasks.create_task(notify.publisher.run(watch_stop))
                    # The notifier runs where provisioning state is; an edge alone on
                    # memory:// has no other process to read its queue.
                    if role is not Role.EDGE or isinstance(store, MemoryStore):
                        tasks.create_task(
                            run_notifier(config, notify, metrics, service, watch_stop)
                        )
                writing = tasks.create_task(recorder.run(watch_stop)) if recorder else None
                if keeper is not None:
                    tasks.create_task(keeper.run(keeper_stop))
                if coverage is not None:
                    tasks.create_task(coverage.run(watch_stop))
                await stop.wait()
                if running is not None:
                    await running.edge.drain(force)
                if supervision is not None:
                    await supervision.drain(force)
                watch_stop.set()
                if writing is not None:
                    # The records the edge finishes as it stops go to the keeper first.
                    await writing
                keeper_stop.set()
    finally:
        if link is not None:
            link.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await link
        if source is not None:
            await source.close()
        if calls is not None:
            await calls.close()
        if running is not None:
            running.edge.close()
            for transport in running.transports:
                await transport.close()
        await store.close()
        if notify is not None:
            await notify.close()
        for sig in signals:
            loop.remove_signal_handler(sig)
    log.info("e911-sip stopped")
    return 0


async def resync(config: Config) -> tuple[int, dict[str, object]]:
    """Rebuild every line record from provisioning state; (exit code, report)."""
    await check_schema(config, writer=True)
    store = build_store(config, mirror=False)
    try:
        async with provisioning_service(config, store, None) as service:
            report = await service.resync(who="cli")
    finally:
        await store.close()
    return (0 if report.ok else 1), report.to_dict()


async def export_calls(config: Config, query: CallQuery, each: Callable[[CallRecord], None]) -> int:
    """Page through the durable call records that match ``query``, oldest first, handing
    each to ``each``; how many.

    Raises:
        ConfigError: ``[records] store_url`` is memory:// (nothing outlives the process).
        CallStoreError: the store could not be read.
    """
    if config.records.store_url.startswith("memory://"):
        raise ConfigError(
            "[records] store_url: memory:// keeps records only inside the running process; "
            "export from file:// or redis://, or read GET /v1/calls"
        )
    calls = build_calls(config)
    count = 0
    try:
        while True:
            page = await calls.query(query)
            for record in page:
                each(record)
            count += len(page)
            if len(page) < query.limit:
                return count
            query = dataclasses.replace(query, after=page[-1].id)
    finally:
        await calls.close()
