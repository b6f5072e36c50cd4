"""The monitoring files against the real thing: every metric the dashboard and the alert rules
name is on a running edge's /metrics, promtool accepts the rules and the scrape config, and a
real Prometheus scraping a real edge over HTTPS (certificates from deploy/make-certs.sh)
fires E911StoreDown when Redis stops.

Prometheus is Debian's ``prometheus`` package (``promtool`` comes with it); like redis-server
and SIPp, a missing binary fails the test with the package to install.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy_files import (
    ALERT_RULES,
    MAKE_CERTS,
    PROMETHEUS_CONFIG,
    alert_exprs,
    dashboard_queries,
    dashboards,
    load_yaml,
    missing_metrics,
    referenced_metrics,
)
from tests.integration.harness import (
    LOOPBACK,
    EdgeProcess,
    RedisServer,
    edge_config,
    free_port,
    free_port_pair,
    trunk_uri,
)

EdgeFactory = Callable[..., EdgeProcess]


def require(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        pytest.fail(
            f"{binary} is not installed; the monitoring tests need it "
            "(Debian: apt-get install --no-install-recommends prometheus; scripts/check "
            "installs it)",
            pytrace=False,
        )
    return path


def wait_for(condition: Callable[[], Any], what: str, timeout: float) -> Any:
    """Poll ``condition`` until it returns something truthy (returned); fail after
    ``timeout`` seconds with ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


def every_query() -> list[str]:
    queries = [q for d in dashboards().values() for q in dashboard_queries(d)]
    return queries + list(alert_exprs().values())


def plain_edge(edge_factory: EdgeFactory, store_url: str, **overrides: Any) -> EdgeProcess:
    return edge_factory(
        edge_config(
            sip_port=free_port_pair(),
            http_port=free_port("tcp"),
            emergency_trunks=[trunk_uri(free_port("udp"))],
            default_trunks=[trunk_uri(free_port("udp"))],
            store_url=store_url,
            **overrides,
        )
    )


# ------------------------------------------------------------------- metric names


def test_every_metric_the_dashboard_and_alerts_use_is_exposed(
    edge_factory: EdgeFactory, redis_server: RedisServer
) -> None:
    edge = plain_edge(edge_factory, redis_server.url)
    referenced = referenced_metrics(every_query())
    # Enough to be sure the scan found the dashboard's and the rules' names at all.
    assert len(referenced) >= 20, sorted(referenced)
    assert "e911_sip_emergency_enrich_seconds_bucket" in referenced
    assert "e911_sip_store_up" in referenced
    # The worker series (restarts, live workers) come from an edge with workers only.
    missing = missing_metrics(referenced, edge.metrics())
    assert missing <= {"e911_sip_workers", "e911_sip_worker_restarts_total"}, missing
    if missing:
        supervisor = plain_edge(edge_factory, redis_server.url, sip={"workers": 2})
        assert missing_metrics(missing, supervisor.metrics()) == set()


def test_a_misspelt_metric_is_reported_missing(
    edge_factory: EdgeFactory, redis_server: RedisServer
) -> None:
    """The check above can fail: a name the edge does not export, or a suffix its type
    does not have, is caught."""
    edge = plain_edge(edge_factory, redis_server.url)
    exposition = edge.metrics()
    wrong = {
        "e911_sip_emergency_call_total",  # the real one is ..._calls_total
        "e911_sip_store_up_bucket",  # a gauge has no buckets
        "e911_sip_location_records_total",
    }
    assert missing_metrics(wrong | {"e911_sip_store_lookup_seconds_count"}, exposition) == wrong


# -------------------------------------------------------------------------- promtool


def test_promtool_accepts_the_alert_rules() -> None:
    promtool = require("promtool")
    result = subprocess.run(
        [promtool, "check", "rules", str(ALERT_RULES)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def test_promtool_accepts_the_shipped_scrape_config(tmp_path: Path) -> None:
    """deploy/prometheus/prometheus.yml with its rule file at the path the compose mount
    puts it (promtool reads and checks rule files too)."""
    promtool = require("promtool")
    config = load_yaml(PROMETHEUS_CONFIG)
    config["rule_files"] = [str(ALERT_RULES)]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    result = subprocess.run(
        [promtool, "check", "config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------- a real Prometheus


@dataclass(frozen=True)
class Certificates:
    ca: Path
    cert: Path
    key: Path


def make_certs(directory: Path) -> Certificates:
    """Run deploy/make-certs.sh, as someone standing up the stack would."""
    require("openssl")
    result = subprocess.run(
        ["bash", str(MAKE_CERTS), str(directory)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return Certificates(
        ca=directory / "ca.crt", cert=directory / "server.crt", key=directory / "server.key"
    )


def fast_rules(path: Path) -> Path:
    """A copy of the shipped rules with every ``for:`` cut to 1s.

    The shipped E911StoreDown waits ``for: 30s``; the expression, labels and everything
    else are the shipped ones, so the test still proves that rule fires on this edge's
    series, without holding the suite for half a minute.
    """
    rules = load_yaml(ALERT_RULES)
    for group in rules["groups"]:
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = "1s"
    path.write_text(yaml.safe_dump(rules, sort_keys=False), encoding="utf-8")
    return path


class PrometheusServer:
    """A real ``prometheus`` on 127.0.0.1 with its own directory, stopped by PID."""

    def __init__(self, workdir: Path, config: dict[str, Any]) -> None:
        self.binary = require("prometheus")
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port("tcp")
        self.config_path = self.dir / "prometheus.yml"
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        self.log_path = self.dir / "prometheus.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    def start(self, timeout: float = 60.0) -> None:
        self._log = self.log_path.open("ab")
        self._proc = subprocess.Popen(
            [
                self.binary,
                f"--config.file={self.config_path}",
                f"--storage.tsdb.path={self.dir / 'data'}",
                f"--web.listen-address={LOOPBACK}:{self.port}",
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=self.dir,
        )

        def ready() -> bool:
            if self._proc is not None and self._proc.poll() is not None:
                pytest.fail(f"prometheus exited:\n{self.log()}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(self.url("/-/ready"), timeout=2) as response:
                    return bool(response.status == 200)
            return False

        wait_for(ready, "prometheus to be ready", timeout)

    def url(self, path: str, **query: str) -> str:
        suffix = f"?{urllib.parse.urlencode(query)}" if query else ""
        return f"http://{LOOPBACK}:{self.port}{path}{suffix}"

    def api(self, path: str, **query: str) -> Any:
        """``data`` of a successful API answer; fails the test with Prometheus's error."""
        try:
            with urllib.request.urlopen(self.url(path, **query), timeout=10) as response:
                body = json.load(response)
        except urllib.error.HTTPError as exc:
            body = json.load(exc)
        assert body["status"] == "success", f"{path} {query}: {body}"
        return body["data"]

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")[-4000:]

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=10)
        if self._log is not None:
            self._log.close()
            self._log = None


@pytest.fixture
def prometheus_factory(tmp_path: Path) -> Iterator[Callable[[dict[str, Any]], PrometheusServer]]:
    started: list[PrometheusServer] = []

    def start(config: dict[str, Any]) -> PrometheusServer:
        server = PrometheusServer(tmp_path / f"prometheus-{len(started)}", config)
        started.append(server)
        server.start()
        return server

    try:
        yield start
    finally:
        for server in started:
            server.stop()


def grafana_to_promql(query: str) -> str:
    """A dashboard query as Prometheus would get it from Grafana: the variables filled in,
    and ``label_values(SELECTOR, label)`` (Grafana's, not PromQL) reduced to its selector."""
    if query.startswith("label_values(") and query.endswith(")"):
        query = query[len("label_values(") : -1].rsplit(",", 1)[0]
    return query.replace("$__rate_interval", "1m").replace("$instance", ".*")


def alerts(prometheus: PrometheusServer, name: str) -> list[dict[str, Any]]:
    return [
        alert
        for alert in prometheus.api("/api/v1/alerts")["alerts"]
        if alert["labels"]["alertname"] == name
    ]


def rule_state(prometheus: PrometheusServer, name: str) -> dict[str, Any]:
    for group in prometheus.api("/api/v1/rules")["groups"]:
        for rule in group["rules"]:
            if rule.get("name") == name:
                result: dict[str, Any] = rule
                return result
    pytest.fail(f"Prometheus has no rule {name}")


def test_prometheus_scrapes_both_roles_over_https_and_fires_store_down(
    tmp_path: Path,
    edge_factory: EdgeFactory,
    redis_server: RedisServer,
    prometheus_factory: Callable[[dict[str, Any]], PrometheusServer],
) -> None:
    """The stack as compose.yaml runs it, on loopback: an edge and a provisioning process
    sharing Redis, scraped by the shipped jobs with the shipped rules."""
    certs = make_certs(tmp_path / "tls")
    context = ssl.create_default_context(cafile=str(certs.ca))
    https = {"tls_cert_file": str(certs.cert), "tls_key_file": str(certs.key)}

    def start(role: str, **tables: Any) -> EdgeProcess:
        return edge_factory(
            edge_config(
                sip_port=free_port_pair(),
                http_port=free_port("tcp"),
                emergency_trunks=[trunk_uri(free_port("udp"))],
                default_trunks=[trunk_uri(free_port("udp"))],
                store_url=redis_server.url,
                http=https,
                **tables,
            ),
            command=[sys.executable, "-m", "e911_sip", "serve", "--role", role]
            + ["--config", "{config}"],
            ssl_context=context,
        )

    edge = start("edge")
    provisioning = start(
        "provisioning",
        provisioning={
            "listen": f"{LOOPBACK}:{free_port('tcp')}",
            "tokens": {"monitoring": "monitoring-token-0123456789"},
        },
    )
    # Without an edge in it, the provisioning process exports the edge's trunk and location
    # gauges unset: the shipped job keeps them out (see deploy/prometheus/prometheus.yml).
    # The shipped jobs, pointed at these processes and this CA file.
    shipped = load_yaml(PROMETHEUS_CONFIG)
    addresses = {
        "edge:9100": f"{LOOPBACK}:{edge.http_port}",
        "provisioning:9100": f"{LOOPBACK}:{provisioning.http_port}",
    }
    jobs = [j for j in shipped["scrape_configs"] if j["job_name"].startswith("e911-sip")]
    for job in jobs:
        job["tls_config"]["ca_file"] = str(certs.ca)
        for static in job["static_configs"]:
            static["targets"] = [addresses[target] for target in static["targets"]]
    prometheus = prometheus_factory(
        {
            "global": {
                "scrape_interval": "1s",
                "scrape_timeout": "1s",
                "evaluation_interval": "1s",
            },
            "rule_files": [str(fast_rules(tmp_path / "rules.yml"))],
            "scrape_configs": jobs,
        }
    )
    instance = addresses["edge:9100"]

    def query(promql: str) -> list[Any]:
        result: list[Any] = prometheus.api("/api/v1/query", query=promql)["result"]
        return result

    # Both scraped over HTTPS, verified against the CA make-certs.sh wrote.
    wait_for(
        lambda: query('process_resident_memory_bytes{job="e911-sip-provisioning"}'),
        "a scrape of the provisioning process",
        60,
    )
    assert query('{job="e911-sip-provisioning", __name__=~"e911_sip_(store|location)_.*"}') == []

    (sample,) = wait_for(
        lambda: query(f'e911_sip_store_up{{job="e911-sip", instance="{instance}"}}'),
        "a scrape of the edge's e911_sip_store_up",
        60,
    )
    assert sample["value"][1] == "1"
    seen_up = time.time()
    # Every dashboard query is valid PromQL that Prometheus evaluates.
    for text in (q for d in dashboards().values() for q in dashboard_queries(d)):
        promql = grafana_to_promql(text)
        assert "$" not in promql, text
        query(promql)

    # Inactive while the store answers: evaluated after the sample above, with no error.
    def evaluated_inactive() -> dict[str, Any] | None:
        rule = rule_state(prometheus, "E911StoreDown")
        last = rule.get("lastEvaluation", "")
        stamp = _timestamp(last) if last and not last.startswith("0001") else 0.0
        return rule if stamp > seen_up else None

    rule = wait_for(evaluated_inactive, "an evaluation of E911StoreDown", 60)
    assert rule["health"] == "ok" and rule["state"] == "inactive", rule
    assert alerts(prometheus, "E911StoreDown") == []
    for group in prometheus.api("/api/v1/rules")["groups"]:
        for each in group["rules"]:
            assert each["health"] in ("ok", "unknown"), each

    redis_server.stop()

    def firing() -> list[dict[str, Any]]:
        return [a for a in alerts(prometheus, "E911StoreDown") if a["state"] == "firing"]

    (alert,) = wait_for(firing, "E911StoreDown to fire after Redis stopped", 90)
    assert alert["labels"]["instance"] == instance
    assert alert["labels"]["job"] == "e911-sip"
    assert alert["labels"]["severity"] == "critical"
    assert edge.metric("e911_sip_store_up") == 0


_RFC3339 = re.compile(r"^([^.]+?)(\.\d+)?(Z|[+-]\d\d:\d\d)$")


def _timestamp(rfc3339: str) -> float:
    """Seconds since the epoch of a Prometheus time (RFC 3339, nanoseconds, any offset)."""
    match = _RFC3339.match(rfc3339)
    assert match is not None, rfc3339
    head, fraction, offset = match.groups()
    moment = datetime.fromisoformat(head + ("+00:00" if offset == "Z" else offset))
    return moment.timestamp() + (float(fraction) if fraction else 0.0)
