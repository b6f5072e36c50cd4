"""bench/run_load.py: its command line (the edge settings it writes into the edge's configuration)
and the rates its long runs confirm."""

from __future__ import annotations

import pytest
from bench.run_load import _store_text, confirm_rates, parse_args


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


def test_confirmations_try_the_best_rate_then_the_middle_then_the_step_below() -> None:
    # The ramp's doubling leaves the next passing rate at half the best: the middle comes
    # first, so a best rate missed by a little is not quoted at half.
    assert confirm_rates([800, 1600, 3200, 6400]) == [6400, 4800, 3200]
    assert confirm_rates([800, 1600, 3200, 4800, 4000]) == [4800, 4400, 4000]


def test_confirmations_need_a_passing_step() -> None:
    assert confirm_rates([]) == []
    assert confirm_rates([800, 800]) == [800]


def test_no_middle_between_adjacent_rates() -> None:
    assert confirm_rates([100, 101]) == [101, 100]
