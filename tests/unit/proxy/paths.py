"""Which path the core tests build their cores with (set by the ``core_paths`` fixture)."""

FAST = True
"""``ProxyOptions.fast_paths`` for the cores the tests build."""
