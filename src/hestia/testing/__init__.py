"""
Test doubles for Hestia and for what plugs into it, in the spirit of L{treq.testing}.

 - L{FakeBackend} (L{hestia.testing.backends}): an L{hestia.interfaces.IBackend}
   whose every step the test fires.
 - L{MemoryGateway} (L{hestia.testing.gateway}): the gateway of a config
   mapping in memory, a L{treq.testing.StubTreq} client in front of the proxy and
   the management API, a backend L{twisted.web.resource.Resource} behind.
 - Upstream doubles (L{hestia.testing.upstream}): agents that refuse, stall,
   truncate or reset, wrapped around the in-memory one.
 - L{verify_backend} (L{hestia.testing.conformance}): what a backend promises,
   checked as the gateway uses it; a third-party backend's tests run it.
 - L{MemoryHestia} (L{hestia.testing.site}): the daemon's whole site in memory,
   fed raw client bytes.

Integration tests use real processes instead (C{tests/support/}).
"""

from hestia.testing.backends import FakeBackend
from hestia.testing.conformance import NotConforming, verify_backend
from hestia.testing.gateway import (
    ADMIN_TOKEN,
    ECHO_TOKEN,
    MemoryGateway,
    RecordingBackend,
)
from hestia.testing.site import (
    MemoryClient,
    MemoryHestia,
    MemoryUpgradeBackend,
    MemoryUpstream,
    RecordingGateway,
    UpgradeConnection,
    body_of,
    statuses,
)
from hestia.testing.upstream import (
    FlakyAgent,
    RefusingAgent,
    ResettingAgent,
    StallingAgent,
    TruncatedResponse,
    TruncatingAgent,
)

__all__ = [
    "ADMIN_TOKEN",
    "ECHO_TOKEN",
    "FakeBackend",
    "FlakyAgent",
    "MemoryClient",
    "MemoryGateway",
    "MemoryHestia",
    "MemoryUpgradeBackend",
    "MemoryUpstream",
    "NotConforming",
    "RecordingBackend",
    "RecordingGateway",
    "RefusingAgent",
    "ResettingAgent",
    "StallingAgent",
    "TruncatedResponse",
    "TruncatingAgent",
    "UpgradeConnection",
    "body_of",
    "statuses",
    "verify_backend",
]
