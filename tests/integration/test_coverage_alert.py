"""The coverage alert rules, evaluated by ``promtool test rules`` on the shipped rule file:
E911CoverageLow fires when a provisioning process's share stays below its exported
threshold, and never for an edge (both gauges 0) or an unset threshold; the shipped
provisioning scrape job keeps the coverage series (they would never reach the rules
otherwise)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import yaml

from tests.deploy_files import ALERT_RULES, PROMETHEUS_CONFIG, load_yaml
from tests.integration.test_monitoring import require

PROV = 'job="e911-sip-provisioning", instance="provisioning:9100"'
EDGE = 'job="e911-sip", instance="edge:9100"'


def run_promtool(tmp_path: Path, tests: list[dict[str, Any]]) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "coverage_test.yml"
    path.write_text(
        yaml.safe_dump(
            {"rule_files": [str(ALERT_RULES)], "evaluation_interval": "1m", "tests": tests}
        ),
        encoding="utf-8",
    )
    return subprocess.run(
        [require("promtool"), "test", "rules", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_coverage_low_fires_below_the_threshold_and_only_there(tmp_path: Path) -> None:
    series = [
        # 95 % covered against 0.99 for 20 minutes: fires after its 10 minutes.
        {"series": f"e911_sip_coverage_share{{{PROV}}}", "values": "0.95x20"},
        {"series": f"e911_sip_coverage_alert_below{{{PROV}}}", "values": "0.99x20"},
        # An edge exports both at 0 and an unset threshold is 0: neither may fire.
        {"series": f"e911_sip_coverage_share{{{EDGE}}}", "values": "0x20"},
        {"series": f"e911_sip_coverage_alert_below{{{EDGE}}}", "values": "0x20"},
        {"series": f"e911_sip_coverage_endpoints_failed{{{PROV}}}", "values": "1x20"},
        {"series": f"e911_sip_coverage_endpoints_failed{{{EDGE}}}", "values": "0x20"},
    ]
    labels = {"job": "e911-sip-provisioning", "instance": "provisioning:9100"}
    rules = {
        r["alert"]: r for g in load_yaml(ALERT_RULES)["groups"] for r in g["rules"] if "alert" in r
    }
    result = run_promtool(
        tmp_path,
        [
            {
                "interval": "1m",
                "input_series": series,
                "alert_rule_test": [
                    {"eval_time": "5m", "alertname": "E911CoverageLow", "exp_alerts": []},
                    {
                        "eval_time": "15m",
                        "alertname": "E911CoverageLow",
                        "exp_alerts": [
                            {
                                "exp_labels": {**labels, "severity": "warning"},
                                "exp_annotations": {
                                    "summary": "Only 95% of lines would reach the PSAP with a "
                                    "location (provisioning:9100)",
                                    "description": rules["E911CoverageLow"]["annotations"][
                                        "description"
                                    ],
                                },
                            }
                        ],
                    },
                    {
                        "eval_time": "16m",
                        "alertname": "E911EndpointOrderFailed",
                        "exp_alerts": [
                            {
                                "exp_labels": {**labels, "severity": "warning"},
                                "exp_annotations": {
                                    "summary": "1 Bandwidth endpoint order(s) failed and were "
                                    "not retried successfully on provisioning:9100",
                                    "description": rules["E911EndpointOrderFailed"]["annotations"][
                                        "description"
                                    ],
                                },
                            }
                        ],
                    },
                ],
            }
        ],
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_coverage_at_the_threshold_does_not_fire(tmp_path: Path) -> None:
    series = [
        {"series": f"e911_sip_coverage_share{{{PROV}}}", "values": "0.99x20"},
        {"series": f"e911_sip_coverage_alert_below{{{PROV}}}", "values": "0.99x20"},
    ]
    result = run_promtool(
        tmp_path,
        [
            {
                "interval": "1m",
                "input_series": series,
                "alert_rule_test": [
                    {"eval_time": "20m", "alertname": "E911CoverageLow", "exp_alerts": []}
                ],
            }
        ],
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_provisioning_scrape_job_keeps_the_coverage_and_notification_series() -> None:
    (job,) = [
        j
        for j in load_yaml(PROMETHEUS_CONFIG)["scrape_configs"]
        if j["job_name"] == "e911-sip-provisioning"
    ]
    (keep,) = [r for r in job["metric_relabel_configs"] if r["action"] == "keep"]
    pattern = re.compile(keep["regex"])
    for name in (
        "e911_sip_coverage_share",
        "e911_sip_coverage_alert_below",
        "e911_sip_coverage_lines",
        "e911_sip_coverage_endpoints_failed",
        "e911_sip_notifications_total",
        "e911_sip_notification_dead_letters",
    ):
        assert pattern.fullmatch(name), name
    assert not pattern.fullmatch("e911_sip_store_up")
