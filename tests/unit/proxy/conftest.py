"""The core's tests run twice: through the fast paths and through the general handling.

``ProxyOptions.fast_paths`` promises that both give the same result; a module that builds
cores marks itself with ``pytest.mark.usefixtures("core_paths")``, and any divergence
between the two paths fails one of its tests.
"""

from __future__ import annotations

import pytest

from tests.unit.proxy import paths


@pytest.fixture(params=[True, False], ids=["fast", "general"])
def core_paths(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    fast: bool = request.param
    monkeypatch.setattr(paths, "FAST", fast)
    return fast
