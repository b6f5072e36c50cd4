"""Configuration loading: defaults, the shipped files, environment overrides, clear errors."""

from __future__ import annotations

import resource
from pathlib import Path

import pytest
import trustme

from e911_sip.app import (
    DIALOG_KEY_ENV,
    dialog_key,
    proxy_options,
    raise_nofile_limit,
    stream_limits,
)
from e911_sip.cli import main
from e911_sip.config import ConfigError, ListenAddress, UntrustedAction, load
from e911_sip.policy.enrich import ExistingGeolocation
from e911_sip.proxy.routing import LocalAddress
from tests.certs import issue

ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "e911.toml"
    path.write_text(text)
    return path


def test_built_in_defaults() -> None:
    config = load(None, {})
    assert config.sip.listen == (
        ListenAddress("udp", "127.0.0.1", 5070),
        ListenAddress("tcp", "127.0.0.1", 5070),
    )
    assert config.emergency.numbers == ("911", "933")
    assert config.store.url == "memory://"
    assert config.emergency.lookup_timeout == 0.05
    assert config.emergency.provisional_timeout == 2.0
    assert config.emergency.trying_after == 0.1


def test_shipped_example_config_is_valid() -> None:
    config = load(ROOT / "config" / "e911-sip.toml", {})
    assert config.store.seed_file == ROOT / "config" / "locations.example.json"
    assert config.emergency.trunks == ("sip:127.0.0.1:5080", "sip:127.0.0.1:5081")
    assert config.http.listen == ("127.0.0.1", 9100)


def test_documented_minimum_keys(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
[sip]
listen = ["udp:127.0.0.1:5070", "tcp:127.0.0.1:5070"]
[emergency]
numbers = ["911", "933"]
trunks = ["sip:127.0.0.1:5080", "sip:127.0.0.1:5081"]
geolocation_base_url = "https://emergency.bandwidth.com/locations/"
[default]
trunks = ["sip:127.0.0.1:5090"]
[store]
url = "redis://127.0.0.1:6379/0"
[http]
listen = "127.0.0.1:9100"
""",
    )
    config = load(path, {})
    assert config.store.url == "redis://127.0.0.1:6379/0"
    assert config.default.trunks == ("sip:127.0.0.1:5090",)


def test_environment_overrides(tmp_path: Path) -> None:
    path = write(tmp_path, '[store]\nurl = "memory://"\n')
    config = load(
        path,
        {
            "E911_SIP__STORE__URL": "redis://10.0.0.5:6379/1",
            "E911_SIP__EMERGENCY__LOOKUP_TIMEOUT": "0.02",
            "E911_SIP__EMERGENCY__TRUNKS": '["sip:10.1.1.1:5060"]',
            "E911_SIP__EMERGENCY__EXISTING_GEOLOCATION": "append",
            "UNRELATED": "x",
        },
    )
    assert config.store.url == "redis://10.0.0.5:6379/1"
    assert config.emergency.lookup_timeout == 0.02
    assert config.emergency.trunks == ("sip:10.1.1.1:5060",)
    assert config.emergency.existing_geolocation is ExistingGeolocation.APPEND


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[sip]\nlisen = []\n", r"\[sip\] lisen: unknown key"),
        ("[sipp]\n", r"\[sipp\]: unknown section"),
        ('[sip]\nlisten = ["sctp:1.2.3.4:5060"]\n', r"\[sip\] listen: expected TRANSPORT"),
        ('[sip]\nlisten = ["udp:0.0.0.0:5060"]\n', r"\[sip\] advertise: required"),
        ("[sip]\ntimer_c = 60\n", r"\[sip\] timer_c: must exceed 180"),
        ("[emergency]\ntrunks = []\n", r"\[emergency\] trunks: at least one"),
        ('[emergency]\ntrunks = ["sip:bw.example.com"]\n', r"must name an IP address"),
        ('[emergency]\ntrunks = ["tel:911"]\n', r"must be a sip: URI"),
        (
            '[emergency]\nlookup_timeout = "fast"\n',
            r"\[emergency\] lookup_timeout: expected a number",
        ),
        ("[emergency]\ntrying_after = 0.5\n", r"\[emergency\] trying_after: at most 0.2"),
        ('[emergency]\ngeolocation_base_url = "ftp://x/"\n', r"geolocation_base_url"),
        ('[emergency]\nexisting_geolocation = "merge"\n', r"existing_geolocation: expected one of"),
        ('[store]\nurl = "postgres://x"\n', r"\[store\] url"),
        ('[store]\nseed_file = "missing.json"\n', r"\[store\] seed_file: .* does not exist"),
        ('[http]\nlisten = "9100"\n', r"\[http\] listen: expected HOST:PORT"),
        ('[provisioning]\ntokens = { ops = "short" }\n', r"shorter than 16"),
        ("not toml = = 1\n", r"not valid TOML"),
        ("[tcp]\nmax_connections = 10\ntrusted_reserve = 10\n", r"\[tcp\] trusted_reserve"),
        ("[tcp]\nheader_timeout = 0\n", r"\[tcp\] header_timeout: must be at least"),
        (
            '[emergency]\ntrunks = ["sip:192.0.2.1:5061;transport=tls"]\n',
            r"\[sip\] listen: trunk .* uses TLS",
        ),
        ('[sip]\nlisten = ["tls:127.0.0.1:5061"]\n', r"\[tls\] certificate: required"),
        ('[tls]\ncertificate = "missing.pem"\n', r"\[tls\] certificate: .* does not exist"),
        ('[tls]\nminimum_version = "1.0"\n', r"\[tls\] minimum_version"),
        ('[emergency]\ntrunks = ["sip:192.0.2.1;transport=sctp"]\n', r"udp, tcp or tls"),
    ],
)
def test_errors_name_the_key_and_the_problem(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load(write(tmp_path, text), {})


@pytest.mark.parametrize(
    ("name", "value", "key"),
    [
        ("E911_SIP__EMERGENCY__LOOKUP_TIMEOUT", "fast", "[emergency] lookup_timeout"),
        ("E911_SIP__STORE__URL", "mysql://x", "[store] url"),
        ("E911_SIP__PROVISIONING__TOKENS", '{ ops = "short" }', "[provisioning] tokens"),
    ],
)
def test_an_override_error_names_the_key_and_the_variable(name: str, value: str, key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load(None, {name: value})
    message = str(caught.value)
    assert message.startswith(key) and message.endswith(f"(set by environment variable {name})")


def test_a_file_error_names_no_variable(tmp_path: Path) -> None:
    path = write(tmp_path, "[emergency]\nlookup_timeout = 'fast'\n")
    with pytest.raises(ConfigError) as caught:
        load(path, {"E911_SIP__STORE__URL": "memory://"})
    assert "environment" not in str(caught.value)


def test_bad_environment_name() -> None:
    with pytest.raises(ConfigError, match="E911_SIP__SECTION__KEY"):
        load(None, {"E911_SIP__STOREURL": "x"})


def test_check_config_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", "--config", str(ROOT / "config" / "e911-sip.toml")]) == 0
    assert "OK" in capsys.readouterr().out
    bad = write(tmp_path, "[emergency]\ntrunks = []\n")
    assert main(["check-config", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "configuration error" in err and "[emergency] trunks" in err
    assert main(["check-config", "--config", str(tmp_path / "nope.toml")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_check_config_summarises_provisioning_and_bandwidth_without_secrets(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write(
        tmp_path,
        """
[store]
url = "redis://:store-password@10.0.0.5:6379/0"
[provisioning]
tokens = { portal = "portal-token-0123456789", noc = "noc-token-0123456789" }
state_url = "redis://admin:state-password@10.0.0.6:6379/1"
audit_url = "file:///var/lib/e911-sip/audit.jsonl"
[bandwidth]
account_id = "9900001"
client_id = "csp-client"
api_base = "https://api.bandwidth.com/api/v2"
token_url = "https://api.bandwidth.com/api/v1/oauth2/token"
""",
    )
    env = {"E911_SIP__BANDWIDTH__CLIENT_SECRET": "bw-secret-value"}
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        assert main(["check-config", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    rows = dict(
        (label.strip(), value.strip())
        for label, _, value in (line.partition(": ") for line in out.splitlines()[1:])
    )
    assert rows["store"] == "redis://:***@10.0.0.5:6379/0"
    assert rows["provisioning tokens"] == "portal, noc"
    assert rows["provisioning state"] == "redis://admin:***@10.0.0.6:6379/1"
    assert rows["audit trail"] == "file:///var/lib/e911-sip/audit.jsonl"
    assert rows["bandwidth account"] == "9900001 at https://api.bandwidth.com/api/v2"
    assert rows["bandwidth credentials"] == (
        "client csp-client, secret set, via https://api.bandwidth.com/api/v1/oauth2/token"
    )
    assert "bandwidth messaging" in rows
    for secret in ("token-0123456789", "password", "bw-secret-value", "emulator-secret"):
        assert secret not in out


def test_container_config_and_its_environment(tmp_path: Path) -> None:
    # The image reads its certificate from /etc/e911-sip/tls/; here a test-made one stands in.
    server = issue(trustme.CA(), tmp_path, "server")
    config = load(
        ROOT / "config" / "e911-sip.container.toml",
        {
            "E911_SIP__HTTP__TLS_CERT_FILE": str(server.cert),
            "E911_SIP__HTTP__TLS_KEY_FILE": str(server.key),
            "E911_SIP__PROVISIONING__TLS_CERT_FILE": str(server.cert),
            "E911_SIP__PROVISIONING__TLS_KEY_FILE": str(server.key),
            "E911_SIP__SIP__ADVERTISE": "203.0.113.10",
            "E911_SIP__STORE__URL": "redis://10.0.0.7:6379/0",
            "E911_SIP__PROVISIONING__TOKENS": '{ portaswitch = "0123456789abcdef0123" }',
            "E911_SIP__SECURITY__TRUSTED_SOURCES": '["10.20.0.0/24", "2001:db8:20::/64"]',
        },
    )
    assert config.sip.advertise == "203.0.113.10"
    assert [str(n) for n in config.security.trusted_sources] == ["10.20.0.0/24", "2001:db8:20::/64"]
    assert config.provisioning.tokens == {"portaswitch": "0123456789abcdef0123"}
    assert config.provisioning.state_url == "file:///var/lib/e911-sip/provisioning.json"


def test_dockerfile_runs_a_shipped_config() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    cmd = [line for line in dockerfile.splitlines() if line.startswith("CMD ")][-1]
    path = cmd.split('"')[-2]
    assert path.startswith("/etc/e911-sip/")
    assert (ROOT / "config" / path.removeprefix("/etc/e911-sip/")).is_file()
    assert "COPY config /etc/e911-sip" in dockerfile


def test_bandwidth_section_is_the_clients_options(tmp_path: Path) -> None:
    config = load(
        write(
            tmp_path,
            '[bandwidth]\naccount_id = "9900001"\napi_base = "https://api.bandwidth.com/api/v2/"\n'
            "max_attempts = 3\nbackoff_cap = 4.0\n",
        ),
        {"E911_SIP__BANDWIDTH__CLIENT_SECRET": "from-the-environment"},
    )
    client = config.bandwidth.client
    assert (client.account_id, client.api_base) == ("9900001", "https://api.bandwidth.com/api/v2")
    assert (client.max_attempts, client.backoff_cap) == (3, 4.0)
    assert client.client_secret == "from-the-environment"
    assert config.bandwidth.run_emulator is False
    with pytest.raises(ConfigError, match=r"\[bandwidth\] max_attempts: must be at least 1"):
        load(write(tmp_path, "[bandwidth]\nmax_attempts = 0\n"), {})
    with pytest.raises(ConfigError, match=r"\[bandwidth\] acount_id: unknown key"):
        load(write(tmp_path, '[bandwidth]\nacount_id = "1"\n'), {})


def test_security_defaults_trust_only_loopback() -> None:
    config = load(None, {})
    assert [str(n) for n in config.security.trusted_sources] == ["127.0.0.1/32", "::1/128"]
    assert config.security.untrusted is UntrustedAction.DROP
    assert config.emergency.existing_geolocation is ExistingGeolocation.REMOVE


def test_dialog_key_file_is_read_and_kept_out_of_reprs(tmp_path: Path) -> None:
    assert load(None, {}).security.dialog_key is None
    (tmp_path / "dialog.key").write_text("  c2VjcmV0IGtleSBmb3IgdGhlIGVkZ2Vz\n")
    config = load(write(tmp_path, '[security]\ndialog_key_file = "dialog.key"\n'), {})
    assert config.security.dialog_key_file == tmp_path / "dialog.key"
    assert config.security.dialog_key == b"c2VjcmV0IGtleSBmb3IgdGhlIGVkZ2Vz"
    assert "c2VjcmV0" not in repr(config)
    # The key alone is not a config key: only the file is.
    with pytest.raises(ConfigError, match=r"\[security\] dialog_key: unknown key"):
        load(write(tmp_path, '[security]\ndialog_key = "x"\n'), {})


def test_dialog_key_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\[security\] dialog_key_file: .*does not exist"):
        load(write(tmp_path, '[security]\ndialog_key_file = "missing.key"\n'), {})
    (tmp_path / "short.key").write_text("too short\n")
    with pytest.raises(ConfigError, match=r"holds 9 bytes; at least 16 are needed"):
        load(write(tmp_path, '[security]\ndialog_key_file = "short.key"\n'), {})


def test_workers_share_the_supervisors_key_unless_a_file_gives_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(DIALOG_KEY_ENV, "00ff" * 16)
    defaults = load(None, {})
    assert dialog_key(defaults, worker=True) == bytes.fromhex("00ff" * 16)
    assert dialog_key(defaults, worker=False) is None  # a single edge makes its own
    (tmp_path / "dialog.key").write_text("a key kept across restarts\n")
    config = load(write(tmp_path, '[security]\ndialog_key_file = "dialog.key"\n'), {})
    assert dialog_key(config, worker=True) == b"a key kept across restarts"
    assert dialog_key(config, worker=False) == b"a key kept across restarts"


def test_lease_keys_are_read_from_the_provisioning_section(tmp_path: Path) -> None:
    defaults = load(None, {}).provisioning.leases
    assert (defaults.ttl, defaults.wait) == (15.0, 60.0)
    path = write(tmp_path, "[provisioning]\nlease_ttl = 5\nlease_wait = 20\n")
    leases = load(path, {"E911_SIP__PROVISIONING__LEASE_WAIT": "30"}).provisioning.leases
    assert (leases.ttl, leases.wait) == (5.0, 30.0)
    with pytest.raises(ConfigError, match=r"\[provisioning\] lease_ttl: must be at least 1"):
        load(write(tmp_path, "[provisioning]\nlease_ttl = 0.5\n"), {})
    with pytest.raises(ConfigError, match=r"\[provisioning\] ttl: unknown key"):
        load(write(tmp_path, "[provisioning]\nttl = 5\n"), {})


def test_probe_keys_per_route(tmp_path: Path) -> None:
    defaults = load(None, {})
    assert defaults.emergency.probe.interval == 10.0
    assert defaults.emergency.probe.failures == 2
    assert defaults.default.probe.interval == 10.0
    path = write(
        tmp_path,
        """
[emergency]
probe_interval = 5
probe_timeout = 1.5
probe_failures = 3
probe_successes = 2
[default]
probe_interval = 0
""",
    )
    config = load(path, {"E911_SIP__EMERGENCY__PROBE_TIMEOUT": "0.5"})
    probe = config.emergency.probe
    assert (probe.interval, probe.timeout, probe.failures, probe.successes) == (5.0, 0.5, 3, 2)
    assert not config.default.probe.enabled


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('trusted_sources = ["10.0.0.300/32"]', "[security] trusted_sources: '10.0.0.300/32'"),
        ('trusted_sources = ["10.0.0.1/24"]', "[security] trusted_sources: '10.0.0.1/24'"),
        ("trusted_sources = []", "[security] trusted_sources: at least one network"),
        ('untrusted = "ignore"', "[security] untrusted: expected drop or reject"),
        ("max_trunk_dialogs = 0", "[security] max_trunk_dialogs: must be at least 1"),
    ],
)
def test_security_errors_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        load(write(tmp_path, f"[security]\n{text}\n"), {})
    assert str(error.value).startswith(message)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[emergency]\nprobe_interval = 0.01", r"\[emergency\] probe_interval: 0 \(off\)"),
        ("[default]\nprobe_interval = -1", r"\[default\] probe_interval: must be at least 0"),
        (
            "[emergency]\nprobe_interval = 1\nprobe_timeout = 2",
            r"\[emergency\] probe_timeout: must not exceed probe_interval",
        ),
        ("[default]\nprobe_failures = 0", r"\[default\] probe_failures: must be at least 1"),
        ("[emergency]\nprobe_succeses = 1", r"\[emergency\] probe_succeses: unknown key"),
    ],
)
def test_probe_key_errors(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load(write(tmp_path, text), {})


def test_tls_listener_and_trunks(tmp_path: Path) -> None:
    for name in ("edge.pem", "edge.key", "ca.pem"):
        (tmp_path / name).write_text("placeholder")
    path = write(
        tmp_path,
        '[sip]\nlisten = ["udp:127.0.0.1:5070", "tls:127.0.0.1:5071"]\n'
        '[emergency]\ntrunks = ["sip:192.0.2.1:5061;transport=tls", "sip:192.0.2.2"]\n'
        '[tls]\ncertificate = "edge.pem"\nprivate_key = "edge.key"\nca_file = "ca.pem"\n'
        "[tcp]\nmax_connections_per_ip = 4\nidle_timeout = 200\n",
    )
    config = load(path, {})
    assert config.sip.listen[1] == ListenAddress("tls", "127.0.0.1", 5071)
    assert config.tls.certificate == tmp_path / "edge.pem"
    assert config.tls.verify_client is True
    assert config.tls.minimum_version == "1.2"
    assert config.tcp.max_connections_per_ip == 4
    assert config.tcp.idle_timeout == 200.0
    assert config.tcp.max_connections == 1024


def test_verified_tls_clients_need_a_ca_file(tmp_path: Path) -> None:
    for name in ("edge.pem", "edge.key"):
        (tmp_path / name).write_text("placeholder")
    text = (
        '[sip]\nlisten = ["tls:127.0.0.1:5071"]\n'
        '[tls]\ncertificate = "edge.pem"\nprivate_key = "edge.key"\n'
    )
    with pytest.raises(ConfigError, match=r"\[tls\] ca_file: required"):
        load(write(tmp_path, text), {})
    config = load(write(tmp_path, text + "verify_client = false\n"), {})
    assert config.tls.verify_client is False


def test_open_file_limit_is_raised_to_the_hard_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    lowered = 256
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowered, hard))
    try:
        raised = raise_nofile_limit()
        now, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        assert raised == now and now > lowered
        assert now == hard or hard == resource.RLIM_INFINITY
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_stream_limits_fit_under_a_low_open_file_limit() -> None:
    config = load(None, {})
    assert stream_limits(config, None).max_connections == 1024
    assert stream_limits(config, 100_000).max_connections == 1024
    fitted = stream_limits(config, 512)
    assert fitted.max_connections == 512 - 64 - 256
    assert fitted.trusted_reserve == fitted.max_connections // 4


def test_overload_section_defaults_and_values(tmp_path: Path) -> None:
    defaults = load(None, {}).overload
    assert defaults.max_transactions == 150_000 and defaults.retry_after == 5
    assert defaults.max_queue_delay == 0.1 and defaults.max_queue == 5_000
    assert defaults.queue_delay_sustain == 0.05
    config = load(
        write(
            tmp_path,
            "[overload]\nmax_lag = 0.02\nmax_transactions = 500\nshed_transactions = 400\n"
            "max_queue_delay = 0.25\nqueue_delay_sustain = 0\n",
        ),
        {"E911_SIP__OVERLOAD__MAX_QUEUE": "50"},
    )
    assert config.overload.max_lag == 0.02
    assert config.overload.max_transactions == 500
    assert config.overload.shed_transactions == 400
    assert config.overload.max_queue == 50
    assert config.overload.max_queue_delay == 0.25
    assert config.overload.queue_delay_sustain == 0.0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("max_lag = 'x'", "[overload] max_lag: expected a number"),
        ("max_queue = 20000", "[overload] max_queue: must be below queue_limit"),
        ("shed_transactions = 200000", "[overload] shed_transactions: must not exceed"),
        ("retry_after = 0", "[overload] retry_after: must be at least 1"),
        ("max_queue_delay = 0", "[overload] max_queue_delay: must be at least 0.001"),
        ("queue_delay_sustain = -1", "[overload] queue_delay_sustain: must be at least 0"),
        ("max_transaction = 5", "[overload] max_transaction: unknown key"),
    ],
)
def test_overload_errors_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(write(tmp_path, f"[overload]\n{text}\n"), {})
    assert message in str(info.value)


def test_tls_trunks_get_a_plain_twin_tried_last(tmp_path: Path) -> None:
    for name in ("edge.pem", "edge.key", "ca.pem"):
        (tmp_path / name).write_text("placeholder")
    text = (
        '[sip]\nlisten = ["udp:127.0.0.1:5070", "tls:127.0.0.1:5071"]\n'
        '[emergency]\ntrunks = ["sip:192.0.2.1:5061;transport=tls", '
        '"sip:192.0.2.2:5061;transport=tls", "sip:192.0.2.3"]\n'
        '[tls]\ncertificate = "edge.pem"\nprivate_key = "edge.key"\nca_file = "ca.pem"\n'
    )
    config = load(write(tmp_path, text), {})
    assert config.emergency.fallback_trunks() == ("sip:192.0.2.1:5060", "sip:192.0.2.2:5060")
    with pytest.raises(ConfigError, match=r"\[emergency\] tls_fallback: tcp needs a tcp:HOST"):
        load(write(tmp_path, text), {"E911_SIP__EMERGENCY__TLS_FALLBACK": "tcp"})
    off = load(write(tmp_path, text), {"E911_SIP__EMERGENCY__TLS_FALLBACK": "none"})
    assert off.emergency.fallback_trunks() == ()
    plain = load(None, {})
    assert plain.emergency.fallback_trunks() == ()


def test_emergency_timings_reach_the_proxy_core(tmp_path: Path) -> None:
    text = "[emergency]\nfail_open_after = 0.4\ntrying_after = 0.05\nprovisional_timeout = 1.5\n"
    options = proxy_options(
        load(write(tmp_path, text), {}), (LocalAddress("udp", "127.0.0.1", 5070),)
    )
    assert (options.fail_open_after, options.trying_after) == (0.4, 0.05)
    assert options.provisional_timeout == 1.5
