"""The data schema rule: which stored versions a release runs on, and what it writes."""

from __future__ import annotations

from pathlib import Path

import pytest

from e911_sip.cli import main
from e911_sip.store.schema import CURRENT, SCHEMA_KEY, SchemaVersion, decide

V = SchemaVersion(2, 3)


def test_versions_parse_print_and_order() -> None:
    assert SchemaVersion.parse("2.3") == V
    assert SchemaVersion.parse(" 10.0 ") == SchemaVersion(10, 0)
    assert str(V) == "2.3"
    assert SchemaVersion(1, 9) < SchemaVersion(2, 0) < SchemaVersion(2, 10)
    for bad in ("", "2", "2.", ".3", "2.3.1", "v2.3", "02.3", "2.03", "-1.0", "2,3", "1e3.0"):
        with pytest.raises(ValueError):
            SchemaVersion.parse(bad)


def test_this_release_is_schema_1_1_under_the_product_prefix() -> None:
    assert CURRENT == SchemaVersion(1, 1)
    assert SCHEMA_KEY == "e911:schema"


def test_absent_is_taken_as_the_current_version_and_written() -> None:
    verdict = decide(None, V)
    assert verdict.ok and verdict.write == V and verdict.stored is None
    assert "absent" in verdict.message


def test_same_version_runs_and_writes_nothing() -> None:
    verdict = decide("2.3", V)
    assert verdict.ok and verdict.write is None


def test_older_minor_runs_and_is_raised_to_the_current_minor() -> None:
    verdict = decide("2.0", V)
    assert verdict.ok and verdict.write == V
    assert "2.0" in verdict.message


def test_newer_minor_runs_and_is_never_lowered() -> None:
    verdict = decide("2.7", V)
    assert verdict.ok and verdict.write is None
    assert "2.7" in verdict.message


def test_newer_major_is_refused_with_what_to_do() -> None:
    verdict = decide("3.0", V)
    assert not verdict.ok and verdict.write is None
    assert "3.0" in verdict.message and "newer" in verdict.message
    assert "upgrade" in verdict.message and "Upgrading" in verdict.message


def test_older_major_is_refused_with_what_to_do() -> None:
    verdict = decide("1.9", V)
    assert not verdict.ok and verdict.write is None
    assert "older" in verdict.message and "migrate" in verdict.message


def test_a_value_e911_sip_never_writes_is_refused() -> None:
    verdict = decide("latest", V)
    assert not verdict.ok and verdict.write is None
    assert "'latest'" in verdict.message and "MAJOR.MINOR" in verdict.message


def test_the_release_defaults_to_its_own_version() -> None:
    assert decide(str(CURRENT)).ok
    assert decide(f"{CURRENT.major}.0").write == CURRENT
    assert not decide(f"{CURRENT.major + 1}.0").ok


def test_check_config_shows_the_schema_without_redis(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "memory.toml"
    config.write_text('[store]\nurl = "memory://"\n', encoding="utf-8")
    assert main(["check-config", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert f"data schema:            {CURRENT} written by this release (no Redis" in out
