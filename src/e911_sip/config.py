"""Configuration: a TOML file plus ``E911_SIP__SECTION__KEY`` environment overrides.

:func:`load` is the only reader of files and environment in the product besides the CLI; it
returns a frozen :class:`Config` or raises :class:`ConfigError` with a message naming the
key and the problem, so ``e911-sip check-config`` can tell an operator what to fix. Unknown
keys are errors too: a misspelt key silently ignored is how a 911 trunk goes missing.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import ssl
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from e911_sip.callrecords.recorder import RecorderOptions
from e911_sip.notify.dispatch import NotifierOptions
from e911_sip.notify.event import Targets
from e911_sip.policy.enrich import ExistingGeolocation
from e911_sip.provisioning.bandwidth import BandwidthOptions
from e911_sip.provisioning.imports import ImportOptions
from e911_sip.provisioning.lease import LeaseOptions
from e911_sip.proxy.trunks import ProbeOptions
from e911_sip.proxy.trust import LOOPBACK_SOURCES, IPNetwork
from e911_sip.sip.errors import SipError
from e911_sip.sip.uri import parse_uri
from e911_sip.store.breaker import BreakerOptions
from e911_sip.store.sentinel import check_redis_url
from e911_sip.transport.limits import StreamLimits

ENV_PREFIX = "E911_SIP__"
TRANSPORTS = ("udp", "tcp", "tls")

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

_O = TypeVar("_O", bound="DataclassInstance")


class ConfigError(ValueError):
    """The configuration cannot be used; the message names the key and the problem."""


@dataclass(frozen=True, slots=True)
class ListenAddress:
    """``transport:host:port`` for a SIP listener."""

    transport: str
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.transport}:{host}:{self.port}"


@dataclass(frozen=True, slots=True, kw_only=True)
class SipConfig:
    """[sip]: listeners and protocol limits."""

    listen: tuple[ListenAddress, ...] = (
        ListenAddress("udp", "127.0.0.1", 5070),
        ListenAddress("tcp", "127.0.0.1", 5070),
    )
    """Where SIP is received, as ``udp:HOST:PORT`` / ``tcp:HOST:PORT`` / ``tls:HOST:PORT``."""
    advertise: str | None = None
    """Address written in Via and Record-Route; required when listening on 0.0.0.0."""
    max_message_size: int = 65535
    """Largest SIP message accepted, in bytes (larger ones get 513 or are dropped)."""
    max_headers: int = 256
    """Most header fields accepted in one message."""
    t1: float = 0.5
    """RFC 3261 T1 (RTT estimate), seconds."""
    t2: float = 4.0
    """RFC 3261 T2 (maximum retransmit interval), seconds."""
    t4: float = 5.0
    """RFC 3261 T4 (maximum time a message stays in the network), seconds."""
    timer_c: float = 185.0
    """RFC 3261 Timer C for proxied INVITEs, seconds; must exceed 180."""
    tcp_connect_timeout: float = 2.0
    """Seconds to open an outbound TCP connection before it counts as a transport error."""
    workers: int = 1
    """Edge worker processes behind the one UDP address (``"auto"`` in the file: one per
    CPU). 1 runs the edge in the ``serve`` process itself; more start a supervisor that
    hands each UDP datagram to a worker by its Call-ID (TCP and TLS are served by worker 0)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class TlsConfig:
    """[tls]: certificates for ``tls:`` listeners and ``;transport=tls`` trunks."""

    certificate: Path | None = None
    """PEM certificate chain this edge presents (required for a tls listener)."""
    private_key: Path | None = None
    """PEM private key of ``certificate``."""
    ca_file: Path | None = None
    """PEM CA certificates peers are verified against; unset trusts the system CAs for
    trunks and is an error while ``verify_client`` is true."""
    verify_client: bool = True
    """Inbound TLS requires a client certificate that verifies against ``ca_file`` (mutual
    TLS between the softswitch and the edge, RFC 3261 §26.3.2.2); false accepts clients
    without one (a certificate that is presented is still verified)."""
    minimum_version: str = "1.2"
    """Oldest TLS version accepted: ``1.2`` or ``1.3``."""
    server_name: str | None = None
    """Name TLS trunks' certificates must carry; unset verifies each trunk's IP address
    against its certificate's IP SANs."""


@dataclass(frozen=True, slots=True, kw_only=True)
class EmergencyConfig:
    """[emergency]: what counts as an emergency call and where it goes."""

    numbers: tuple[str, ...] = ("911", "933")
    """Dialled strings that make an initial INVITE an emergency call."""
    trunks: tuple[str, ...] = ("sip:127.0.0.1:5080", "sip:127.0.0.1:5081")
    """Bandwidth emergency trunks as SIP URIs with IP hosts, tried in order."""
    geolocation_base_url: str = "https://emergency.bandwidth.com/locations/"
    """Prefix of the Geolocation reference; ``provider_endpoint`` is appended."""
    existing_geolocation: ExistingGeolocation = ExistingGeolocation.REMOVE
    """A Geolocation that arrives with the call: ``remove`` (default: never passed on, ours
    added when the line has a record), or, for devices that send their own location (RFC
    6442 UA-provided location), ``replace`` (ours replaces it when we have one), ``keep``
    (ours is not added) or ``append`` (ours goes last)."""
    pai_domain: str | None = None
    """Host of the P-Asserted-Identity URI; unset takes the From URI's host."""
    provisional_timeout: float = 2.0
    """Seconds a trunk has to send a provisional response before the next one is tried."""
    lookup_timeout: float = 0.05
    """Seconds one location lookup may take before the cache, then no location, is used."""
    fail_open_after: float = 0.5
    """Seconds after which an emergency INVITE goes out unenriched whatever is pending."""
    trying_after: float = 0.1
    """Seconds an emergency INVITE's 100 Trying waits for the enriched INVITE to leave first;
    a slower lookup has it sent at this deadline (RFC 3261 §17.2.1: within 200 ms)."""
    cache_size: int = 100_000
    """Lines whose last record is kept for use while the store is down."""
    cache_max_age: float = 86_400.0
    """Seconds a cached record stays usable."""
    breaker: BreakerOptions = field(default_factory=BreakerOptions)
    """The store's circuit breaker, from the keys ``store_cooldown`` (``open_for``),
    ``store_failure_ratio``, ``store_failure_window``, ``store_min_lookups``,
    ``store_connect_failures`` and ``store_trial_lookups``."""
    probe: ProbeOptions = field(default_factory=lambda: ProbeOptions(interval=10.0))
    """OPTIONS probing of the trunks: ``probe_interval`` (0 turns it off),
    ``probe_timeout``, ``probe_failures``, ``probe_successes``."""
    tls_fallback: str = "udp"
    """RFC 6881: if TLS to an emergency trunk fails, retry without TLS. Each ``;transport=tls``
    trunk gets a twin on the same host over ``udp`` or ``tcp`` at ``tls_fallback_port``,
    tried after every configured trunk; ``none`` adds none."""
    tls_fallback_port: int = 5060
    """Port of those twins."""

    def fallback_trunks(self) -> tuple[str, ...]:
        """The non-TLS twins of the TLS trunks, in the trunks' order (none when off)."""
        if self.tls_fallback == "none":
            return ()
        suffix = ";transport=tcp" if self.tls_fallback == "tcp" else ""
        out: list[str] = []
        for trunk in self.trunks:
            uri = parse_uri(trunk)
            if uri.transport == "tls":
                host = f"[{uri.host}]" if ":" in uri.host else uri.host
                twin = f"sip:{host}:{self.tls_fallback_port}{suffix}"
                if twin not in self.trunks and twin not in out:
                    out.append(twin)
        return tuple(out)


@dataclass(frozen=True, slots=True, kw_only=True)
class DefaultRouteConfig:
    """[default]: where every non-emergency initial request goes."""

    trunks: tuple[str, ...] = ("sip:127.0.0.1:5090",)
    """SIP URIs tried in order."""
    probe: ProbeOptions = field(default_factory=lambda: ProbeOptions(interval=10.0))
    """OPTIONS probing of these trunks; the same four ``probe_*`` keys as [emergency]."""


@dataclass(frozen=True, slots=True, kw_only=True)
class StoreConfig:
    """[store]: the location store the edge reads."""

    url: str = "memory://"
    """``memory://`` (embedded, optionally seeded), ``redis://host:port/db`` (``rediss://``,
    ``unix://``) or ``redis+sentinel://h1:p1,h2:p2,h3:p3/SERVICE[/DB]`` (the master Redis
    Sentinel names; see docs/operations.md, "Redis Sentinel")."""
    seed_file: Path | None = None
    """JSON file of line records loaded into the memory store at start."""
    key_prefix: str = "e911:line:"
    """Prefix of the per-line hash keys in Redis."""
    socket_timeout: float = 1.0
    mirror: bool = True
    """With ``redis://``: hold every line record in memory, kept current from Redis (a lookup
    is a dictionary read; Redis being slow or down costs calls nothing). False looks each
    emergency caller up in Redis, bounded by ``[emergency] lookup_timeout``."""
    """Redis socket timeout, seconds (lookups are bounded separately)."""
    pool_size: int = 8
    """Redis connections carrying lookups (each carries a pipelined batch at a time)."""
    pool_timeout: float | None = None
    """Seconds a lookup may wait for a free connection; unset: its whole bound
    (``[emergency] lookup_timeout``)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class HttpsConfig:
    """HTTPS for one HTTP listener: the PEM files its server TLS context is built from.

    Read from the keys ``tls_cert_file``, ``tls_key_file`` and ``tls_client_ca_file`` of the
    listener's section; :func:`server_tls_context` turns it into an ``ssl.SSLContext``.
    """

    cert_file: Path
    """The certificate the server presents, then any intermediates (PEM)."""
    key_file: Path
    """The certificate's private key (PEM, not encrypted)."""
    client_ca_file: Path | None = None
    """CA certificates (PEM); when set, a client must present a certificate one of them
    signed (mutual TLS)."""


_HTTPS_KEYS = frozenset({"tls_cert_file", "tls_key_file", "tls_client_ca_file", "allow_plaintext"})
"""The keys every HTTP listener's section takes for HTTPS or plain HTTP (see :func:`_tls`)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class HttpConfig:
    """[http]: metrics and health endpoints."""

    listen: tuple[str, int] = ("127.0.0.1", 9100)
    """``HOST:PORT`` for /metrics, /healthz and /readyz."""
    tls: HttpsConfig | None = None
    """HTTPS (keys ``tls_cert_file``, ``tls_key_file``, ``tls_client_ca_file``); None: plain
    HTTP, allowed on a loopback address or with ``allow_plaintext``."""
    allow_plaintext: bool = False
    """Serve plain HTTP on a non-loopback address (otherwise a configuration error)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class LogConfig:
    """[log]: structured logging."""

    level: str = "INFO"
    """DEBUG, INFO, WARNING, ERROR or CRITICAL."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ShutdownConfig:
    """[shutdown]: draining on SIGTERM."""

    drain_timeout: float = 30.0
    """Seconds to wait for emergency calls being set up (lookups, INVITEs with no final
    response yet)."""
    emergency_drain_timeout: float = 7200.0
    """Seconds to keep routing for emergency dialogs that are still up."""
    min_drain_time: float = 0.0
    """Seconds a drain lasts at least, answering OPTIONS 503, even with no call to wait for:
    at least the softswitch's keepalive interval when several hosts share the traffic."""
    dialog_drain_timeout: float = 600.0
    """Seconds to keep routing for other answered calls that are still up (0: not waited
    for, their BYE is lost with the process)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ProvisioningConfig:
    """[provisioning]: the provisioning API."""

    listen: tuple[str, int] = ("127.0.0.1", 9200)
    """``HOST:PORT`` of the provisioning REST API."""
    tls: HttpsConfig | None = None
    """HTTPS (keys ``tls_cert_file``, ``tls_key_file``, ``tls_client_ca_file``); None: plain
    HTTP, allowed on a loopback address or with ``allow_plaintext``."""
    allow_plaintext: bool = False
    """Serve plain HTTP, bearer tokens and addresses included, on a non-loopback address
    (otherwise a configuration error)."""
    tokens: Mapping[str, str] = field(default_factory=dict)
    """Bearer tokens as ``name = "token"``; the name is recorded in the audit trail."""
    state_url: str = "memory://"
    """Where entities live: ``memory://``, ``file:///path/state.json`` or ``redis://...``."""
    audit_url: str = "memory://"
    """Audit trail: ``memory://``, ``file:///path/audit.jsonl`` or ``redis://...``."""
    key_prefix: str = "e911:prov:"
    """Prefix of provisioning state keys in Redis."""
    audit_stream: str = "e911:audit"
    """Redis stream holding the audit trail."""
    imports: ImportOptions = field(default_factory=ImportOptions)
    """Bulk imports: every field of :class:`~e911_sip.provisioning.imports.ImportOptions`
    (``import_concurrency``, ``import_batch_size``, ...) is a key of this section."""
    coverage_alert_below: float = 0.99
    """Share of lines with a location (0 to 1) below which ``E911CoverageLow`` fires;
    exported as ``e911_sip_coverage_alert_below``. 0 turns the alert off."""
    coverage_interval: float = 60.0
    """Seconds between recomputations of the coverage gauges when nothing is written
    (writes recompute them within two seconds)."""
    leases: LeaseOptions = field(default_factory=LeaseOptions)
    """Leases of customers and import jobs in Redis (keys ``lease_ttl``, ``lease_wait``):
    how long one lives unrenewed, and how long a change waits for one another process
    holds."""


@dataclass(frozen=True, slots=True, kw_only=True)
class OverloadConfig:
    """[overload]: admission control. Emergency INVITEs are never refused by any of it."""

    max_lag: float = 0.1
    """Seconds of event-loop lag above which new non-emergency requests get 503."""
    max_queue_delay: float = 0.1
    """Seconds a datagram waited in the receive queue (from its read to its turn) above which
    a new non-emergency request gets 503: the queue's delay, whatever the call rate."""
    queue_delay_sustain: float = 0.05
    """Seconds the new work served must keep waiting more than ``max_queue_delay``, without
    a break, before requests are refused for it: a moment without the core (a busy host, a
    collector pass) is caught up within milliseconds and refuses nothing."""
    max_queue: int = 5_000
    """Datagrams waiting to be processed above which new non-emergency requests get 503: a
    backstop behind ``max_queue_delay`` (a burst of a few hundred is milliseconds of work)."""
    queue_limit: int = 10_000
    """Datagrams waiting at most; beyond, the least urgent are dropped unread."""
    batch: int = 32
    """Datagrams processed per turn of the event loop (emergency INVITEs first)."""
    lag_interval: float = 0.05
    """Seconds between event-loop lag measurements."""
    shed_transactions: int = 100_000
    """Working transactions (still waiting for their final response) above which new
    non-emergency initial requests get 503; finished ones, which only absorb
    retransmissions, do not count."""
    max_transactions: int = 150_000
    """Transactions kept at most, finished ones included (about 2.5 KB each): at the bound a
    new request takes the place of the oldest finished ones; with none finished, every new
    request but an emergency INVITE or a BYE gets 503, and those evict the oldest
    non-emergency state."""
    max_contexts: int = 50_000
    """Requests being proxied at most; at the bound, as for ``max_transactions``."""
    retry_after: int = 5
    """Seconds in the Retry-After header of those 503 responses."""


@dataclass(frozen=True, slots=True, kw_only=True)
class RecordsConfig:
    """[records]: one record per emergency call (RAY BAUM's Act), kept by provisioning."""

    enabled: bool = True
    """Build and keep call records."""
    store_url: str = "memory://"
    """Where provisioning keeps them: ``memory://``, ``file:///path/calls.jsonl`` or
    ``redis://...``."""
    key_prefix: str = "e911:calls:"
    """Prefix of the call record keys in Redis."""
    retention_days: float = 1826.0
    """Days a record is kept after its call (default five years)."""
    stream: str = "e911:calls"
    """Redis stream (on ``[store] url``) from the edges to provisioning; unused by the
    embedded box (``memory://`` store), which hands records over in-process."""
    stream_maxlen: int = 100_000
    """Approximate bound of that stream while provisioning does not consume it."""
    group: str = "provisioning"
    """Consumer group provisioning reads the stream with."""
    consumer: str = "provisioning"
    """Consumer name within the group (keep it stable: unacknowledged records are read
    again by the same name after a restart)."""
    recorder: RecorderOptions = field(default_factory=RecorderOptions)
    """The edge's call recorder, from the keys ``max_in_progress`` (``book.max_calls``:
    emergency calls with a record in progress; beyond it the oldest is finished early,
    ``end`` = ``capacity``), ``max_age`` (``book.max_age``: seconds after its INVITE at which
    a call with no BYE seen is recorded as it is) and ``queue_size`` (finished records an
    edge holds while they cannot be written; beyond it they are dropped and counted)."""


def _emulator_client() -> BandwidthOptions:
    return BandwidthOptions(
        account_id="5555555",
        client_id="e911-sip-emulator",
        client_secret="emulator-secret",
        api_base="http://127.0.0.1:9300/api/v2",
        token_url="http://127.0.0.1:9300/api/v1/oauth2/token",
        messaging_base="http://127.0.0.1:9300/api/v2",
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class BandwidthConfig:
    """[bandwidth]: the Bandwidth v2 emergency API (or the bundled emulator).

    Every field of :class:`~e911_sip.provisioning.bandwidth.BandwidthOptions` is a key of the
    section (``account_id``, ``client_id``, ``client_secret``, ``api_base``, ``token_url``,
    ``region``, ``request_timeout``, ``max_attempts``, ``max_retry_time``, ``order_timeout``,
    ...); the defaults point at the bundled emulator on 127.0.0.1:9300. Production uses
    ``https://api.bandwidth.com/api/v2`` and ``https://api.bandwidth.com/api/v1/oauth2/token``
    with the secret in E911_SIP__BANDWIDTH__CLIENT_SECRET.
    """

    client: BandwidthOptions = field(default_factory=_emulator_client)
    """The Bandwidth client's options."""
    run_emulator: bool = False
    """Serve the bundled Bandwidth emulator in-process at ``api_base``'s host and port, with
    ``client_id``/``client_secret``/``account_id`` as its only credentials (first tries and
    demos; never in production)."""


class UntrustedAction(StrEnum):
    """What the edge does with a request it will not relay."""

    DROP = "drop"
    """Nothing goes back: a spoofed source gets no reflection."""
    REJECT = "reject"
    """A stateless 403 Forbidden to the address it came from."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SecurityConfig:
    """[security]: the trust domain (RFC 3325) and what happens outside it."""

    trusted_sources: tuple[IPNetwork, ...] = LOOPBACK_SOURCES
    """CIDRs of the softswitch: the only sources whose initial requests (911 included) are
    relayed, and whose P-Asserted-Identity, Privacy and Geolocation are believed."""
    untrusted: UntrustedAction = UntrustedAction.DROP
    """``drop`` or ``reject`` (403) requests from outside the trust domain."""
    max_trunk_dialogs: int = 100_000
    """Dialogs a trunk answered in which it may send requests (bounded table)."""
    trunk_dialog_max_age: float = 14_400.0
    """Seconds without a message after which such a dialog is forgotten."""
    dialog_key_file: Path | None = None
    """A file holding the secret behind our branches, tags and Record-Route stamps, so the
    edge recognises its own calls after a restart (a trunk's BYE, a late 2xx). Unset: a
    key per start, shared by that start's workers."""
    dialog_key: bytes | None = field(default=None, repr=False)
    """The secret read from ``dialog_key_file``."""


class StartTls(StrEnum):
    """STARTTLS on ``smtp://``."""

    AUTO = "auto"
    """Use it when the server offers it."""
    ALWAYS = "always"
    """Refuse to send without it."""
    NEVER = "never"
    """Plain SMTP (a relay on loopback)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class NotifyConfig:
    """[notify]: Kari's Law notifications (webhook, email, SMS) for emergency calls."""

    enabled: bool = True
    """Queue a notification for every emergency call whose number is in ``numbers``."""
    numbers: tuple[str, ...] = ("911",)
    """Dialled numbers that notify (``933`` test calls do not unless listed)."""
    delivery: NotifierOptions = field(default_factory=NotifierOptions)
    """The notifier's fallback targets and retries, from the keys ``webhook_urls``,
    ``emails`` and ``sms`` (``fallback``: for lines with no contacts, and unknown callers),
    ``always`` (``fallback_always``: notify them of every call, a CSP's operations centre,
    in addition to the line's own contacts), ``max_attempts``, ``retry_for``,
    ``backoff_base`` and ``backoff_cap``."""
    webhook_secret: str | None = None
    """HMAC-SHA256 key for ``X-E911-Signature`` (set it in E911_SIP__NOTIFY__WEBHOOK_SECRET)."""
    webhook_timeout: float = 5.0
    """Seconds one webhook POST may take."""
    smtp_url: str | None = None
    """``smtp://host[:port]`` or ``smtps://host[:port]``; unset: no email channel."""
    smtp_username: str | None = None
    """SMTP AUTH user (E911_SIP__NOTIFY__SMTP_USERNAME)."""
    smtp_password: str | None = None
    """SMTP AUTH password (E911_SIP__NOTIFY__SMTP_PASSWORD); never logged."""
    smtp_starttls: StartTls = StartTls.AUTO
    """``auto``, ``always`` or ``never`` STARTTLS on ``smtp://``."""
    smtp_timeout: float = 10.0
    """Seconds one SMTP session may take."""
    smtp_ca_file: Path | None = None
    """PEM CA certificates that sign the SMTP server's certificate (default: the system's)."""
    email_from: str = "e911-sip@localhost"
    """From address of notification emails."""
    sms_from: str | None = None
    """Sending number (E.164) at Bandwidth; unset: no SMS channel."""
    sms_application_id: str = ""
    """Bandwidth messaging application id."""
    sms_rate: float = 1.0
    """Messages a second: the Bandwidth account's dequeue rate (default 1 MPS)."""
    queue_file: Path | None = None
    """Journal of the notification queue when the store is ``memory://`` (unset: held in
    memory only, lost on restart)."""
    key_prefix: str = "e911:notify:"
    """Prefix of the notification streams and dead-letter list in Redis."""
    consumer: str = "notifier"
    """This notifier's name in the Redis consumer group. It must survive restarts (what a
    consumer took and did not finish is re-read under the same name) and differ between
    notifiers that run at the same time."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    """The whole configuration."""

    sip: SipConfig = field(default_factory=SipConfig)
    tcp: StreamLimits = field(default_factory=StreamLimits)
    """[tcp]: bounds on stream (TCP and TLS) connections, shared by every stream listener;
    every field but ``log_interval`` is a key."""
    tls: TlsConfig = field(default_factory=TlsConfig)
    emergency: EmergencyConfig = field(default_factory=EmergencyConfig)
    default: DefaultRouteConfig = field(default_factory=DefaultRouteConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    log: LogConfig = field(default_factory=LogConfig)
    shutdown: ShutdownConfig = field(default_factory=ShutdownConfig)
    provisioning: ProvisioningConfig = field(default_factory=ProvisioningConfig)
    bandwidth: BandwidthConfig = field(default_factory=BandwidthConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    overload: OverloadConfig = field(default_factory=OverloadConfig)
    records: RecordsConfig = field(default_factory=RecordsConfig)
    notify: NotifyConfig = field(default_factory=NotifyConfig)
    source: Path | None = None
    """The file this came from, None for the built-in defaults."""


# -- reading -------------------------------------------------------------------------------


class _Section:
    """Typed reads from one TOML table, each error naming ``[section] key``."""

    def __init__(self, name: str, data: Mapping[str, Any], known: set[str]) -> None:
        self.name = name
        self.data = data
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(
                f"[{name}] {unknown[0]}: unknown key (known keys: {', '.join(sorted(known))})"
            )

    def where(self, key: str) -> str:
        return f"[{self.name}] {key}"

    def get(self, key: str, default: Any) -> Any:
        return self.data.get(key, default)

    def number(self, key: str, default: float, *, minimum: float = 0.0) -> float:
        value = self.data.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{self.where(key)}: expected a number, got {value!r}")
        if value < minimum:
            raise ConfigError(f"{self.where(key)}: must be at least {minimum}, got {value}")
        return float(value)

    def integer(self, key: str, default: int, *, minimum: int = 0) -> int:
        value = self.data.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{self.where(key)}: expected an integer, got {value!r}")
        if value < minimum:
            raise ConfigError(f"{self.where(key)}: must be at least {minimum}, got {value}")
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self.data.get(key, default)
        if not isinstance(value, bool):
            raise ConfigError(f"{self.where(key)}: expected true or false, got {value!r}")
        return value

    def string(self, key: str, default: str) -> str:
        value = self.data.get(key, default)
        if not isinstance(value, str):
            raise ConfigError(f"{self.where(key)}: expected a string, got {value!r}")
        return value

    def optional_string(self, key: str) -> str | None:
        value = self.data.get(key)
        if value is None or value == "":
            return None
        if not isinstance(value, str):
            raise ConfigError(f"{self.where(key)}: expected a string, got {value!r}")
        return value

    def strings(self, key: str, default: tuple[str, ...]) -> tuple[str, ...]:
        value = self.data.get(key, list(default))
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{self.where(key)}: expected a list of strings, got {value!r}")
        return tuple(value)


def _fields(cls: Any) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _own_keys(cls: Any, *, but: frozenset[str] = frozenset()) -> dict[str, str]:
    """Each field of ``cls`` (in declaration order, so errors come in a stable order) as the
    key of its own name."""
    return {f.name: f.name for f in dataclasses.fields(cls) if f.name not in but}


def _options(
    s: _Section,
    default: _O,
    *,
    keys: Mapping[str, str],
    minimums: Mapping[str, float] | None = None,
    int_minimum: int = 0,
) -> _O:
    """``default`` (a layer's frozen options dataclass) with the fields ``keys`` names read
    from the section, each as its default's type (bool, int, float or str).

    ``keys`` maps a field to its key (most keep the field's name); ``minimums`` bounds
    numbers, ``int_minimum`` any integer it does not name. Errors name ``[section] key``.
    """
    values: dict[str, Any] = {}
    for name, key in keys.items():
        current = getattr(default, name)
        minimum = (minimums or {}).get(name)
        if isinstance(current, bool):
            values[name] = s.boolean(key, current)
        elif isinstance(current, int):
            values[name] = s.integer(
                key, current, minimum=int_minimum if minimum is None else int(minimum)
            )
        elif isinstance(current, float):
            values[name] = s.number(key, current, minimum=0.0 if minimum is None else minimum)
        elif isinstance(current, str):
            values[name] = s.string(key, current)
        else:
            raise TypeError(f"{s.where(key)}: no reader for a {type(current).__name__}")
    return dataclasses.replace(default, **values)


def _hostport(text: str, where: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{where}: expected HOST:PORT, got {text!r}")
    return host, int(port)


def _listen(text: str, where: str) -> ListenAddress:
    transport, sep, rest = text.partition(":")
    transport = transport.lower()
    if not sep or transport not in TRANSPORTS:
        raise ConfigError(
            f"{where}: expected TRANSPORT:HOST:PORT with TRANSPORT one of "
            f"{', '.join(TRANSPORTS)}, got {text!r}"
        )
    host, port = _hostport(rest, where)
    return ListenAddress(transport, host, port)


def _trunk(text: str, where: str) -> str:
    try:
        uri = parse_uri(text)
    except SipError as exc:
        raise ConfigError(f"{where}: {text!r} is not a SIP URI ({exc})") from exc
    if uri.scheme != "sip":
        raise ConfigError(f"{where}: {text!r} must be a sip: URI")
    try:
        ipaddress.ip_address(uri.host)
    except ValueError:
        # Bandwidth authenticates trunks by static IP, and a DNS lookup on the call path
        # could stall a 911 call; trunks are configured by address.
        raise ConfigError(f"{where}: {text!r} must name an IP address, not a host name") from None
    if uri.transport not in TRANSPORTS:
        raise ConfigError(f"{where}: {text!r}: transport must be udp, tcp or tls")
    return text


def _sip(data: Mapping[str, Any]) -> SipConfig:
    s = _Section("sip", data, _fields(SipConfig))
    d = SipConfig()
    listen = tuple(
        _listen(item, s.where("listen"))
        for item in s.strings("listen", tuple(str(a) for a in d.listen))
    )
    if not listen:
        raise ConfigError("[sip] listen: at least one listener is required")
    if len({a.transport for a in listen}) != len(listen):
        raise ConfigError("[sip] listen: one listener per transport")
    advertise = s.optional_string("advertise")
    if advertise is None and any(a.host in ("0.0.0.0", "::") for a in listen):
        raise ConfigError(
            "[sip] advertise: required when listening on a wildcard address "
            "(set the IP peers should send to)"
        )
    workers = _workers(s)
    if workers > 1 and not any(a.transport == "udp" for a in listen):
        raise ConfigError(
            "[sip] workers: more than one worker needs a udp listener in [sip] listen (the "
            "supervisor hands its datagrams to the workers; tcp and tls are served by worker 0)"
        )
    timer_c = s.number("timer_c", d.timer_c)
    if timer_c <= 180:
        raise ConfigError(f"[sip] timer_c: must exceed 180 s (RFC 3261 §16.6), got {timer_c}")
    return SipConfig(
        listen=listen,
        advertise=advertise,
        max_message_size=s.integer("max_message_size", d.max_message_size, minimum=1024),
        max_headers=s.integer("max_headers", d.max_headers, minimum=16),
        t1=s.number("t1", d.t1, minimum=0.001),
        t2=s.number("t2", d.t2, minimum=0.001),
        t4=s.number("t4", d.t4, minimum=0.001),
        timer_c=timer_c,
        tcp_connect_timeout=s.number("tcp_connect_timeout", d.tcp_connect_timeout, minimum=0.01),
        workers=workers,
    )


MAX_WORKERS = 256
"""More edge workers than this is a typo, not a host."""


def _workers(s: _Section) -> int:
    """``[sip] workers``: a count, or ``"auto"`` for one per CPU the host reports."""
    value = s.get("workers", 1)
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "auto":
            return max(1, min(os.cpu_count() or 1, MAX_WORKERS))
        if not text.isdigit():
            raise ConfigError(f'[sip] workers: expected a number or "auto", got {value!r}')
        value = int(text)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f'[sip] workers: expected a number or "auto", got {value!r}')
    if not 1 <= value <= MAX_WORKERS:
        raise ConfigError(f"[sip] workers: must be 1 to {MAX_WORKERS}, got {value}")
    return value


_PROBE_KEYS = {"probe_interval", "probe_timeout", "probe_failures", "probe_successes"}


_TCP_KEYS = _own_keys(StreamLimits, but=frozenset({"log_interval"}))
_TCP_MINIMUMS: Mapping[str, float] = {
    "max_connections": 1,
    "max_connections_per_ip": 1,
    "idle_timeout": 0.1,
    "header_timeout": 0.1,
    "max_buffer": 1024,
    "max_write_buffer": 1024,
    "max_outbound": 1,
    "max_queued": 1,
}


def _tcp(data: Mapping[str, Any]) -> StreamLimits:
    s = _Section("tcp", data, set(_TCP_KEYS))
    limits = _options(s, StreamLimits(), keys=_TCP_KEYS, minimums=_TCP_MINIMUMS)
    if limits.trusted_reserve >= limits.max_connections:
        raise ConfigError(
            f"[tcp] trusted_reserve: must be below max_connections ({limits.max_connections}), "
            f"got {limits.trusted_reserve}"
        )
    return limits


def _tls(data: Mapping[str, Any], base: Path | None) -> TlsConfig:
    s = _Section("tls", data, _fields(TlsConfig))
    d = TlsConfig()
    certificate = _file(s, "certificate", base)
    private_key = _file(s, "private_key", base)
    if (certificate is None) != (private_key is None):
        raise ConfigError("[tls] private_key: certificate and private_key go together")
    version = s.string("minimum_version", d.minimum_version)
    if version not in ("1.2", "1.3"):
        raise ConfigError(f'[tls] minimum_version: expected "1.2" or "1.3", got {version!r}')
    return TlsConfig(
        certificate=certificate,
        private_key=private_key,
        ca_file=_file(s, "ca_file", base),
        verify_client=s.boolean("verify_client", d.verify_client),
        minimum_version=version,
        server_name=s.optional_string("server_name"),
    )


def _check_tls(config: Config) -> None:
    """A TLS listener or trunk needs the [tls] settings it uses."""
    tls = config.tls
    listens = any(a.transport == "tls" for a in config.sip.listen)
    trunks = [
        t
        for t in (*config.emergency.trunks, *config.default.trunks)
        if parse_uri(t).transport == "tls"
    ]
    if trunks and not listens:
        raise ConfigError(
            f"[sip] listen: trunk {trunks[0]!r} uses TLS; add a tls:HOST:PORT listener "
            "(its Via and Record-Route name it)"
        )
    fallback = config.emergency.fallback_trunks()
    if fallback and not any(
        a.transport == config.emergency.tls_fallback for a in config.sip.listen
    ):
        raise ConfigError(
            f"[emergency] tls_fallback: {config.emergency.tls_fallback} needs a "
            f"{config.emergency.tls_fallback}:HOST:PORT listener in [sip] listen (or set none)"
        )
    if listens and tls.certificate is None:
        raise ConfigError("[tls] certificate: required for a tls listener")
    if listens and tls.verify_client and tls.ca_file is None:
        raise ConfigError(
            "[tls] ca_file: required to verify client certificates (or set verify_client = false)"
        )


_BREAKER_KEYS: Mapping[str, str] = {
    "failure_ratio": "store_failure_ratio",
    "window": "store_failure_window",
    "min_lookups": "store_min_lookups",
    "connect_failures": "store_connect_failures",
    "open_for": "store_cooldown",
    "trial_lookups": "store_trial_lookups",
}
"""[emergency] key of each BreakerOptions field."""
_BREAKER_MINIMUMS: Mapping[str, float] = {
    "window": 0.01,
    "min_lookups": 1,
    "connect_failures": 1,
    "trial_lookups": 1,
}


def _emergency(data: Mapping[str, Any]) -> EmergencyConfig:
    s = _Section(
        "emergency",
        data,
        _fields(EmergencyConfig) - {"probe", "breaker"} | _PROBE_KEYS | set(_BREAKER_KEYS.values()),
    )
    d = EmergencyConfig()
    numbers = s.strings("numbers", d.numbers)
    if not numbers or not all(n.isdigit() for n in numbers):
        raise ConfigError(f"[emergency] numbers: expected a list of digit strings, got {numbers}")
    trunks = tuple(_trunk(t, s.where("trunks")) for t in s.strings("trunks", d.trunks))
    if not trunks:
        raise ConfigError("[emergency] trunks: at least one emergency trunk is required")
    base = s.string("geolocation_base_url", d.geolocation_base_url)
    if not base.startswith(("https://", "http://")) or not base.endswith("/"):
        raise ConfigError(
            f"[emergency] geolocation_base_url: expected an http(s) URL ending in '/', got {base!r}"
        )
    policy = s.string("existing_geolocation", d.existing_geolocation.value)
    try:
        existing = ExistingGeolocation(policy)
    except ValueError:
        choices = ", ".join(p.value for p in ExistingGeolocation)
        raise ConfigError(
            f"[emergency] existing_geolocation: expected one of {choices}, got {policy!r}"
        ) from None
    fallback = s.string("tls_fallback", d.tls_fallback)
    if fallback not in ("udp", "tcp", "none"):
        raise ConfigError(f"[emergency] tls_fallback: expected udp, tcp or none, got {fallback!r}")
    port = s.integer("tls_fallback_port", d.tls_fallback_port, minimum=1)
    if port > 65535:
        raise ConfigError(f"[emergency] tls_fallback_port: expected a port number, got {port}")
    breaker = _options(s, d.breaker, keys=_BREAKER_KEYS, minimums=_BREAKER_MINIMUMS)
    if not 0.0 < breaker.failure_ratio <= 1.0:
        raise ConfigError(
            f"[emergency] store_failure_ratio: expected a share above 0 and at most 1, "
            f"got {breaker.failure_ratio}"
        )
    trying_after = s.number("trying_after", d.trying_after, minimum=0.0)
    if trying_after > 0.2:
        raise ConfigError(
            f"{s.where('trying_after')}: at most 0.2 (RFC 3261 §17.2.1 asks for a 100 Trying "
            f"within 200 ms), got {trying_after}"
        )
    return EmergencyConfig(
        numbers=numbers,
        trunks=trunks,
        geolocation_base_url=base,
        existing_geolocation=existing,
        pai_domain=s.optional_string("pai_domain"),
        provisional_timeout=s.number("provisional_timeout", d.provisional_timeout, minimum=0.05),
        lookup_timeout=s.number("lookup_timeout", d.lookup_timeout, minimum=0.001),
        fail_open_after=s.number("fail_open_after", d.fail_open_after, minimum=0.01),
        trying_after=trying_after,
        cache_size=s.integer("cache_size", d.cache_size),
        cache_max_age=s.number("cache_max_age", d.cache_max_age),
        breaker=breaker,
        probe=_probe(s, d.probe),
        tls_fallback=fallback,
        tls_fallback_port=port,
    )


def _default(data: Mapping[str, Any]) -> DefaultRouteConfig:
    s = _Section("default", data, _fields(DefaultRouteConfig) - {"probe"} | _PROBE_KEYS)
    d = DefaultRouteConfig()
    trunks = tuple(_trunk(t, s.where("trunks")) for t in s.strings("trunks", d.trunks))
    return DefaultRouteConfig(trunks=trunks, probe=_probe(s, d.probe))


def _probe(s: _Section, d: ProbeOptions) -> ProbeOptions:
    """The ``probe_*`` keys of a route section."""
    interval = s.number("probe_interval", d.interval)
    if 0 < interval < 0.1:
        raise ConfigError(f"{s.where('probe_interval')}: 0 (off) or at least 0.1, got {interval}")
    timeout = s.number("probe_timeout", d.timeout, minimum=0.05)
    if interval and timeout > interval:
        raise ConfigError(
            f"{s.where('probe_timeout')}: must not exceed probe_interval ({interval}), "
            f"got {timeout}"
        )
    return ProbeOptions(
        interval=interval,
        timeout=timeout,
        failures=s.integer("probe_failures", d.failures, minimum=1),
        successes=s.integer("probe_successes", d.successes, minimum=1),
    )


def _store(data: Mapping[str, Any], base: Path | None) -> StoreConfig:
    s = _Section("store", data, _fields(StoreConfig))
    d = StoreConfig()
    url = s.string("url", d.url)
    if not url.startswith("memory://"):
        try:
            check_redis_url(url)
        except ValueError as exc:
            raise ConfigError(f"[store] url: expected memory:// or a Redis URL: {exc}") from None
    seed = s.optional_string("seed_file")
    seed_path: Path | None = None
    if seed is not None:
        if not url.startswith("memory://"):
            raise ConfigError("[store] seed_file: only the memory:// store is seeded from a file")
        seed_path = Path(seed)
        if not seed_path.is_absolute() and base is not None:
            seed_path = base / seed_path
        if not seed_path.is_file():
            raise ConfigError(f"[store] seed_file: {seed_path} does not exist")
    return StoreConfig(
        url=url,
        seed_file=seed_path,
        key_prefix=s.string("key_prefix", d.key_prefix),
        socket_timeout=s.number("socket_timeout", d.socket_timeout, minimum=0.001),
        mirror=s.boolean("mirror", d.mirror),
        pool_size=s.integer("pool_size", d.pool_size, minimum=1),
        pool_timeout=(
            None
            if s.get("pool_timeout", None) is None
            else s.number("pool_timeout", 0.0, minimum=0.001)
        ),
    )


class _EncryptedKey(Exception):
    """OpenSSL asked for the private key's password."""


def _refuse_password() -> bytes:
    raise _EncryptedKey


def server_tls_context(tls: HttpsConfig, section: str) -> ssl.SSLContext:
    """The server TLS context of the listener in ``[section]``: TLS 1.2 or later, and client
    certificates required when ``tls.client_ca_file`` is set.

    The files are read now; a certificate replaced on disk is used from the next start.

    Raises:
        ConfigError: a file cannot be read or does not hold what its key says, naming the key.
    """
    cert_key, key_key, ca_key = (
        f"[{section}] {key}" for key in ("tls_cert_file", "tls_key_file", "tls_client_ca_file")
    )
    cert_pem = _read_pem(tls.cert_file, cert_key)
    _read_pem(tls.key_file, key_key)
    # load_cert_chain says only "PEM lib" for a bad certificate and for a bad key alike;
    # parsing the certificate on its own first tells the operator which file to fix.
    try:
        ssl.create_default_context().load_verify_locations(cadata=cert_pem)
    except (ssl.SSLError, ValueError) as exc:
        raise ConfigError(f"{cert_key}: {tls.cert_file} holds no PEM certificate ({exc})") from None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        # Without a password callback OpenSSL would prompt on the terminal for an encrypted
        # key; the callback refuses instead.
        context.load_cert_chain(tls.cert_file, tls.key_file, password=_refuse_password)
    except _EncryptedKey:
        raise ConfigError(
            f"{key_key}: {tls.key_file} is encrypted; give an unencrypted key "
            "(readable only by the service user)"
        ) from None
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(
            f"{key_key}: {tls.key_file} is not a PEM private key of the certificate in "
            f"{tls.cert_file} ({exc})"
        ) from None
    if tls.client_ca_file is not None:
        _read_pem(tls.client_ca_file, ca_key)
        try:
            context.load_verify_locations(cafile=tls.client_ca_file)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(
                f"{ca_key}: {tls.client_ca_file} holds no PEM CA certificate ({exc})"
            ) from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def _read_pem(path: Path, where: str) -> str:
    try:
        return path.read_text(encoding="ascii")
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{where}: {path} is not a PEM file") from None


def _file(s: _Section, key: str, base: Path | None) -> Path | None:
    text = s.optional_string(key)
    if text is None:
        return None
    path = Path(text)
    if not path.is_absolute() and base is not None:
        path = base / path
    if not path.is_file():
        raise ConfigError(f"{s.where(key)}: {path} does not exist")
    return path


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _https(
    s: _Section, listen: tuple[str, int], base: Path | None, exposed: str
) -> tuple[HttpsConfig | None, bool]:
    """HTTPS settings and ``allow_plaintext`` of the listener in ``s``, checked together.

    Plain HTTP on an address other hosts can reach is refused unless ``allow_plaintext`` says
    so: ``exposed`` names what would cross the network readable by anyone on the path.
    """
    cert = _file(s, "tls_cert_file", base)
    key = _file(s, "tls_key_file", base)
    client_ca = _file(s, "tls_client_ca_file", base)
    allow_plaintext = s.boolean("allow_plaintext", False)
    if cert is None and key is not None:
        raise ConfigError(f"{s.where('tls_cert_file')}: required when tls_key_file is set")
    if cert is not None and key is None:
        raise ConfigError(f"{s.where('tls_key_file')}: required when tls_cert_file is set")
    if cert is None and client_ca is not None:
        raise ConfigError(
            f"{s.where('tls_client_ca_file')}: client certificates need HTTPS; "
            "set tls_cert_file and tls_key_file too"
        )
    if cert is None or key is None:
        host, port = listen
        if not _is_loopback(host) and not allow_plaintext:
            shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            raise ConfigError(
                f"{s.where('listen')}: {shown} is reachable from other hosts and would serve "
                f"{exposed} in plain HTTP; set {s.where('tls_cert_file')} and tls_key_file "
                f"for HTTPS, or set {s.where('allow_plaintext')} = true to accept plain HTTP"
            )
        return None, allow_plaintext
    tls = HttpsConfig(cert_file=cert, key_file=key, client_ca_file=client_ca)
    server_tls_context(tls, s.name)
    return tls, allow_plaintext


def _http(data: Mapping[str, Any], base: Path | None) -> HttpConfig:
    s = _Section("http", data, (_fields(HttpConfig) - {"tls"}) | _HTTPS_KEYS)
    listen = _hostport(s.string("listen", "127.0.0.1:9100"), s.where("listen"))
    tls, allow_plaintext = _https(s, listen, base, "/metrics, /healthz and /readyz")
    return HttpConfig(listen=listen, tls=tls, allow_plaintext=allow_plaintext)


def _log(data: Mapping[str, Any]) -> LogConfig:
    s = _Section("log", data, _fields(LogConfig))
    level = s.string("level", "INFO").upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ConfigError(
            f"[log] level: expected DEBUG, INFO, WARNING, ERROR or CRITICAL, got {level!r}"
        )
    return LogConfig(level=level)


def _shutdown(data: Mapping[str, Any]) -> ShutdownConfig:
    s = _Section("shutdown", data, _fields(ShutdownConfig))
    d = ShutdownConfig()
    return ShutdownConfig(
        drain_timeout=s.number("drain_timeout", d.drain_timeout),
        emergency_drain_timeout=s.number("emergency_drain_timeout", d.emergency_drain_timeout),
        dialog_drain_timeout=s.number("dialog_drain_timeout", d.dialog_drain_timeout),
        min_drain_time=s.number("min_drain_time", d.min_drain_time),
    )


def _overload(data: Mapping[str, Any]) -> OverloadConfig:
    s = _Section("overload", data, _fields(OverloadConfig))
    d = OverloadConfig()
    queue_limit = s.integer("queue_limit", d.queue_limit, minimum=16)
    max_queue = s.integer("max_queue", d.max_queue, minimum=1)
    if max_queue >= queue_limit:
        raise ConfigError(
            f"[overload] max_queue: must be below queue_limit ({queue_limit}), got {max_queue}"
        )
    max_transactions = s.integer("max_transactions", d.max_transactions, minimum=16)
    shed_transactions = s.integer("shed_transactions", d.shed_transactions, minimum=1)
    if shed_transactions > max_transactions:
        raise ConfigError(
            f"[overload] shed_transactions: must not exceed max_transactions "
            f"({max_transactions}), got {shed_transactions}"
        )
    return OverloadConfig(
        max_lag=s.number("max_lag", d.max_lag, minimum=0.001),
        max_queue_delay=s.number("max_queue_delay", d.max_queue_delay, minimum=0.001),
        queue_delay_sustain=s.number("queue_delay_sustain", d.queue_delay_sustain),
        max_queue=max_queue,
        queue_limit=queue_limit,
        batch=s.integer("batch", d.batch, minimum=1),
        lag_interval=s.number("lag_interval", d.lag_interval, minimum=0.001),
        shed_transactions=shed_transactions,
        max_transactions=max_transactions,
        max_contexts=s.integer("max_contexts", d.max_contexts, minimum=16),
        retry_after=s.integer("retry_after", d.retry_after, minimum=1),
    )


def _state_url(value: str, where: str, base: Path | None) -> str:
    if value.startswith("file://"):
        path = Path(value[len("file://") :])
        if not path.is_absolute() and base is not None:
            path = base / path
        return f"file://{path}"
    if value.startswith("memory://"):
        return value
    try:
        check_redis_url(value)
    except ValueError as exc:
        raise ConfigError(
            f"{where}: expected memory://, file:///PATH or a Redis URL: {exc}"
        ) from None
    return value


def _provisioning(data: Mapping[str, Any], base: Path | None) -> ProvisioningConfig:
    s = _Section(
        "provisioning",
        data,
        (_fields(ProvisioningConfig) - {"tls", "imports", "leases"})
        | _HTTPS_KEYS
        | _fields(ImportOptions)
        | set(_LEASE_KEYS.values()),
    )
    d = ProvisioningConfig()
    tokens = s.get("tokens", {})
    if not isinstance(tokens, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in tokens.items()
    ):
        raise ConfigError('[provisioning] tokens: expected a table of name = "token"')
    for name, token in tokens.items():
        if len(token) < 16:
            raise ConfigError(
                f"[provisioning] tokens: the token of {name!r} is shorter than 16 characters"
            )
    listen = _hostport(s.string("listen", "127.0.0.1:9200"), s.where("listen"))
    tls, allow_plaintext = _https(s, listen, base, "bearer tokens and addresses")
    return ProvisioningConfig(
        listen=listen,
        tls=tls,
        allow_plaintext=allow_plaintext,
        tokens=dict(tokens),
        state_url=_state_url(s.string("state_url", d.state_url), s.where("state_url"), base),
        audit_url=_state_url(s.string("audit_url", d.audit_url), s.where("audit_url"), base),
        key_prefix=s.string("key_prefix", d.key_prefix),
        audit_stream=s.string("audit_stream", d.audit_stream),
        imports=_options(
            s,
            d.imports,
            keys={f.name: f.name for f in dataclasses.fields(ImportOptions)},
            minimums={"import_retries": 0},
            int_minimum=1,
        ),
        coverage_alert_below=_share(s, "coverage_alert_below", d.coverage_alert_below),
        coverage_interval=s.number("coverage_interval", d.coverage_interval, minimum=1.0),
        leases=_options(s, d.leases, keys=_LEASE_KEYS, minimums={"ttl": 1.0}),
    )


_LEASE_KEYS = {"ttl": "lease_ttl", "wait": "lease_wait"}
"""[provisioning] keys of the lease options (field -> key)."""

_RECORDER_KEYS = ("max_in_progress", "max_age", "queue_size", "linger")
"""[records] keys of the recorder's options (see RecordsConfig.recorder)."""


def _share(s: _Section, key: str, default: float) -> float:
    value = s.number(key, default)
    if value > 1.0:
        raise ConfigError(f"{s.where(key)}: a share from 0 to 1, got {value}")
    return value


def _records(data: Mapping[str, Any], base: Path | None) -> RecordsConfig:
    s = _Section("records", data, _fields(RecordsConfig) - {"recorder"} | set(_RECORDER_KEYS))
    d = RecordsConfig()
    book = _options(
        s,
        d.recorder.book,
        keys={"max_calls": "max_in_progress", "max_age": "max_age"},
        minimums={"max_calls": 1, "max_age": 1.0},
    )
    recorder = _options(
        s,
        dataclasses.replace(d.recorder, book=book),
        keys={"queue_size": "queue_size", "linger": "linger"},
        minimums={"queue_size": 1},
    )
    return RecordsConfig(
        enabled=s.boolean("enabled", d.enabled),
        store_url=_state_url(s.string("store_url", d.store_url), s.where("store_url"), base),
        key_prefix=s.string("key_prefix", d.key_prefix),
        retention_days=s.number("retention_days", d.retention_days, minimum=1.0),
        stream=s.string("stream", d.stream),
        stream_maxlen=s.integer("stream_maxlen", d.stream_maxlen, minimum=1000),
        group=s.string("group", d.group),
        consumer=s.string("consumer", d.consumer),
        recorder=recorder,
    )


def _bandwidth(data: Mapping[str, Any]) -> BandwidthConfig:
    s = _Section("bandwidth", data, _fields(BandwidthOptions) | {"run_emulator"})
    d = BandwidthConfig()
    client = _options(s, d.client, keys=_own_keys(BandwidthOptions), int_minimum=1)
    if not client.account_id.isalnum():
        raise ConfigError(
            f"[bandwidth] account_id: expected letters and digits, got {client.account_id!r}"
        )
    return BandwidthConfig(
        client=dataclasses.replace(client, api_base=client.api_base.rstrip("/")),
        run_emulator=s.boolean("run_emulator", d.run_emulator),
    )


MIN_DIALOG_KEY = 16
"""Bytes a dialog key file must hold, at the least."""


def _security(data: Mapping[str, Any], base: Path | None) -> SecurityConfig:
    s = _Section("security", data, _fields(SecurityConfig) - {"dialog_key"})
    d = SecurityConfig()
    networks: list[IPNetwork] = []
    for text in s.strings("trusted_sources", tuple(str(n) for n in d.trusted_sources)):
        try:
            networks.append(ipaddress.ip_network(text, strict=True))
        except ValueError as exc:
            raise ConfigError(
                f"[security] trusted_sources: {text!r} is not a CIDR network ({exc})"
            ) from None
    if not networks:
        raise ConfigError(
            "[security] trusted_sources: at least one network is required (the softswitch); "
            "with none, no call could be relayed"
        )
    action = s.string("untrusted", d.untrusted.value)
    try:
        untrusted = UntrustedAction(action)
    except ValueError:
        raise ConfigError(
            f"[security] untrusted: expected drop or reject, got {action!r}"
        ) from None
    key_file = _file(s, "dialog_key_file", base)
    key: bytes | None = None
    if key_file is not None:
        try:
            key = key_file.read_bytes().strip()
        except OSError as exc:
            raise ConfigError(f"{s.where('dialog_key_file')}: {key_file}: {exc.strerror}") from None
        if len(key) < MIN_DIALOG_KEY:
            raise ConfigError(
                f"{s.where('dialog_key_file')}: {key_file} holds {len(key)} bytes; at least "
                f"{MIN_DIALOG_KEY} are needed (make one with: head -c 32 /dev/urandom | base64)"
            )
    return SecurityConfig(
        trusted_sources=tuple(networks),
        untrusted=untrusted,
        max_trunk_dialogs=s.integer("max_trunk_dialogs", d.max_trunk_dialogs, minimum=1),
        trunk_dialog_max_age=s.number("trunk_dialog_max_age", d.trunk_dialog_max_age, minimum=1.0),
        dialog_key_file=key_file,
        dialog_key=key,
    )


_DELIVERY_KEYS = {
    "webhook_urls",
    "emails",
    "sms",
    "always",
    "max_attempts",
    "retry_for",
    "backoff_base",
    "backoff_cap",
}
"""[notify] keys of the notifier's options (see NotifyConfig.delivery)."""


def _notify(data: Mapping[str, Any], base: Path | None) -> NotifyConfig:
    s = _Section("notify", data, _fields(NotifyConfig) - {"delivery"} | _DELIVERY_KEYS)
    d = NotifyConfig()
    numbers = s.strings("numbers", d.numbers)
    for number in numbers:
        if not number.isdigit():
            raise ConfigError(f"[notify] numbers: expected dialled digits, got {number!r}")
    urls = s.strings("webhook_urls", d.delivery.fallback.webhooks)
    for url in urls:
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"[notify] webhook_urls: expected http(s)://..., got {url!r}")
    sms = s.strings("sms", d.delivery.fallback.sms)
    for number in sms:
        if not number.lstrip("+").isdigit():
            raise ConfigError(f"[notify] sms: expected a phone number, got {number!r}")
    smtp_url = s.optional_string("smtp_url")
    if smtp_url is not None and not smtp_url.startswith(("smtp://", "smtps://")):
        raise ConfigError(f"[notify] smtp_url: expected smtp:// or smtps://, got {smtp_url!r}")
    starttls = s.string("smtp_starttls", d.smtp_starttls.value)
    try:
        mode = StartTls(starttls)
    except ValueError:
        raise ConfigError(
            f"[notify] smtp_starttls: expected auto, always or never, got {starttls!r}"
        ) from None
    queue_file = s.optional_string("queue_file")
    queue_path: Path | None = None
    if queue_file is not None:
        queue_path = Path(queue_file)
        if not queue_path.is_absolute() and base is not None:
            queue_path = base / queue_path
    if s.optional_string("sms_from") is not None and not s.optional_string("sms_application_id"):
        raise ConfigError(
            "[notify] sms_application_id: required with sms_from (the Bandwidth messaging "
            "application the sending number belongs to)"
        )
    rate = s.number("sms_rate", d.sms_rate)
    if rate <= 0:
        raise ConfigError("[notify] sms_rate: must be more than 0")
    delivery = _options(
        s,
        dataclasses.replace(
            d.delivery,
            fallback=Targets(
                webhooks=urls, emails=s.strings("emails", d.delivery.fallback.emails), sms=sms
            ),
        ),
        keys={
            "fallback_always": "always",
            "max_attempts": "max_attempts",
            "retry_for": "retry_for",
            "backoff_base": "backoff_base",
            "backoff_cap": "backoff_cap",
        },
        minimums={"max_attempts": 1},
    )
    return NotifyConfig(
        enabled=s.boolean("enabled", d.enabled),
        numbers=numbers,
        delivery=delivery,
        webhook_secret=s.optional_string("webhook_secret"),
        webhook_timeout=s.number("webhook_timeout", d.webhook_timeout),
        smtp_url=smtp_url,
        smtp_username=s.optional_string("smtp_username"),
        smtp_password=s.optional_string("smtp_password"),
        smtp_starttls=mode,
        smtp_timeout=s.number("smtp_timeout", d.smtp_timeout),
        smtp_ca_file=_file(s, "smtp_ca_file", base),
        email_from=s.string("email_from", d.email_from),
        sms_from=s.optional_string("sms_from"),
        sms_application_id=s.string("sms_application_id", d.sms_application_id),
        sms_rate=rate,
        queue_file=queue_path,
        key_prefix=s.string("key_prefix", d.key_prefix),
        consumer=s.string("consumer", d.consumer),
    )


_SECTIONS = (
    "sip",
    "tcp",
    "tls",
    "emergency",
    "default",
    "store",
    "http",
    "log",
    "shutdown",
    "provisioning",
    "bandwidth",
    "security",
    "overload",
    "records",
    "notify",
)


def _env_value(text: str) -> Any:
    """An environment value read as a TOML value when it is one, else as a plain string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_environment(data: dict[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    """Overlay ``E911_SIP__SECTION__KEY=value`` variables on the parsed file."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    for name, text in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        parts = name[len(ENV_PREFIX) :].lower().split("__")
        if len(parts) != 2 or parts[0] not in _SECTIONS:
            raise ConfigError(
                f"environment {name}: expected {ENV_PREFIX}SECTION__KEY with SECTION one of "
                f"{', '.join(s.upper() for s in _SECTIONS)}"
            )
        section = out.setdefault(parts[0], {})
        if not isinstance(section, dict):
            raise ConfigError(f"[{parts[0]}]: expected a table")
        section[parts[1]] = _env_value(text)
    return out


def from_mapping(data: Mapping[str, Any], *, base: Path | None = None) -> Config:
    """Build a Config from parsed TOML; relative paths resolve against ``base``."""
    unknown = sorted(set(data) - set(_SECTIONS))
    if unknown:
        raise ConfigError(f"[{unknown[0]}]: unknown section (known: {', '.join(_SECTIONS)})")
    tables: dict[str, Mapping[str, Any]] = {}
    for name in _SECTIONS:
        table = data.get(name, {})
        if not isinstance(table, Mapping):
            raise ConfigError(f"[{name}]: expected a table, got {table!r}")
        tables[name] = table
    config = Config(
        sip=_sip(tables["sip"]),
        tcp=_tcp(tables["tcp"]),
        tls=_tls(tables["tls"], base),
        emergency=_emergency(tables["emergency"]),
        default=_default(tables["default"]),
        store=_store(tables["store"], base),
        http=_http(tables["http"], base),
        log=_log(tables["log"]),
        shutdown=_shutdown(tables["shutdown"]),
        provisioning=_provisioning(tables["provisioning"], base),
        bandwidth=_bandwidth(tables["bandwidth"]),
        security=_security(tables["security"], base),
        overload=_overload(tables["overload"]),
        records=_records(tables["records"], base),
        notify=_notify(tables["notify"], base),
    )
    _check_tls(config)
    if config.sip.workers > 1 and config.store.url.startswith("memory://"):
        raise ConfigError(
            "[sip] workers: more than one worker needs a shared location store: set "
            "[store] url to redis:// (each worker's memory:// store would be its own)"
        )
    return config


def load(path: Path | None, environ: Mapping[str, str]) -> Config:
    """Read ``path`` (None: built-in defaults) and the environment into a Config.

    Raises:
        ConfigError: the file cannot be read or parsed, or a value is invalid.
    """
    data: dict[str, Any] = {}
    base: Path | None = None
    if path is not None:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from exc
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
        base = path.resolve().parent
    data = apply_environment(data, environ)
    try:
        config = from_mapping(data, base=base)
    except ConfigError as exc:
        raise _naming_the_variable(exc, environ) from exc
    return dataclasses.replace(config, source=path)


_ERROR_KEY = re.compile(r"\[(\w+)\] (\w+)")


def _naming_the_variable(exc: ConfigError, environ: Mapping[str, str]) -> ConfigError:
    """``exc`` naming the environment variable too when its ``[section] key`` came from one,
    since that is where the operator must look (the file may not even have the key)."""
    message = str(exc)
    found = _ERROR_KEY.match(message)
    if found is None:
        return exc
    wanted = f"{ENV_PREFIX}{found.group(1)}__{found.group(2)}".upper()
    names = [name for name in environ if name.upper() == wanted]
    if not names:
        return exc
    return ConfigError(f"{message} (set by environment variable {names[0]})")
