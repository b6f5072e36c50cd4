"""Where ``e911-sip coverage`` finds the running service and its token."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from e911_sip import cli
from e911_sip.config import Config, ConfigError, ProvisioningConfig, load


def config(**provisioning: object) -> Config:
    return dataclasses.replace(Config(), provisioning=ProvisioningConfig(**provisioning))  # type: ignore[arg-type]


def test_the_url_comes_from_the_flag_else_the_listen_address() -> None:
    assert cli._api_base(config(), "http://api.example:9200/") == "http://api.example:9200"
    assert cli._api_base(config(listen=("127.0.0.1", 9201)), None) == "http://127.0.0.1:9201"
    # A wildcard listener is reached on loopback.
    assert cli._api_base(config(listen=("0.0.0.0", 9202)), None) == "http://127.0.0.1:9202"
    assert cli._api_base(config(listen=("::", 9203)), None) == "http://[::1]:9203"


def test_the_token_comes_from_the_flag_else_the_named_else_the_first_configured() -> None:
    tokens = {"portal": "portal-token-0123456789", "noc": "noc-token-0123456789"}
    assert cli._api_token(config(tokens=tokens), "given-token", None) == "given-token"
    assert cli._api_token(config(tokens=tokens), None, "noc") == "noc-token-0123456789"
    assert cli._api_token(config(tokens=tokens), None, None) == "portal-token-0123456789"
    with pytest.raises(ConfigError, match="no token named 'ops'"):
        cli._api_token(config(tokens=tokens), None, "ops")
    with pytest.raises(ConfigError, match="tokens: empty"):
        cli._api_token(config(), None, None)


def test_an_unreachable_service_is_exit_1(capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(
        ["coverage", "--url", "http://127.0.0.1:9", "--token", "x" * 20, "--timeout", "5"]
    )
    assert code == 1
    assert "coverage could not be read" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("coverage_alert_below = 1.5", r"\[provisioning\] coverage_alert_below: a share"),
        ("coverage_alert_below = -0.1", r"\[provisioning\] coverage_alert_below: must be at least"),
        ("coverage_interval = 0.5", r"\[provisioning\] coverage_interval: must be at least 1"),
    ],
)
def test_coverage_keys_are_checked(tmp_path: Path, text: str, error: str) -> None:
    path = tmp_path / "e911.toml"
    path.write_text(f"[provisioning]\n{text}\n")
    with pytest.raises(ConfigError, match=error):
        load(path, {})


def test_coverage_keys_are_read(tmp_path: Path) -> None:
    path = tmp_path / "e911.toml"
    path.write_text("[provisioning]\ncoverage_alert_below = 0.95\ncoverage_interval = 30\n")
    prov = load(path, {}).provisioning
    assert (prov.coverage_alert_below, prov.coverage_interval) == (0.95, 30.0)
    assert Config().provisioning.coverage_alert_below == 0.99
