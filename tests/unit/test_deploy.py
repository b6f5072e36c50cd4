"""The local monitoring stack's files agree with each other and with the repository:
compose.yaml, the Prometheus scrape config, Grafana's provisioning and the dashboard.

Docker is not needed: these read the files. tests/integration/test_monitoring.py runs the
real Prometheus against a real edge.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Any

import pytest
import trustme

from e911_sip.app import check_role
from e911_sip.config import load
from e911_sip.roles import Role
from tests.certs import issue
from tests.deploy_files import (
    ALERT_RULES,
    COMPOSE,
    DASHBOARD_DIR,
    GRAFANA_PROVISIONING,
    PROMETHEUS_CONFIG,
    ROOT,
    bind_mounts,
    dashboard_panels,
    dashboards,
    host_path,
    load_yaml,
)

_INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}")


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
def compose() -> dict[str, Any]:
    document = load_yaml(COMPOSE)
    assert isinstance(document, dict)
    result: dict[str, Any] = interpolate(document)
    return result


def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    result: dict[str, dict[str, Any]] = compose["services"]
    return result


def address(service: dict[str, Any]) -> ipaddress.IPv4Address:
    (network,) = service["networks"].values()
    return ipaddress.IPv4Address(network["ipv4_address"])


def test_the_stack_has_every_service(compose: dict[str, Any]) -> None:
    assert set(services(compose)) >= {
        "edge",
        "provisioning",
        "redis",
        "prometheus",
        "grafana",
        "trunk",
        "sipp",
    }
    edge, provisioning = services(compose)["edge"], services(compose)["provisioning"]
    assert edge["command"][:3] == ["serve", "--role", "edge"]
    assert provisioning["command"][:3] == ["serve", "--role", "provisioning"]
    redis_command = services(compose)["redis"]["command"]
    assert redis_command[redis_command.index("--appendonly") + 1] == "yes"


def test_compose_refers_only_to_files_that_exist(compose: dict[str, Any]) -> None:
    checked = 0
    for name, service in services(compose).items():
        build = service.get("build")
        if build is not None:
            context = ROOT / (build if isinstance(build, str) else build["context"])
            assert context.is_dir(), f"{name}: build context {context}"
            dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile")
            assert (context / (dockerfile or "Dockerfile")).is_file(), f"{name}: Dockerfile"
            checked += 1
        for source, target in bind_mounts(service):
            assert (ROOT / source).exists(), f"{name}: {source} (mounted at {target})"
            checked += 1
        for env_file in service.get("env_file", []):
            assert (ROOT / env_file).is_file(), f"{name}: env_file {env_file}"
    assert checked >= 12


def test_fixed_addresses_are_in_the_subnet_and_distinct(compose: dict[str, Any]) -> None:
    (network,) = compose["networks"].values()
    (pool,) = network["ipam"]["config"]
    subnet = ipaddress.IPv4Network(pool["subnet"])
    addresses = {name: address(service) for name, service in services(compose).items()}
    assert len(set(addresses.values())) == len(addresses)
    for name, ip in addresses.items():
        assert ip in subnet, f"{name}: {ip} outside {subnet}"


def test_the_edge_trusts_the_caller_and_sends_to_the_trunk(compose: dict[str, Any]) -> None:
    """The SIPp caller stands in for the softswitch and must be trusted; nothing else in the
    stack may be; the trunk the edge sends to is the SIPp trunk; the caller calls the edge."""
    every = services(compose)
    env = every["edge"]["environment"]
    trusted = [
        ipaddress.ip_network(cidr)
        for cidr in re.findall(r'"([^"]+)"', env["E911_SIP__SECURITY__TRUSTED_SOURCES"])
    ]
    caller, trunk, edge = every["sipp"], every["trunk"], every["edge"]
    assert any(address(caller) in net for net in trusted)
    for name in ("redis", "provisioning", "prometheus", "grafana", "trunk", "edge"):
        assert not any(address(every[name]) in net for net in trusted), name
    assert env["E911_SIP__SIP__ADVERTISE"] == str(address(edge))
    trunk_port = trunk["command"][trunk["command"].index("-p") + 1]
    for key in ("E911_SIP__EMERGENCY__TRUNKS", "E911_SIP__DEFAULT__TRUNKS"):
        assert env[key] == f'["sip:{address(trunk)}:{trunk_port}"]'
    assert caller["command"][0] == f"{address(edge)}:5070"
    for service in (caller, trunk):
        assert service["command"][service["command"].index("-i") + 1] == str(address(service))
        scenario = service["command"][service["command"].index("-sf") + 1]
        path = host_path(scenario, bind_mounts(service))
        assert path is not None and path.is_file(), scenario


@pytest.mark.parametrize("role", ["edge", "provisioning"])
def test_compose_environment_is_a_valid_configuration(
    compose: dict[str, Any], role: str, tmp_path: Path
) -> None:
    """The container config plus the service's environment loads and suits its role; the
    TLS files are the ones deploy/make-certs.sh would mount, made here by trustme."""
    service = services(compose)[role]
    config_path = host_path(service["command"][-1], bind_mounts(service))
    assert config_path is not None and config_path.is_file()
    tls_target = "/etc/e911-sip/tls"
    assert host_path(tls_target, bind_mounts(service)) == (ROOT / "deploy" / "tls").resolve()
    pair = issue(trustme.CA(), tmp_path, "server", "edge", "provisioning")
    env = dict(service["environment"])
    for section in ("HTTP", "PROVISIONING"):
        env[f"E911_SIP__{section}__TLS_CERT_FILE"] = str(pair.cert)
        env[f"E911_SIP__{section}__TLS_KEY_FILE"] = str(pair.key)
    config = load(config_path, env)
    check_role(config, Role(role))
    assert config.store.url == "redis://redis:6379/0"
    assert config.http.listen[1] == 9100 and config.http.tls is not None
    if role == "provisioning":
        assert config.provisioning.state_url.startswith("redis://")
        assert config.provisioning.audit_url.startswith("redis://")


def test_prometheus_loads_the_shipped_rules_and_scrapes_both_roles(
    compose: dict[str, Any],
) -> None:
    prometheus = services(compose)["prometheus"]
    mounts = bind_mounts(prometheus)
    config_arg = next(a for a in prometheus["command"] if a.startswith("--config.file="))
    assert host_path(config_arg.split("=", 1)[1], mounts) == PROMETHEUS_CONFIG.resolve()
    config = load_yaml(PROMETHEUS_CONFIG)
    assert [host_path(p, mounts) for p in config["rule_files"]] == [ALERT_RULES.resolve()]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    # E911EdgeDown selects up{job="e911-sip"}.
    assert 'job="e911-sip"' in ALERT_RULES.read_text(encoding="utf-8")
    for job_name, service in (("e911-sip", "edge"), ("e911-sip-provisioning", "provisioning")):
        job = jobs[job_name]
        assert job["scheme"] == "https"
        ca = host_path(job["tls_config"]["ca_file"], mounts)
        assert ca == (ROOT / "deploy" / "tls" / "ca.crt").resolve()
        (static,) = job["static_configs"]
        assert static["targets"] == [f"{service}:9100"]
    # The provisioning process never sets the edge's gauges (store_up stays 0): keep only
    # its own series, or E911StoreDown would page for it.
    (keep,) = jobs["e911-sip-provisioning"]["metric_relabel_configs"]
    assert keep["action"] == "keep"
    pattern = re.compile(keep["regex"])
    assert pattern.fullmatch("e911_sip_provisioning_operations_total")
    assert pattern.fullmatch("process_resident_memory_bytes")
    assert not pattern.fullmatch("e911_sip_store_up")


def test_grafana_is_provisioned_with_the_datasource_and_dashboard(
    compose: dict[str, Any],
) -> None:
    grafana = services(compose)["grafana"]
    mounts = bind_mounts(grafana)
    assert host_path("/etc/grafana/provisioning", mounts) == GRAFANA_PROVISIONING.resolve()
    (datasource,) = load_yaml(GRAFANA_PROVISIONING / "datasources" / "prometheus.yml")[
        "datasources"
    ]
    assert datasource["url"] == "http://prometheus:9090"
    (provider,) = load_yaml(GRAFANA_PROVISIONING / "dashboards" / "e911-sip.yml")["providers"]
    assert host_path(provider["options"]["path"], mounts) == DASHBOARD_DIR.resolve()
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    home_file = host_path(home, mounts)
    assert home_file is not None and home_file.is_file()

    found = dashboards()
    assert found, "no dashboard JSON"
    for path, dashboard in found.items():
        ids: list[int] = []
        for panel in dashboard_panels(dashboard):
            ids.append(panel["id"])
            grid = panel["gridPos"]
            assert grid["x"] + grid["w"] <= 24, panel["title"]
            assert not re.search(r"placeholder|todo|tbd", panel["title"], re.IGNORECASE)
            if panel["type"] == "row":
                continue
            assert panel["datasource"]["uid"] == datasource["uid"], panel["title"]
            assert panel["targets"], panel["title"]
            for target in panel["targets"]:
                assert target["datasource"]["uid"] == datasource["uid"], panel["title"]
        assert len(ids) == len(set(ids)), f"{path.name}: duplicate panel ids"


def test_the_dashboard_covers_what_the_edge_measures() -> None:
    (dashboard,) = dashboards().values()
    text = " ".join(
        target["expr"]
        for panel in dashboard_panels(dashboard)
        for target in panel.get("targets", [])
    )
    for metric in (
        "e911_sip_emergency_calls_total",
        "e911_sip_emergency_enrich_seconds_bucket",
        "e911_sip_trunk_failovers_total",
        "e911_sip_trunk_up",
        "e911_sip_trunk_probes_total",
        "e911_sip_store_up",
        "e911_sip_store_breaker_state",
        "e911_sip_store_lookup_failures_total",
        "e911_sip_location_sync_age_seconds",
        "e911_sip_location_records",
        "e911_sip_requests_total",
        "e911_sip_messages_discarded_total",
        "e911_sip_stream_connections_closed_total",
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "e911_sip_coverage_share",
        "e911_sip_coverage_lines",
        "e911_sip_coverage_endpoints_failed",
        "e911_sip_notifications_total",
        "e911_sip_notification_latency_seconds_bucket",
        "e911_sip_notification_dead_letters",
        "e911_sip_dialogs",
        "e911_sip_transactions_working",
        "e911_sip_worker_restarts_total",
        "e911_sip_recovered_total",
    ):
        assert metric in text, metric


def test_the_sipp_image_installs_debian_sipp() -> None:
    dockerfile = (ROOT / "deploy" / "sipp" / "Dockerfile").read_text(encoding="utf-8")
    assert re.search(r"apt-get install .*\bsip-tester\b", dockerfile)
