"""bench/run_load.py's command line: the edge settings it writes into the edge's configuration."""

from __future__ import annotations

import pytest
from bench.run_load import _store_text, parse_args


def test_edge_settings_become_nested_tables_of_typed_values() -> None:
    options = parse_args(
        [
            "--edge-set",
            "records.enabled=false",
            "--edge-set",
            'log.level="WARNING"',
            "--edge-set",
            "notify.delivery.timeout=2.5",
        ]
    )
    assert options.edge_overrides() == {
        "records": {"enabled": False},
        "log": {"level": "WARNING"},
        "notify": {"delivery": {"timeout": 2.5}},
    }
    text = _store_text(options)
    assert 'records.enabled = false, log.level = "WARNING"' in text


def test_no_edge_settings_leave_the_configuration_alone() -> None:
    options = parse_args([])
    assert options.edge_overrides() == {}
    assert "also sets" not in _store_text(options)


@pytest.mark.parametrize("text", ["records=false", "records.enabled", ".x=1", "log.level=WARNING"])
def test_a_malformed_edge_setting_is_refused(text: str) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--edge-set", text])
