"""The build in use: which modules are compiled, and the list setup.py compiles."""

from __future__ import annotations

import importlib
import os
import runpy
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from e911_sip import build

ROOT = Path(__file__).resolve().parents[2]


def test_setup_compiles_the_modules_the_package_lists() -> None:
    # setup.py reads the list from the file without importing the package.
    namespace = runpy.run_path(str(ROOT / "setup.py"), run_name="not_main")
    assert namespace["compiled_sources"]() == [
        "src/" + name.replace(".", "/") + ".py" for name in build.COMPILED
    ]
    for name in build.COMPILED:
        assert (ROOT / "src" / (name.replace(".", "/") + ".py")).is_file(), name
    native = namespace["native_extensions"]()
    assert [ext.name for ext in native] == list(build.NATIVE)
    for ext in native:
        assert [(ROOT / source).is_file() for source in ext.sources] == [True], ext.name


def test_every_listed_module_imports() -> None:
    for name in build.COMPILED:
        assert importlib.import_module(name).__name__ == name


def test_the_suite_runs_the_build_it_was_asked_for() -> None:
    # scripts/check sets this for each run (pure on src/, compiled on the built package): a
    # broken build must not pass as pure, nor a stale extension in src/ as Python.
    expected = os.environ.get("E911_SIP_EXPECT_BUILD")
    if expected is None:
        pytest.skip("E911_SIP_EXPECT_BUILD not set (scripts/check sets it)")
    assert build.describe() == expected


def test_src_runs_as_python() -> None:
    # src/ never holds extension modules: scripts/compile builds elsewhere.
    assert not [p for p in (ROOT / "src").rglob("*") if p.suffix in (".so", ".pyd")]


def test_build_check_command_reports_each_module() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "e911_sip.build"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    lines = result.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == list(build.COMPILED + build.NATIVE)
    assert all(line.endswith((": compiled", ": python")) for line in lines)
    found = set(build.compiled_modules())
    required = subprocess.run(
        [sys.executable, "-m", "e911_sip.build", "--require-compiled"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (required.returncode == 0) == (found == set(build.COMPILED + build.NATIVE))


def test_the_image_is_built_compiled() -> None:
    # Without setup.py in the build context the wheel would quietly be pure Python.
    dockerfile = (ROOT / "Dockerfile").read_text()
    build_stage = dockerfile.split("\nFROM ")[1]
    assert "COPY pyproject.toml setup.py" in build_stage
    assert "gcc" in build_stage
    assert "python -m e911_sip.build --require-compiled" in build_stage


def test_the_build_environment_has_what_the_compiled_modules_import() -> None:
    # mypyc type-checks the modules it compiles and everything they import; the edge imports
    # the runtime dependencies, and an isolated build (pip, the image) has only these.
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    requires = set(project["build-system"]["requires"])
    missing = [dep for dep in project["project"]["dependencies"] if dep not in requires]
    assert not missing, f"add to [build-system] requires: {missing}"
