"""The repository's scripts and walk-through: scripts/run keeps (or makes) the editable install
that scripts/check relies on; SIPp's logs stay out of the tree."""

from __future__ import annotations

import fnmatch
import os
import re
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


def test_sipp_logs_are_ignored_and_the_walk_through_writes_none_here() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".gitignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for name in (
        "uas_emergency_4242_messages.log",
        "uac_911_4243_errors.log",
        "uac_911_4243_screen.log",
        "uac_911_4243_.csv",
    ):
        assert any(fnmatch.fnmatch(name, p) for p in patterns), name
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"^sipp .*?(?<!\\)$", readme, flags=re.M | re.S)
    assert commands
    for command in commands:
        if "-trace_msg" in command:
            assert '-message_file "$LOGS/' in command, command
    assert "LOGS=$(mktemp -d)" in readme
