"""deploy/hosts/: the two-host example (systemd units, environment files, the lab compose
file) agrees with itself, with the Dockerfile and with the configuration loader.

Nothing here needs Docker or systemd: the files are read and each configuration they make
is loaded (and checked with ``e911-sip check-config``) as the process would load it.
"""

from __future__ import annotations

import configparser
import ipaddress
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import trustme

from e911_sip.app import check_role
from e911_sip.cli import main
from e911_sip.config import Config, load
from e911_sip.roles import Role
from tests.certs import issue
from tests.deploy_files import ROOT, bind_mounts, load_yaml

HOSTS = ROOT / "deploy" / "hosts"
CONFIG = HOSTS / "e911-sip.toml"
EDGE_ENVS = ("edge-a.env", "edge-b.env")
_INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}")


def env_file(path: Path) -> dict[str, str]:
    """A systemd EnvironmentFile (the subset these files use): ``KEY=value`` lines, ``#``
    comments, a value optionally in single or double quotes."""
    out: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep and re.fullmatch(r"[A-Z_][A-Z0-9_]*", key), line
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        else:
            assert not any(c in value for c in " '\"\\$"), f"quote this value: {line}"
        out[key] = value
    return out


def unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=True)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string((HOSTS / name).read_text(encoding="utf-8"))
    return parser


def with_tls(env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    """``env`` plus test-made files standing in for /etc/e911-sip/tls/server.{crt,key} and
    dialog.key."""
    pair = issue(trustme.CA(), tmp_path, "server", "edge-a", "edge-b")
    key = tmp_path / "dialog.key"
    key.write_text("bWFkZSBmb3IgdGhlIHRlc3Qgb2YgdGhlIGhvc3RzIGNvbmZpZw==\n")
    env = dict(env)
    env["E911_SIP__SECURITY__DIALOG_KEY_FILE"] = str(key)
    for section in ("HTTP", "PROVISIONING"):
        env[f"E911_SIP__{section}__TLS_CERT_FILE"] = str(pair.cert)
        env[f"E911_SIP__{section}__TLS_KEY_FILE"] = str(pair.key)
    return env


def interpolate(value: Any) -> Any:
    """Compose's ``${NAME:-default}`` with nothing set in the environment."""
    if isinstance(value, str):
        return _INTERPOLATION.sub(lambda m: m.group(2) or "", value)
    if isinstance(value, list):
        return [interpolate(v) for v in value]
    if isinstance(value, dict):
        return {k: interpolate(v) for k, v in value.items()}
    return value


@pytest.fixture(scope="module")
def compose() -> dict[str, dict[str, Any]]:
    document = interpolate(load_yaml(HOSTS / "compose.yaml"))
    services: dict[str, dict[str, Any]] = document["services"]
    return services


def address(service: dict[str, Any]) -> str:
    (network,) = service["networks"].values()
    value: str = network["ipv4_address"]
    return value


# -------------------------------------------------------------------- systemd hosts


@pytest.mark.parametrize("name", EDGE_ENVS)
def test_each_host_passes_check_config(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    env = with_tls(env_file(HOSTS / name), tmp_path)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert main(["check-config", "--config", str(CONFIG)]) == 0, capsys.readouterr().err
    config = load(CONFIG, env)
    check_role(config, Role.EDGE)
    assert config.sip.advertise == env["E911_SIP__SIP__ADVERTISE"]


def test_the_hosts_differ_only_in_their_address(tmp_path: Path) -> None:
    a, b = (load(CONFIG, with_tls(env_file(HOSTS / n), tmp_path / n)) for n in EDGE_ENVS)
    assert a.sip.advertise != b.sip.advertise
    for config in (a, b):
        # Listening on every interface, reached at the advertised one.
        assert {listen.host for listen in config.sip.listen} == {"0.0.0.0"}
        assert config.store.url.startswith("redis://")
    assert a.emergency.trunks == b.emergency.trunks and len(a.emergency.trunks) >= 2
    assert a.default.trunks == b.default.trunks
    assert a.security.trusted_sources == b.security.trusted_sources
    assert a.store.url == b.store.url


def test_the_host_config_drains_for_the_softswitchs_keepalive_and_every_call(
    tmp_path: Path,
) -> None:
    shutdown = load(CONFIG, with_tls({}, tmp_path)).shutdown
    assert shutdown.min_drain_time > 0  # the keepalive sees the OPTIONS 503
    assert shutdown.emergency_drain_timeout >= shutdown.dialog_drain_timeout > 0


def test_provisioning_host_config_suits_its_role(tmp_path: Path) -> None:
    env = with_tls(env_file(HOSTS / "provisioning.env"), tmp_path)
    config = load(CONFIG, env)
    check_role(config, Role.PROVISIONING)
    assert config.provisioning.state_url.startswith("redis://")
    assert config.provisioning.audit_url.startswith("redis://")
    assert config.records.store_url.startswith("redis://")
    assert config.bandwidth.client.api_base.startswith("https://")
    assert config.bandwidth.client.account_id == "9900001"


def _stop_seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+)(s|min)?", value)
    assert match, value
    return int(match.group(1)) * (60 if match.group(2) == "min" else 1)


@pytest.mark.parametrize(
    ("name", "role", "environment"),
    [
        ("e911-sip-edge.service", "edge", "/etc/e911-sip/edge.env"),
        ("e911-sip-provisioning.service", "provisioning", "/etc/e911-sip/provisioning.env"),
    ],
)
def test_systemd_units_run_the_shipped_config_and_outlast_the_drain(
    name: str, role: str, environment: str, tmp_path: Path
) -> None:
    service = unit(name)["Service"]
    argv = shlex.split(service["ExecStart"])
    assert argv[0].endswith("/e911-sip") and argv[1] == "serve"
    assert argv[argv.index("--role") + 1] == role
    assert argv[argv.index("--config") + 1] == "/etc/e911-sip/e911-sip.toml"
    assert service["EnvironmentFile"] == environment
    assert service["KillSignal"] == "SIGTERM"
    # The image's user, so files made for the container (uid 10911, user e911) fit here too.
    assert service["User"] == "e911"
    assert "USER e911" in (ROOT / "Dockerfile").read_text()
    if role == "edge":
        shutdown = load(CONFIG, with_tls({}, tmp_path)).shutdown
        longest = max(
            shutdown.drain_timeout, shutdown.emergency_drain_timeout, shutdown.dialog_drain_timeout
        )
        assert _stop_seconds(service["TimeoutStopSec"]) > longest
        assert service["KillMode"] == "mixed"  # SIGTERM to the main process only


# ------------------------------------------------------------------------- the lab


def test_lab_has_two_edges_a_replicated_redis_and_a_sentinel_quorum(
    compose: dict[str, dict[str, Any]],
) -> None:
    edges = [
        s for s in compose.values() if s.get("command", [None])[:3] == ["serve", "--role", "edge"]
    ]
    assert len(edges) == 2
    primary = address(compose["redis-a"])
    replica = compose["redis-b"]["command"]
    assert replica[replica.index("--replicaof") + 1 :][:2] == [primary, "6379"]
    sentinels = [s for n, s in compose.items() if n.startswith("sentinel-")]
    assert len(sentinels) == 3
    for sentinel in sentinels:
        script = sentinel["command"][-1]
        monitor = re.search(r"sentinel monitor (\S+) (\S+) (\d+) (\d+)", script)
        assert monitor is not None, script
        assert monitor.group(2) == primary and monitor.group(3) == "6379"
        quorum = int(monitor.group(4))
        assert len(sentinels) // 2 < quorum <= len(sentinels)
    addresses = [address(s) for s in compose.values()]
    assert len(addresses) == len(set(addresses))
    subnet = ipaddress.ip_network("172.30.92.0/24")
    assert all(ipaddress.ip_address(a) in subnet for a in addresses)


def test_lab_refers_only_to_files_that_exist(compose: dict[str, dict[str, Any]]) -> None:
    for name, service in compose.items():
        build = service.get("build")
        if build is not None:
            context = (HOSTS / build["context"]).resolve()
            assert (context / build.get("dockerfile", "Dockerfile")).is_file(), name
        for source, _ in bind_mounts(service):
            assert (HOSTS / source).resolve().exists(), f"{name}: {source}"


@pytest.mark.parametrize("name", ["edge-a", "edge-b", "provisioning"])
def test_lab_services_load_the_host_config_with_their_environment(
    compose: dict[str, dict[str, Any]], name: str, tmp_path: Path
) -> None:
    service = compose[name]
    mounts = dict((target, source) for source, target in bind_mounts(service))
    config_path = service["command"][-1]
    assert (HOSTS / mounts[config_path]).resolve() == CONFIG
    assert (HOSTS / mounts["/etc/e911-sip/tls"]).resolve() == ROOT / "deploy" / "tls"
    config: Config = load(CONFIG, with_tls(service["environment"], tmp_path))
    role = Role(service["command"][service["command"].index("--role") + 1])
    check_role(config, role)
    trunk = address(compose["trunk"])
    assert config.emergency.trunks == (f"sip:{trunk}:5060",)
    assert config.store.url == f"redis://{address(compose['redis-a'])}:6379/0"
    caller = ipaddress.ip_address(address(compose["caller"]))
    assert any(caller in network for network in config.security.trusted_sources)
    if role is Role.EDGE:
        assert config.sip.advertise == address(service)
        # Compose's stop timeout outlasts the drain, as the unit's TimeoutStopSec does.
        assert _stop_seconds(service["stop_grace_period"]) > config.shutdown.emergency_drain_timeout


def test_systemd_analyze_verify_finds_nothing_to_report(tmp_path: Path) -> None:
    """systemd's own parser, where the machine has it: a misspelt key or value is only a
    warning to systemd (the unit still loads, without it), so any output is a failure."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed; the configparser checks above still ran")
    stub = tmp_path / "e911-sip"
    stub.write_text("#!/bin/sh\n")
    stub.chmod(0o755)
    units = []
    for name in ("e911-sip-edge.service", "e911-sip-provisioning.service"):
        text = (HOSTS / name).read_text(encoding="utf-8")
        assert "/opt/e911-sip/bin/e911-sip " in text
        # verify checks that ExecStart's program exists: a stub stands in for the install.
        (tmp_path / name).write_text(text.replace("/opt/e911-sip/bin/e911-sip", str(stub)))
        units.append(str(tmp_path / name))
    result = subprocess.run(
        [analyze, "verify", *units], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), (
        result.stdout + result.stderr
    )
