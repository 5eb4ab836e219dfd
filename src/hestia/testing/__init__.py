"""
Test doubles for Hestia and for what plugs into it, in the spirit of L{treq.testing}.

L{FakeBackend} (L{hestia.testing.backends}) is an L{hestia.interfaces.IBackend}
whose every step the test fires; L{MemoryHestia} (L{hestia.testing.site}) is the
daemon's whole site in memory, fed raw client bytes.  Integration tests use real
processes instead (C{tests/support/}).
"""

from hestia.testing.backends import FakeBackend
from hestia.testing.site import (
    ADMIN_TOKEN,
    ECHO_TOKEN,
    MemoryClient,
    MemoryHestia,
    MemoryUpgradeBackend,
    MemoryUpstream,
    RecordingBackend,
    RecordingGateway,
    UpgradeConnection,
    statuses,
)

__all__ = [
    "ADMIN_TOKEN",
    "ECHO_TOKEN",
    "FakeBackend",
    "MemoryClient",
    "MemoryHestia",
    "MemoryUpgradeBackend",
    "MemoryUpstream",
    "RecordingBackend",
    "RecordingGateway",
    "UpgradeConnection",
    "statuses",
]
