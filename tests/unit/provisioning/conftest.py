"""The Bandwidth emulator and service fixtures of test_service, shared with its siblings."""

from tests.unit.provisioning.test_service import bw, world

__all__ = ["bw", "world"]
