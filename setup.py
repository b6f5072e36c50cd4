"""Build hook: the hot modules of the SIP core compiled with mypyc.

Everything else about the package is declared in pyproject.toml. The modules listed there
in ``e911_sip/build.py`` (``COMPILED``) are the same .py files the pure-Python install runs,
compiled to C extensions by mypyc (part of mypy, which already checks them under
``--strict``), plus the native modules of ``NATIVE`` there, each written in C beside the
Python module whose functions it replaces. Set ``E911_SIP_PURE=1`` to build without them:
the package then runs the .py files with the same behaviour; the test suite runs both ways,
and docs/decisions.md records what compiling gains.
"""

from __future__ import annotations

import os
import runpy
from pathlib import Path

from setuptools import Extension, setup

HERE = Path(__file__).parent


def compiled_sources() -> list[str]:
    # Run as a plain file: the package's dependencies need not be installed to build it.
    modules = runpy.run_path(str(HERE / "src" / "e911_sip" / "build.py"))["COMPILED"]
    return ["src/" + name.replace(".", "/") + ".py" for name in modules]


def native_extensions() -> list[Extension]:
    # Hand-written C: the modules of ``NATIVE`` in e911_sip/build.py, each one .c file.
    modules = runpy.run_path(str(HERE / "src" / "e911_sip" / "build.py"))["NATIVE"]
    return [
        Extension(name, ["src/" + name.replace(".", "/") + ".c"], extra_compile_args=["-O2"])
        for name in modules
    ]


def ext_modules() -> list[object]:
    if os.environ.get("E911_SIP_PURE", "") not in ("", "0"):
        return []
    from mypyc.build import mypycify

    return [*mypycify(compiled_sources(), opt_level="3"), *native_extensions()]


if __name__ == "__main__":  # as setuptools runs it; the tests read the list without building
    setup(ext_modules=ext_modules())
