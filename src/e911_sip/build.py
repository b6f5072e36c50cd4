"""Which build of the package is running: the hot modules compiled with mypyc, or pure Python.

``COMPILED`` is the one list of modules that setup.py compiles when the package is built
(``pip install .``, ``pip wheel .``, the container image). An editable install, or a build
with ``E911_SIP_PURE=1``, runs the same files as Python with the same behaviour, only
slower; the start-up log and ``e911-sip --version`` say which one runs. docs/decisions.md
records why these modules and what compiling them gains.

``python -m e911_sip.build`` prints the state of each module; with ``--require-compiled``
it fails unless every one of them was loaded from an extension module (the build check in
``scripts/compile`` and the test suite's compiled run).
"""

from __future__ import annotations

import importlib
import importlib.machinery
import sys

COMPILED = (
    "e911_sip.sip.message",
    "e911_sip.sip.uri",
    "e911_sip.sip.numbers",
    "e911_sip.sip.peer",
    "e911_sip.sip.transaction",
    "e911_sip.proxy.core",
    "e911_sip.proxy.routing",
    "e911_sip.proxy.wheel",
    "e911_sip.proxy.trust",
    "e911_sip.proxy.admission",
    "e911_sip.proxy.trunks",
    "e911_sip.policy.emergency",
    "e911_sip.policy.enrich",
    "e911_sip.edge",
    "e911_sip.transport.udp",
    "e911_sip.timefmt",
    "e911_sip.logjson",
    "e911_sip.logline",
    "e911_sip.callrecords.book",
    "e911_sip.callrecords.stream",
    "e911_sip.callrecords.recorder",
    "e911_sip.store.breaker",
    "e911_sip.store.resilient",
    "e911_sip.store.memory",
    "e911_sip.notify.event",
    "e911_sip.notify.queue",
    "e911_sip.notify.dispatch",
)
"""Modules setup.py compiles; read by setup.py without importing the package."""

NATIVE = ("e911_sip.sip._headscan",)
"""Extension modules written in C (``<module>.c``), built beside ``COMPILED``. Each replaces
the functions of a Python module that says so, which serve when it is not built."""


def compiled_modules() -> list[str]:
    """The modules of ``COMPILED`` and ``NATIVE`` that this process loaded from an extension
    module (a native module that cannot be imported is not)."""
    suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
    found = []
    for name in COMPILED + NATIVE:
        try:
            module = importlib.import_module(name)
        except ImportError:
            if name in NATIVE:
                continue
            raise
        path = getattr(module, "__file__", None) or ""
        if path.endswith(suffixes):
            found.append(name)
    return found


def describe() -> str:
    """``compiled`` (every listed module), ``pure`` (none) or ``partly compiled (...)``."""
    found = compiled_modules()
    if len(found) == len(COMPILED + NATIVE):
        return "compiled"
    if not found:
        return "pure"
    return f"partly compiled ({', '.join(found)})"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    found = set(compiled_modules())
    for name in COMPILED + NATIVE:
        print(f"{name}: {'compiled' if name in found else 'python'}")
    if "--require-compiled" in args and len(found) != len(COMPILED + NATIVE):
        print("e911_sip.build: not every listed module is compiled", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
