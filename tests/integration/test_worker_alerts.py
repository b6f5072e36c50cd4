"""The worker alert rules, evaluated by ``promtool test rules`` on the shipped rule file:
E911WorkerRestarted on any restart, E911WorkerDown while fewer workers live than are
configured for two minutes, and neither for a host whose workers all run."""

from __future__ import annotations

from pathlib import Path

from tests.deploy_files import ALERT_RULES, load_yaml
from tests.integration.test_coverage_alert import run_promtool

EDGE = 'job="e911-sip", instance="edge:9100"'
CALM = 'job="e911-sip", instance="calm:9100"'


def rules() -> dict[str, dict[str, object]]:
    return {
        r["alert"]: r for g in load_yaml(ALERT_RULES)["groups"] for r in g["rules"] if "alert" in r
    }


def test_a_worker_restart_warns_and_a_missing_worker_pages(tmp_path: Path) -> None:
    series = [
        # Slot 1 of "edge" dies at minute 3 and again at 5; it is live again from minute 9.
        {
            "series": f'e911_sip_worker_restarts_total{{{EDGE}, worker="1"}}',
            "values": "0 0 0 1 1 2 2 2 2 2x20",
        },
        {"series": f'e911_sip_workers{{{EDGE}, state="configured"}}', "values": "2x30"},
        {
            "series": f'e911_sip_workers{{{EDGE}, state="live"}}',
            "values": "2 2 2 1 1 1 1 1 1 2x20",
        },
        # "calm" never loses a worker.
        {"series": f'e911_sip_worker_restarts_total{{{CALM}, worker="1"}}', "values": "0x30"},
        {"series": f'e911_sip_workers{{{CALM}, state="configured"}}', "values": "4x30"},
        {"series": f'e911_sip_workers{{{CALM}, state="live"}}', "values": "4x30"},
    ]
    edge = {"job": "e911-sip", "instance": "edge:9100"}
    described = rules()
    result = run_promtool(
        tmp_path,
        [
            {
                "interval": "1m",
                "input_series": series,
                "alert_rule_test": [
                    {"eval_time": "2m", "alertname": "E911WorkerRestarted", "exp_alerts": []},
                    {
                        "eval_time": "6m",
                        "alertname": "E911WorkerRestarted",
                        "exp_alerts": [
                            {
                                "exp_labels": {**edge, "worker": "1", "severity": "warning"},
                                "exp_annotations": {
                                    "summary": "An edge worker died and was started again on "
                                    "edge:9100 (slot 1)",
                                    "description": described["E911WorkerRestarted"]["annotations"][
                                        "description"
                                    ],  # type: ignore[index]
                                },
                            }
                        ],
                    },
                    {"eval_time": "25m", "alertname": "E911WorkerRestarted", "exp_alerts": []},
                    # Live below configured from minute 3; pages after its 2 minutes.
                    {"eval_time": "4m", "alertname": "E911WorkerDown", "exp_alerts": []},
                    {
                        "eval_time": "6m",
                        "alertname": "E911WorkerDown",
                        "exp_alerts": [
                            {
                                "exp_labels": {**edge, "severity": "critical"},
                                "exp_annotations": {
                                    "summary": "edge:9100 runs fewer edge workers than configured",
                                    "description": described["E911WorkerDown"]["annotations"][
                                        "description"
                                    ],  # type: ignore[index]
                                },
                            }
                        ],
                    },
                    {"eval_time": "12m", "alertname": "E911WorkerDown", "exp_alerts": []},
                ],
            }
        ],
    )
    assert result.returncode == 0, result.stdout + result.stderr
