"""
Every built-in backend, built from a minimal configuration as the gateway builds it, provides
what its interfaces promise (issue 15: interfaces at every seam).  A backend that forgets a
method or attribute of L{IBackend}, or declares L{IPersistentBackend}/L{IAdoptableBackend}
without implementing it, fails here, not on the first request that needs it.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any

import pytest
from treq.testing import RequestTraversalAgent
from twisted.internet.testing import MemoryReactorClock
from twisted.web.resource import Resource
from zope.interface.verify import verifyObject

from hestia.backends import BUILT_IN, ENTRY_POINT_GROUP, find_backend
from hestia.interfaces import IAdoptableBackend, IBackend, IBackendFactory, IPersistentBackend
from hestia.loader import parse_config

pytestmark = pytest.mark.unit

URL = "http://127.0.0.1:9"
# The least each backend needs, as a user writes it.
MINIMAL: dict[str, dict[str, Any]] = {
    "process": {"url": URL, "command": ["serve"]},
    "static": {"url": URL},
    "docker": {"url": URL, "docker": {"container": "app"}},
    "semaphore": {"url": URL, "semaphore": {"machine_id": "m1", "start_template_id": 1, "stop_template_id": 2}},
    "wol": {"url": URL, "wol": {"mac": "52:54:00:ab:cd:ef", "stop_command": ["ssh", "box", "suspend"]}},
    "exec": {"url": URL, "exec": {"start": ["wake"], "stop": ["sleep"]}},
}
SEMAPHORE = {"base_url": "http://127.0.0.1:3000", "project_id": 1}


def test_every_built_in_backend_is_covered() -> None:
    assert sorted(MINIMAL) == sorted(BUILT_IN)


def test_the_entry_points_name_the_built_in_factories() -> None:
    """setup.cfg's entry points (what a third party sees) are the table the gateway uses."""
    declared = {point.name: point.load() for point in entry_points(group=ENTRY_POINT_GROUP)}
    assert {name: declared.get(name) for name in BUILT_IN} == BUILT_IN


@pytest.mark.parametrize("kind", sorted(MINIMAL))
def test_a_built_in_backend_provides_its_interfaces(kind: str) -> None:
    raw: dict[str, Any] = {"services": {"svc": MINIMAL[kind]}}
    if kind == "semaphore":
        raw["semaphore"] = SEMAPHORE
    config = parse_config(raw, "conformance.yml", environ={"SEMAPHORE_API_TOKEN": "t0ken"})
    service = config.services["svc"]
    assert service.backend == kind
    factory = find_backend(kind)
    verifyObject(IBackendFactory, factory)
    backend = factory.build(service, MemoryReactorClock(), RequestTraversalAgent(Resource()))
    verifyObject(IBackend, backend)
    assert backend.kind == kind
    assert backend.url == URL
    assert isinstance(backend.has_lifecycle, bool) and backend.has_lifecycle is (kind != "static")
    for optional in (IPersistentBackend, IAdoptableBackend):
        if optional.providedBy(backend):
            verifyObject(optional, backend)
