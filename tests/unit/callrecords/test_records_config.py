"""The [records] section, and the export command's refusal of a store that holds nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

from e911_sip.cli import main
from e911_sip.config import ConfigError, load


def test_records_defaults_keep_five_years() -> None:
    records = load(None, {}).records
    assert records.enabled and records.store_url == "memory://"
    assert records.retention_days == 1826.0
    assert records.stream == "e911:calls" and records.group == "provisioning"


def test_records_section_and_relative_file_url(tmp_path: Path) -> None:
    path = tmp_path / "e911.toml"
    path.write_text(
        '[records]\nstore_url = "file://calls.jsonl"\nretention_days = 2000\nmax_in_progress = 5\n'
    )
    records = load(path, {}).records
    assert records.store_url == f"file://{tmp_path / 'calls.jsonl'}"
    assert records.retention_days == 2000.0 and records.recorder.book.max_calls == 5
    env = load(path, {"E911_SIP__RECORDS__QUEUE_SIZE": "7"}).records
    assert env.recorder.queue_size == 7
    assert env.recorder.linger == 0.05  # the default: a write waits 50 ms for company
    assert load(path, {"E911_SIP__RECORDS__LINGER": "0"}).records.recorder.linger == 0.0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('store_url = "ftp://x"', "[records] store_url"),
        ("retention_days = 0", "[records] retention_days"),
        ("max_in_progress = 0", "[records] max_in_progress"),
        ("linger = -1", "[records] linger"),
        ("colour = 1", "[records] colour: unknown key"),
    ],
)
def test_records_errors_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "e911.toml"
    path.write_text(f"[records]\n{text}\n")
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load(path, {})


def test_export_refuses_the_memory_store(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["calls", "export", "--since", "2026-01-01"]) == 2
    assert "[records] store_url" in capsys.readouterr().err


def test_export_of_an_empty_file_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "e911.toml"
    path.write_text(f'[records]\nstore_url = "file://{tmp_path / "calls.jsonl"}"\n')
    code = main(["calls", "export", "--config", str(path), "--since", "2026-01-01"])
    assert code == 0
    out = capsys.readouterr()
    assert out.out.splitlines()[0].startswith("id,call_id,caller")
    assert "exported 0 call records" in out.err
