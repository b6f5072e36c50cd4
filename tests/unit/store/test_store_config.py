"""The [store] pool keys and the [emergency] circuit-breaker keys, as config.py reads them."""

from __future__ import annotations

from typing import Any

import pytest

from e911_sip.config import ConfigError, from_mapping


def config(**sections: dict[str, Any]) -> Any:
    return from_mapping(sections)


def test_defaults() -> None:
    loaded = config()
    assert (loaded.store.pool_size, loaded.store.pool_timeout) == (8, None)
    breaker = loaded.emergency.breaker
    assert breaker.open_for == 1.0
    assert (breaker.failure_ratio, breaker.window) == (0.5, 10.0)
    assert (breaker.min_lookups, breaker.connect_failures) == (20, 1)
    assert breaker.trial_lookups == 3


def test_keys_are_read() -> None:
    loaded = config(
        store={"url": "redis://127.0.0.1:6379/0", "pool_size": 4, "pool_timeout": 0.02},
        emergency={
            "store_cooldown": 2.5,
            "store_failure_ratio": 0.25,
            "store_failure_window": 30,
            "store_min_lookups": 50,
            "store_connect_failures": 2,
            "store_trial_lookups": 5,
        },
    )
    assert (loaded.store.pool_size, loaded.store.pool_timeout) == (4, 0.02)
    breaker = loaded.emergency.breaker
    assert breaker.open_for == 2.5
    assert (breaker.failure_ratio, breaker.window) == (0.25, 30.0)
    assert (breaker.min_lookups, breaker.connect_failures) == (50, 2)
    assert breaker.trial_lookups == 5


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ({"store": {"pool_size": 0}}, r"\[store\] pool_size: must be at least 1"),
        ({"store": {"pool_timeout": 0}}, r"\[store\] pool_timeout: must be at least"),
        ({"store": {"pool_timeout": "soon"}}, r"\[store\] pool_timeout: expected a number"),
        ({"emergency": {"store_failure_ratio": 0}}, r"\[emergency\] store_failure_ratio"),
        ({"emergency": {"store_failure_ratio": 1.5}}, r"\[emergency\] store_failure_ratio"),
        ({"emergency": {"store_min_lookups": 0}}, r"\[emergency\] store_min_lookups"),
        ({"emergency": {"store_connect_failures": 0}}, r"\[emergency\] store_connect_failures"),
        ({"emergency": {"store_trial_lookups": 0}}, r"\[emergency\] store_trial_lookups"),
        ({"emergency": {"store_failure_window": 0}}, r"\[emergency\] store_failure_window"),
    ],
)
def test_bad_values_name_the_key(sections: dict[str, dict[str, Any]], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config(**sections)
