"""Configuration: a TOML file plus ``E911_SIP__SECTION__KEY`` environment overrides.

:func:`load` is the only reader of files and environment in the product besides the CLI; it
returns a frozen :class:`Config` or raises :class:`ConfigError` with a message naming the
key and the problem, so ``e911-sip check-config`` can tell an operator what to fix. Unknown
keys are errors too: a misspelt key silently ignored is how a 911 trunk goes missing.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from e911_sip.policy.enrich import ExistingGeolocation
from e911_sip.provisioning.bandwidth import BandwidthOptions
from e911_sip.sip.errors import SipError
from e911_sip.sip.uri import parse_uri

ENV_PREFIX = "E911_SIP__"
TRANSPORTS = ("udp", "tcp")


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
    """Where SIP is received, as ``udp:HOST:PORT`` / ``tcp:HOST:PORT``."""
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


@dataclass(frozen=True, slots=True, kw_only=True)
class EmergencyConfig:
    """[emergency]: what counts as an emergency call and where it goes."""

    numbers: tuple[str, ...] = ("911", "933")
    """Dialled strings that make an initial INVITE an emergency call."""
    trunks: tuple[str, ...] = ("sip:127.0.0.1:5080", "sip:127.0.0.1:5081")
    """Bandwidth emergency trunks as SIP URIs with IP hosts, tried in order."""
    geolocation_base_url: str = "https://emergency.bandwidth.com/locations/"
    """Prefix of the Geolocation reference; ``provider_endpoint`` is appended."""
    existing_geolocation: ExistingGeolocation = ExistingGeolocation.REPLACE
    """A Geolocation already on the call: ``replace`` (default, old value logged), ``keep``
    (ours is not added) or ``append`` (ours goes last)."""
    pai_domain: str | None = None
    """Host of the P-Asserted-Identity URI; unset takes the From URI's host."""
    provisional_timeout: float = 2.0
    """Seconds a trunk has to send a provisional response before the next one is tried."""
    lookup_timeout: float = 0.05
    """Seconds one location lookup may take before the cache, then no location, is used."""
    fail_open_after: float = 0.5
    """Seconds after which an emergency INVITE goes out unenriched whatever is pending."""
    cache_size: int = 100_000
    """Lines whose last record is kept for use while the store is down."""
    cache_max_age: float = 86_400.0
    """Seconds a cached record stays usable."""
    store_cooldown: float = 1.0
    """Seconds the store is skipped after a failed lookup."""


@dataclass(frozen=True, slots=True, kw_only=True)
class DefaultRouteConfig:
    """[default]: where every non-emergency initial request goes."""

    trunks: tuple[str, ...] = ("sip:127.0.0.1:5090",)
    """SIP URIs tried in order."""


@dataclass(frozen=True, slots=True, kw_only=True)
class StoreConfig:
    """[store]: the location store the edge reads."""

    url: str = "memory://"
    """``memory://`` (embedded, optionally seeded) or ``redis://host:port/db``."""
    seed_file: Path | None = None
    """JSON file of line records loaded into the memory store at start."""
    key_prefix: str = "e911:line:"
    """Prefix of the per-line hash keys in Redis."""
    socket_timeout: float = 1.0
    """Redis socket timeout, seconds (lookups are bounded separately)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class HttpConfig:
    """[http]: metrics and health endpoints."""

    listen: tuple[str, int] = ("127.0.0.1", 9100)
    """``HOST:PORT`` for /metrics, /healthz and /readyz."""


@dataclass(frozen=True, slots=True, kw_only=True)
class LogConfig:
    """[log]: structured logging."""

    level: str = "INFO"
    """DEBUG, INFO, WARNING, ERROR or CRITICAL."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ShutdownConfig:
    """[shutdown]: draining on SIGTERM."""

    drain_timeout: float = 30.0
    """Seconds to wait for transactions in flight."""
    emergency_drain_timeout: float = 7200.0
    """Seconds to keep routing for emergency dialogs that are still up."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ProvisioningConfig:
    """[provisioning]: the provisioning API."""

    listen: tuple[str, int] = ("127.0.0.1", 9200)
    """``HOST:PORT`` of the provisioning REST API."""
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


@dataclass(frozen=True, slots=True, kw_only=True)
class OverloadConfig:
    """[overload]: admission control. Emergency INVITEs are never refused by any of it."""

    max_lag: float = 0.1
    """Seconds of event-loop lag above which new non-emergency requests get 503."""
    max_queue: int = 500
    """Datagrams waiting to be processed above which new non-emergency requests get 503."""
    queue_limit: int = 10_000
    """Datagrams waiting at most; beyond, the least urgent are dropped unread."""
    batch: int = 32
    """Datagrams processed per turn of the event loop (emergency INVITEs first)."""
    lag_interval: float = 0.05
    """Seconds between event-loop lag measurements."""
    shed_transactions: int = 100_000
    """Open transactions above which new non-emergency initial requests get 503."""
    max_transactions: int = 150_000
    """Open transactions at most (about 4 KB each): at the bound every new request but an
    emergency INVITE or a BYE gets 503, and those evict the oldest non-emergency state."""
    max_contexts: int = 50_000
    """Requests being proxied at most; at the bound, as for ``max_transactions``."""
    retry_after: int = 5
    """Seconds in the Retry-After header of those 503 responses."""


def _emulator_client() -> BandwidthOptions:
    return BandwidthOptions(
        account_id="5555555",
        client_id="e911-sip-emulator",
        client_secret="emulator-secret",
        api_base="http://127.0.0.1:9300/api/v2",
        token_url="http://127.0.0.1:9300/api/v1/oauth2/token",
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


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    """The whole configuration."""

    sip: SipConfig = field(default_factory=SipConfig)
    emergency: EmergencyConfig = field(default_factory=EmergencyConfig)
    default: DefaultRouteConfig = field(default_factory=DefaultRouteConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    log: LogConfig = field(default_factory=LogConfig)
    shutdown: ShutdownConfig = field(default_factory=ShutdownConfig)
    provisioning: ProvisioningConfig = field(default_factory=ProvisioningConfig)
    bandwidth: BandwidthConfig = field(default_factory=BandwidthConfig)
    overload: OverloadConfig = field(default_factory=OverloadConfig)
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
        raise ConfigError(f"{where}: {text!r}: transport must be udp or tcp")
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
    )


def _emergency(data: Mapping[str, Any]) -> EmergencyConfig:
    s = _Section("emergency", data, _fields(EmergencyConfig))
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
    return EmergencyConfig(
        numbers=numbers,
        trunks=trunks,
        geolocation_base_url=base,
        existing_geolocation=existing,
        pai_domain=s.optional_string("pai_domain"),
        provisional_timeout=s.number("provisional_timeout", d.provisional_timeout, minimum=0.05),
        lookup_timeout=s.number("lookup_timeout", d.lookup_timeout, minimum=0.001),
        fail_open_after=s.number("fail_open_after", d.fail_open_after, minimum=0.01),
        cache_size=s.integer("cache_size", d.cache_size),
        cache_max_age=s.number("cache_max_age", d.cache_max_age),
        store_cooldown=s.number("store_cooldown", d.store_cooldown),
    )


def _default(data: Mapping[str, Any]) -> DefaultRouteConfig:
    s = _Section("default", data, _fields(DefaultRouteConfig))
    d = DefaultRouteConfig()
    trunks = tuple(_trunk(t, s.where("trunks")) for t in s.strings("trunks", d.trunks))
    return DefaultRouteConfig(trunks=trunks)


def _store(data: Mapping[str, Any], base: Path | None) -> StoreConfig:
    s = _Section("store", data, _fields(StoreConfig))
    d = StoreConfig()
    url = s.string("url", d.url)
    if not url.startswith(("memory://", "redis://", "rediss://", "unix://")):
        raise ConfigError(f"[store] url: expected memory:// or redis://HOST:PORT/DB, got {url!r}")
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
    )


def _http(data: Mapping[str, Any]) -> HttpConfig:
    s = _Section("http", data, _fields(HttpConfig))
    text = s.string("listen", "127.0.0.1:9100")
    return HttpConfig(listen=_hostport(text, s.where("listen")))


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
    if not value.startswith(("memory://", "redis://", "rediss://", "unix://")):
        raise ConfigError(
            f"{where}: expected memory://, file:///PATH or redis://..., got {value!r}"
        )
    return value


def _provisioning(data: Mapping[str, Any], base: Path | None) -> ProvisioningConfig:
    s = _Section("provisioning", data, _fields(ProvisioningConfig))
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
    return ProvisioningConfig(
        listen=_hostport(s.string("listen", "127.0.0.1:9200"), s.where("listen")),
        tokens=dict(tokens),
        state_url=_state_url(s.string("state_url", d.state_url), s.where("state_url"), base),
        audit_url=_state_url(s.string("audit_url", d.audit_url), s.where("audit_url"), base),
        key_prefix=s.string("key_prefix", d.key_prefix),
        audit_stream=s.string("audit_stream", d.audit_stream),
    )


def _bandwidth(data: Mapping[str, Any]) -> BandwidthConfig:
    s = _Section("bandwidth", data, _fields(BandwidthOptions) | {"run_emulator"})
    d = BandwidthConfig()
    values: dict[str, Any] = {}
    for f in dataclasses.fields(BandwidthOptions):
        default = getattr(d.client, f.name)
        if isinstance(default, bool):
            values[f.name] = s.boolean(f.name, default)
        elif isinstance(default, int):
            values[f.name] = s.integer(f.name, default, minimum=1)
        elif isinstance(default, float):
            values[f.name] = s.number(f.name, default)
        else:
            values[f.name] = s.string(f.name, default)
    if not values["account_id"].isalnum():
        raise ConfigError(
            f"[bandwidth] account_id: expected letters and digits, got {values['account_id']!r}"
        )
    values["api_base"] = values["api_base"].rstrip("/")
    return BandwidthConfig(
        client=BandwidthOptions(**values),
        run_emulator=s.boolean("run_emulator", d.run_emulator),
    )


_SECTIONS = (
    "sip",
    "emergency",
    "default",
    "store",
    "http",
    "log",
    "shutdown",
    "provisioning",
    "bandwidth",
    "overload",
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
    return Config(
        sip=_sip(tables["sip"]),
        emergency=_emergency(tables["emergency"]),
        default=_default(tables["default"]),
        store=_store(tables["store"], base),
        http=_http(tables["http"]),
        log=_log(tables["log"]),
        shutdown=_shutdown(tables["shutdown"]),
        provisioning=_provisioning(tables["provisioning"], base),
        bandwidth=_bandwidth(tables["bandwidth"]),
        overload=_overload(tables["overload"]),
    )


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
    return dataclasses.replace(from_mapping(data, base=base), source=path)
