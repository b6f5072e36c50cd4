"""scripts/run keeps (or makes) the editable install that scripts/check relies on."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Stands in for python3: records each call, answers the import probe with $E911_AT.
FAKE_PYTHON = """#!/usr/bin/env bash
echo "$*" >> "$CALLS"
if [ "$1" = "-c" ]; then
    [ -n "$E911_AT" ] && echo "$E911_AT"
    exit 0
fi
exit 0
"""


def run_script(tmp_path: Path, installed_at: str) -> list[str]:
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    calls = tmp_path / "calls"
    calls.touch()
    env = {**os.environ, "PYTHON": str(fake), "CALLS": str(calls), "E911_AT": installed_at}
    result = subprocess.run(
        [str(ROOT / "scripts" / "run"), "--config", "x.toml"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    return calls.read_text().splitlines()[1:]  # after the import probe


def test_run_makes_an_editable_install_when_the_package_is_a_copy(tmp_path: Path) -> None:
    calls = run_script(tmp_path, "/usr/lib/python3/site-packages/e911_sip")
    assert calls == [
        "-m pip install -q --disable-pip-version-check -e .",
        "-m e911_sip serve --config x.toml",
    ]


def test_run_keeps_an_editable_install_of_this_tree(tmp_path: Path) -> None:
    calls = run_script(tmp_path, str((ROOT / "src" / "e911_sip").resolve()))
    assert calls == ["-m e911_sip serve --config x.toml"]


def test_run_installs_when_the_package_is_missing(tmp_path: Path) -> None:
    calls = run_script(tmp_path, "")
    assert calls[0] == "-m pip install -q --disable-pip-version-check -e ."


def test_no_script_installs_a_copy() -> None:
    for script in ("run", "check"):
        text = (ROOT / "scripts" / script).read_text()
        for line in text.splitlines():
            if "pip install" in line and not line.lstrip().startswith(("#", "echo")):
                assert " -e " in line, (script, line)
